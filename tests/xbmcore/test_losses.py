"""Losses against brute-force float64 references written as plain loops over pairs.

The references compute every similarity as an explicit sum over dimensions and walk the pairs one by one;
their gradients come from autograd through those loops, so value and gradient are both checked against an
implementation that shares no code (and no vectorised masking) with xbmcore.losses.
"""
from __future__ import annotations

import math

import pytest
import torch

from xbmcore.config import LossParams
from xbmcore.losses import (
    ContrastiveLoss,
    LossOutput,
    MultiSimilarityLoss,
    TripletLoss,
    XBMObjective,
    build_loss,
)
from xbmcore.memory import CrossBatchMemory

EPS_POS = 1e-5  # the official code's "exact copy" threshold for positives


# ---------------------------------------------------------------------- brute-force references


def dot(a, b):
    s = a[0] * b[0]
    for d in range(1, len(a)):
        s = s + a[d] * b[d]
    return s


def ref_contrastive(sims, same, margin):
    """sims, same: dicts over the candidate pairs (i, j) -> returns (per-anchor terms, n_terms, n_pos, n_neg)."""
    total, n_pos, n_neg = 0.0, 0, 0
    for (i, j), s in sims.items():
        if same[i, j]:
            if s.item() < 1 - EPS_POS:
                total = total + (1 - s)
                n_pos += 1
        elif s.item() > margin:
            total = total + (s - margin)
            n_neg += 1
    return total, n_pos + n_neg, n_pos, n_neg


def ref_multi_similarity(sims, same, B, alpha, beta, base, eps):
    total, n_active, n_pos, n_neg = 0.0, 0, 0, 0
    for i in range(B):
        row = [(s, same[i2, j]) for (i2, j), s in sims.items() if i2 == i]
        pos = [s for s, y in row if y and s.item() < 1 - EPS_POS]
        neg = [s for s, y in row if not y]
        if not pos or not neg:
            continue
        min_pos = min(s.item() for s in pos)
        max_neg = max(s.item() for s in neg)
        neg_k = [s for s in neg if s.item() + eps > min_pos]
        pos_k = [s for s in pos if s.item() - eps < max_neg]
        if not pos_k or not neg_k:
            continue
        sp = sum(torch.exp(-alpha * (s - base)) for s in pos_k)
        sn = sum(torch.exp(beta * (s - base)) for s in neg_k)
        total = total + torch.log(1 + sp) / alpha + torch.log(1 + sn) / beta
        n_active, n_pos, n_neg = n_active + 1, n_pos + len(pos_k), n_neg + len(neg_k)
    return total, n_active, n_pos, n_neg


def ref_triplet(sims, same, B, margin):
    total, n = 0.0, 0
    for i in range(B):
        row = [(s, same[i2, j]) for (i2, j), s in sims.items() if i2 == i]
        pos = [s for s, y in row if y]
        neg = [s for s, y in row if not y]
        if not pos or not neg:
            continue
        hp = min(pos, key=lambda s: s.item())
        hn = max(neg, key=lambda s: s.item())
        term = hn - hp + margin
        if term.item() > 0:
            total = total + term
            n += 1
    return total, n, n, n


def brute_force(kind, params, reduction, emb, labels, ref, ref_labels, excluded):
    """Loss value (autograd-capable), pos_pairs, neg_pairs; excluded(i, j) -> bool drops a pair."""
    B, K = emb.shape[0], ref.shape[0]
    sims, same = {}, {}
    for i in range(B):
        for j in range(K):
            if not excluded(i, j):
                sims[i, j] = dot(emb[i], ref[j])
                same[i, j] = int(labels[i]) == int(ref_labels[j])
    if kind == "contrastive" and reduction == "mean_per_kind":  # each kind's mean, summed
        means, counts = [], []
        for kind_of_pair in (True, False):
            part = {k: v for k, v in sims.items() if same[k] == kind_of_pair}
            total, n, _, _ = ref_contrastive(part, same, params["margin"])
            means.append(total / max(n, 1) if isinstance(total, torch.Tensor) else emb.sum() * 0)
            counts.append(n)
        return means[0] + means[1], counts[0], counts[1]
    if kind == "contrastive":
        total, n_terms, n_pos, n_neg = ref_contrastive(sims, same, params["margin"])
    elif kind == "multi_similarity":
        total, n_terms, n_pos, n_neg = ref_multi_similarity(sims, same, B, **params)
    else:
        total, n_terms, n_pos, n_neg = ref_triplet(sims, same, B, params["margin"])
    denom = max(n_terms, 1) if reduction == "mean_active" else B
    if not isinstance(total, torch.Tensor):  # nothing active: a zero that still depends on emb
        total = emb.sum() * 0
    return total / denom, n_pos, n_neg


LOSSES = {
    "contrastive": (ContrastiveLoss, {"margin": 0.5}),
    "multi_similarity": (MultiSimilarityLoss, {"alpha": 2.0, "beta": 50.0, "base": 0.5, "eps": 0.1}),
    "triplet": (TripletLoss, {"margin": 0.1}),
}


def make_loss(kind, reduction):
    cls, params = LOSSES[kind]
    kw = dict(params)
    if "eps" in kw:
        kw["epsilon"] = kw.pop("eps")
    return cls(reduction=reduction, **kw), params


def unit(*shape, gen):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def problem(seed, B=8, K=12, D=5, classes=3):
    """Batch and memory with repeated labels; some memory rows are noisy copies of batch items."""
    g = torch.Generator().manual_seed(seed)
    emb = unit(B, D, gen=g)
    labels = torch.randint(0, classes, (B,), generator=g)
    indices = torch.randperm(40, generator=g)[:B]
    mem = unit(K, D, gen=g)
    mem_labels = torch.randint(0, classes, (K,), generator=g)
    mem_indices = 40 + torch.randperm(40, generator=g)[:K]
    for j, i in enumerate((0, 3, 5)):  # stored copies of batch items 0, 3, 5
        mem[j] = torch.nn.functional.normalize(emb[i] + 0.05 * torch.randn(D, generator=g, dtype=emb.dtype), dim=0)
        mem_labels[j], mem_indices[j] = labels[i], indices[i]
    return emb, labels, indices, mem, mem_labels, mem_indices


# ---------------------------------------------------------------------- value and gradient


# mean_per_kind splits positive and negative pairs, which only the contrastive loss's terms are
KINDS_REDUCTIONS = [(k, r) for k in LOSSES for r in ("mean_active", "sum_over_batch")] + [
    ("contrastive", "mean_per_kind")]


@pytest.mark.parametrize(("kind", "reduction"), KINDS_REDUCTIONS)
@pytest.mark.parametrize("setting", ["batch", "batch_indices", "memory", "memory_ref_grad"])
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_brute_force(kind, reduction, setting, seed):
    emb, labels, indices, mem, mem_labels, mem_indices = problem(seed)
    if setting == "batch_indices":
        indices[6] = indices[1]  # the same image twice in the batch: never its own positive
    loss, params = make_loss(kind, reduction)

    def run(fn_emb, fn_mem):
        if setting == "batch":
            return loss(fn_emb, labels)
        if setting == "batch_indices":
            return loss(fn_emb, labels, indices=indices)
        return loss(fn_emb, labels, fn_mem, mem_labels, indices, mem_indices)

    e1 = emb.clone().requires_grad_()
    m1 = mem.clone().requires_grad_(setting == "memory_ref_grad")
    out = run(e1, m1)
    assert isinstance(out, LossOutput)
    out.loss.backward()

    e2 = emb.clone().requires_grad_()
    m2 = mem.clone().requires_grad_(setting == "memory_ref_grad")
    if setting == "batch":
        expected, n_pos, n_neg = brute_force(kind, params, reduction, e2, labels, e2, labels, lambda i, j: i == j)
    elif setting == "batch_indices":
        ex = lambda i, j: int(indices[i]) == int(indices[j])  # noqa: E731
        expected, n_pos, n_neg = brute_force(kind, params, reduction, e2, labels, e2, labels, ex)
    else:
        ex = lambda i, j: int(indices[i]) == int(mem_indices[j])  # noqa: E731
        expected, n_pos, n_neg = brute_force(kind, params, reduction, e2, labels, m2, mem_labels, ex)
    expected.backward()

    assert n_pos + n_neg > 0  # the problem exercises active pairs
    assert out.pos_pairs.dtype == out.neg_pairs.dtype == torch.int64
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (n_pos, n_neg)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-9, atol=1e-12)
    if setting == "memory_ref_grad":
        torch.testing.assert_close(m1.grad, m2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
def test_float32_embeddings_with_float32_or_bfloat16_memory(kind, mem_dtype):
    """emb float32, memory stored in float32 or bfloat16: the memory is compared as stored."""
    emb, labels, indices, mem, mem_labels, mem_indices = problem(2)
    loss, params = make_loss(kind, "mean_active")
    mem_stored = mem.to(mem_dtype)
    e1 = emb.float().requires_grad_()
    out = loss(e1, labels, mem_stored, mem_labels, indices, mem_indices)
    out.loss.backward()
    e2 = emb.float().double().requires_grad_()
    ex = lambda i, j: int(indices[i]) == int(mem_indices[j])  # noqa: E731
    expected, n_pos, n_neg = brute_force(kind, params, "mean_active", e2, labels, mem_stored.double(), mem_labels, ex)
    expected.backward()
    assert out.loss.dtype == torch.float32
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (n_pos, n_neg)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e1.grad.double(), e2.grad, rtol=1e-4, atol=1e-4)


def test_contrastive_under_cpu_autocast_bfloat16():
    """Autocast runs the matmul in bfloat16; pairs far from the thresholds are counted exactly."""
    D = 4
    e = torch.eye(D)[:4]  # anchors: basis vectors, labels 0..3
    labels = torch.arange(4)
    mem = torch.tensor([[0.8, 0.6, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.3, 0.95]])
    mem_labels = torch.tensor([0, 2, 2, 3])
    loss = ContrastiveLoss(margin=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(e.requires_grad_(), labels, mem, mem_labels)
    # positives: (0,0) s=0.8 -> 0.2; (2,1) s=0 -> 1; (2,2) s=1 -> copy, inactive; (3,3) s=0.95 -> 0.05
    # negatives > 0.5: (0,1) s=0.6 -> 0.1; (1,0) s=0.6 -> 0.1; (1,1) s=0.8 -> 0.3
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (3, 3)
    assert out.loss.item() == pytest.approx((0.2 + 1 + 0.05 + 0.1 + 0.1 + 0.3) / 6, abs=1e-2)


# ---------------------------------------------------------------------- exclusion and edge cases


@pytest.mark.parametrize("kind", list(LOSSES))
def test_own_stored_copy_is_excluded_by_index(kind):
    """With indices, the loss equals the loss on the memory with the anchor's own copies removed row-wise."""
    emb, labels, indices, mem, mem_labels, mem_indices = problem(3)
    mem[:3] = -emb[[0, 3, 5]]  # stale copies at s = -1: the hardest, always active, positives
    loss, _ = make_loss(kind, "sum_over_batch")
    with_idx = loss(emb, labels, mem, mem_labels, indices, mem_indices)
    without = loss(emb, labels, mem, mem_labels)
    assert not torch.allclose(with_idx.loss, without.loss)  # the copies matter here
    per_anchor = []  # anchor by anchor, memory rows of its own index removed
    for i in range(emb.shape[0]):
        keep = mem_indices != indices[i]
        per_anchor.append(loss(emb[i : i + 1], labels[i : i + 1], mem[keep], mem_labels[keep]).loss)
    torch.testing.assert_close(with_idx.loss, sum(per_anchor) / emb.shape[0])


def test_diagonal_excluded_without_indices():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = ContrastiveLoss()(e, torch.tensor([0, 1]))  # only self-pairs share a label: nothing to learn
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (0, 0)


@pytest.mark.parametrize(("kind", "reduction"), KINDS_REDUCTIONS)
def test_zero_active_gives_zero_loss_and_zero_gradient(kind, reduction):
    # same label: identical vectors (s = 1, a copy); different labels: orthogonal (s = 0 < margins)
    e = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    loss, _ = make_loss(kind, reduction)
    out = loss(e, labels)  # triplet: hardest positive s = 1 beats hardest negative s = 0 by > margin
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (0, 0)
    assert torch.equal(e.grad, torch.zeros_like(e))


@pytest.mark.parametrize("kind", ["contrastive", "multi_similarity"])
def test_positive_within_1e_5_of_one_is_a_copy_not_a_pair(kind):
    """Official XBM rule: a positive with s >= 1 - 1e-5 (e.g. the same image sampled twice) is skipped."""
    def run(gap):
        c = 1 - gap
        # the negative sits at s = 0.95 so that multi-similarity mining keeps the far positive
        e = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)], [0.95, math.sqrt(1 - 0.95**2)]], dtype=torch.float64)
        return make_loss(kind, "sum_over_batch")[0](e, torch.tensor([0, 0, 1]))

    near, far = run(1e-6), run(1e-4)
    assert int(near.pos_pairs) == 0 and int(far.pos_pairs) == 2


def test_empty_reference_gives_zero():
    e = torch.randn(3, 4, requires_grad=True)
    out = ContrastiveLoss()(e, torch.arange(3), torch.empty(0, 4), torch.empty(0, dtype=torch.long))
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.pos_pairs) == 0 and torch.equal(e.grad, torch.zeros_like(e))


def test_multi_similarity_large_beta_does_not_overflow():
    """beta = 500: exp(beta * (s - base)) = exp(250) overflows float32; the stable form does not."""
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.99, math.sqrt(1 - 0.99**2)]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    out = MultiSimilarityLoss(beta=500.0, reduction="sum_over_batch")(e, labels)
    out.loss.backward()
    assert torch.isfinite(e.grad).all()
    # sims: s01 = 1, s02 = s12 = 0.99. Anchor 1 has no positive (inactive); anchors 0 and 2 keep their
    # one positive (0.99) and one negative (1.0 for anchor 0, 0.99 for anchor 2).
    pos_term = math.log1p(math.exp(-2 * (0.99 - 0.5))) / 2
    neg_term_0 = (250 + math.log1p(math.exp(-250))) / 500  # log(1 + e^{500 * 0.5}) / 500
    neg_term_2 = (245 + math.log1p(math.exp(-245))) / 500  # log(1 + e^{500 * 0.49}) / 500
    assert out.loss.item() == pytest.approx((2 * pos_term + neg_term_0 + neg_term_2) / 3, rel=1e-5)
    assert (int(out.pos_pairs), int(out.neg_pairs)) == (2, 2)


# ---------------------------------------------------------------------- XBMObjective


@pytest.mark.parametrize("kind", list(LOSSES))
def test_objective_combines_batch_and_memory(kind):
    emb, labels, indices, mem, mem_labels, mem_indices = problem(4)
    loss, params = make_loss(kind, "mean_active")
    memory = CrossBatchMemory(12, 5, num_items=80, dtype=torch.float32)
    memory.enqueue(mem.float(), mem_labels, mem_indices, step=0)
    e = emb.float().requires_grad_()
    out = XBMObjective(loss, weight=0.5)(e, labels, indices, memory)
    batch = loss(emb.float(), labels, indices=indices)
    mem_part = loss(emb.float(), labels, mem.float(), mem_labels, indices, mem_indices)
    torch.testing.assert_close(out["loss_batch"], batch.loss)
    torch.testing.assert_close(out["loss_memory"], mem_part.loss)
    torch.testing.assert_close(out["loss"], batch.loss + 0.5 * mem_part.loss)
    assert int(out["pos_pairs"]) == int(batch.pos_pairs) and int(out["mem_neg_pairs"]) == int(mem_part.neg_pairs)
    # and against the brute force on the memory side
    ex = lambda i, j: int(indices[i]) == int(mem_indices[j])  # noqa: E731
    expected, n_pos, n_neg = brute_force(kind, params, "mean_active", emb, labels, mem.float().double(), mem_labels, ex)
    torch.testing.assert_close(out["loss_memory"].double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert (int(out["mem_pos_pairs"]), int(out["mem_neg_pairs"])) == (n_pos, n_neg)


@pytest.mark.parametrize("empty", [None, "empty"])
def test_objective_without_memory(empty):
    emb, labels, indices, *_ = problem(5)
    memory = None if empty is None else CrossBatchMemory(4, 5)
    out = XBMObjective(ContrastiveLoss(), weight=1.0)(emb, labels, indices, memory)
    batch = ContrastiveLoss()(emb, labels, indices=indices)
    torch.testing.assert_close(out["loss"], batch.loss)
    assert out["loss_memory"].item() == 0.0 and int(out["mem_pos_pairs"]) == int(out["mem_neg_pairs"]) == 0
    assert out["mem_pos_pairs"].dtype == torch.int64


def test_build_loss_from_params():
    c = build_loss(LossParams(name="contrastive", margin=0.3, reduction="sum_over_batch"))
    assert isinstance(c, ContrastiveLoss) and c.margin == 0.3 and c.reduction == "sum_over_batch"
    m = build_loss(LossParams(name="multi_similarity", ms_alpha=3, ms_beta=40, ms_base=0.4, ms_epsilon=0.2))
    assert isinstance(m, MultiSimilarityLoss) and (m.alpha, m.beta, m.base, m.epsilon) == (3, 40, 0.4, 0.2)
    t = build_loss(LossParams(name="triplet", triplet_margin=0.2))
    assert isinstance(t, TripletLoss) and t.margin == 0.2 and t.reduction == "mean_active"


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors():
    e, y = torch.randn(4, 3), torch.arange(4)
    loss = ContrastiveLoss()
    cases = [
        (lambda: ContrastiveLoss(reduction="mean"), "reduction: expected one of"),
        (lambda: MultiSimilarityLoss(alpha=0), "alpha, beta: expected > 0"),
        (lambda: XBMObjective(loss, weight=-1), "weight: expected >= 0"),
        (lambda: loss(e[0], y), "emb: expected a 2-d tensor"),
        (lambda: loss(e.long(), y), "emb: expected a floating-point tensor"),
        (lambda: loss(e, y.float()), "labels: expected an integer tensor"),
        (lambda: loss(e, y[:3]), r"labels: expected shape \(4,\), got \(3,\)"),
        (lambda: loss(e, y, torch.randn(5, 2), torch.arange(5)), r"ref_emb: expected K x 3 .* got \(5, 2\)"),
        (lambda: loss(e, y, torch.randn(5, 3)), "ref_emb, ref_labels: expected both or neither"),
        (lambda: loss(e, y, torch.randn(5, 3), torch.arange(4)), r"ref_labels: expected shape \(5,\)"),
        (lambda: loss(e, y, torch.randn(5, 3), torch.arange(5), y), "indices, ref_indices: expected both"),
        (lambda: loss(e, y, ref_indices=y), "ref_indices: expected None when ref_emb is None"),
        (lambda: loss(e, y, indices=y[:2]), r"indices: expected shape \(4,\)"),
        (lambda: loss(e, y.to("meta")), "labels: expected a tensor on cpu"),
        (lambda: loss(e, y, torch.randn(5, 3, device="meta"), torch.arange(5)), "ref_emb: expected a tensor on cpu"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.parametrize(("name", "reduction"), KINDS_REDUCTIONS)
def test_ranks_partial_losses_add_up_to_the_whole_batch(name, reduction):
    # Two "ranks" of 6 anchors each, paired with the whole batch of 12 and with a memory, their counts summed
    # (what the trainer's all_reduce does): the two losses add up to one process's loss, gradients included
    # (the gradient reaches each row both as an anchor and as a reference, as through the trainer's gather).
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1)
    labels, idx = torch.arange(12) // 3, torch.arange(12)
    memory = CrossBatchMemory(20, 8, num_items=40)
    memory.enqueue(torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1),
                   torch.randint(0, 4, (20,), generator=g), torch.arange(12, 32), step=0)
    objective = XBMObjective(build_loss(LossParams(name=name, reduction=reduction)), 1.0)
    whole_emb = emb.clone().requires_grad_()
    whole = objective(whole_emb, labels, idx, memory)["loss"]
    whole.backward()
    halves = (slice(0, 6), slice(6, 12))

    def local_counts(h):
        seen = []
        objective(emb[h], labels[h], idx[h], memory, batch=(emb, labels, idx), count=lambda x: seen.append(x) or x)
        return seen

    counts = [a + b for a, b in zip(*(local_counts(h) for h in halves))]  # one per count call: batch, memory
    parts = emb.clone().requires_grad_()
    total = 0
    for h in halves:
        it = iter(counts)
        total = total + objective(parts[h], labels[h], idx[h], memory, batch=(parts, labels, idx),
                                  count=lambda x: next(it))["loss"]
    total.backward()
    assert whole.item() > 0
    torch.testing.assert_close(total, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.grad, whole_emb.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_memory", [False, True])
def test_mean_per_kind_matches_pytorch_metric_learning(with_memory):
    """pml's ContrastiveLoss reduces its positive and its negative pairs apart (AvgNonZeroReducer, each kind's mean
    over the pairs with a non-zero loss) and sums the two: our mean_per_kind, on the batch and against references."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss as PmlContrastive

    emb, labels, _, mem, mem_labels, _ = problem(3, B=12, K=30)
    peer = PmlContrastive(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity())
    ours = ContrastiveLoss(margin=0.5, reduction="mean_per_kind")
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    if with_memory:
        out, expected = ours(e1, labels, mem, mem_labels), peer(e2, labels, ref_emb=mem, ref_labels=mem_labels)
    else:
        out, expected = ours(e1, labels), peer(e2, labels)
    out.loss.backward()
    expected.backward()
    assert int(out.pos_pairs) > 0 and int(out.neg_pairs) > 0
    assert out.loss.item() != pytest.approx(ContrastiveLoss(0.5)(emb, labels, *((mem, mem_labels) if with_memory
                                                                               else ())).loss.item())
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-10, atol=1e-12)
    # pml normalises inside its distance: its gradient is ours without the radial part (the rows are unit vectors)
    tangent = e1.grad - (e1.grad * emb).sum(1, keepdim=True) * emb
    torch.testing.assert_close(tangent, e2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [MultiSimilarityLoss, TripletLoss])
def test_mean_per_kind_is_refused_where_terms_do_not_split(cls):
    with pytest.raises(ValueError, match="mean_per_kind .* only the contrastive"):
        cls(reduction="mean_per_kind")
