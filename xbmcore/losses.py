"""Pair-based losses on a similarity matrix, for the batch and for the cross-batch memory.

Every loss compares B anchors (``emb``, B x D) with K references (``ref_emb``, K x D; the batch itself when
omitted) through ``sim = emb @ ref_emb.T`` (B x K). `PairLoss` does the shared work once: input checks, the
label masks with self-pairs removed, the similarity product and the reduction. A loss implements one hook,
`pair_terms`, which turns (sim, positive mask, negative mask) into the sum of its terms, the number of terms
the "mean_active" reduction divides by, and the counts of active positive and negative pairs.

The hot path is built for K in the tens of thousands: two boolean B x K masks, no float masks, no boolean
indexing (which would copy and, on a GPU, sync), and the contrastive loss is written as sum(coef * sim) with
a constant coefficient matrix, so its backward is one B x K product followed by the matmul with the memory.
On CPU at B = 64, K = 59,551, D = 512 a contrastive step (forward, backward, enqueue) costs about 1.1x the
two unavoidable B x K x D matrix products (bench/loss_step.py).

Reductions:

    "mean_active"    sum of the terms / number of active terms (pairs, anchors or triplets: see each loss);
                     0 with a zero gradient when nothing is active. Keeps the loss scale independent of K.
    "sum_over_batch" sum of the terms / B, as in the official XBM code; grows with the memory size.
    "mean_per_kind"  contrastive only: mean of the active positives' terms + mean of the active negatives'
                     (pytorch-metric-learning's ContrastiveLoss with its AvgNonZeroReducer). Pooled in one mean,
                     thousands of memory negatives outweigh an anchor's few positives; per kind, the pull on
                     the positives keeps its weight whatever K and the batch size.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import LossParams
    from .memory import CrossBatchMemory

REDUCTIONS = ("mean_active", "sum_over_batch", "mean_per_kind")
# Official XBM code: a positive with s >= 1 - 1e-5 is a copy of the anchor (e.g. an image sampled twice),
# not a pair to learn from.
POS_EPS = 1e-5


class LossOutput(NamedTuple):
    """What a `PairLoss` returns.

    Attributes:
        loss: the reduced loss, a differentiable scalar.
        pos_pairs: int64 scalar: the active positive pairs (see each loss for "active").
        neg_pairs: int64 scalar: the active negative pairs.
    """

    loss: Tensor  # scalar
    pos_pairs: Tensor  # int64 scalar: active positive pairs
    neg_pairs: Tensor  # int64 scalar: active negative pairs


class PairTerms(NamedTuple):
    """What `PairLoss.pair_terms` returns: the loss's terms before the reduction.

    Attributes:
        total: scalar sum of the loss terms, differentiable w.r.t. sim.
        num_terms: int64 scalar: the number of terms ``"mean_active"`` divides by (pairs, anchors or triplets).
        pos_pairs: int64 scalar: the active positive pairs.
        neg_pairs: int64 scalar: the active negative pairs.
        pos_total: the positives' share of `total` (the ``"mean_per_kind"`` reduction; None for a loss whose terms
            do not split by pair kind).
    """

    total: Tensor  # scalar sum of the loss terms, differentiable w.r.t. sim
    num_terms: Tensor  # int64 scalar: what "mean_active" divides by
    pos_pairs: Tensor  # int64 scalar
    neg_pairs: Tensor  # int64 scalar
    pos_total: Tensor | None = None  # "mean_per_kind": the positives' part of total


class PairLoss(nn.Module, ABC):
    """Base of the pair losses: checks inputs, builds masks, computes sim, reduces.

    forward(emb, labels, ref_emb=None, ref_labels=None, indices=None, ref_indices=None) -> LossOutput

    - ref_emb/ref_labels None: the batch is compared with itself and the diagonal is excluded; with
      `indices` given, every pair of rows with equal indices is excluded (an image sampled twice is not
      its own positive).
    - ref_emb/ref_labels given (e.g. the memory): with indices and ref_indices, every pair with
      indices[i] == ref_indices[j] is excluded, so an anchor is never paired with its own stored copy.
    - A ref_emb in another dtype (a bfloat16 memory) is cast to emb's dtype, unless autocast is on, in which
      case the matmul runs in the autocast dtype without the copy.
    - count: when the anchors are one rank's part of a global batch, the sum over ranks of a local count
      (an all_reduce); the reduction then divides by the global number of terms (or anchors), so the ranks'
      losses add up to the loss of the whole batch in one process.

    Args:
        reduction: ``"mean_active"`` (sum of the terms / number of active terms: the loss scale does not depend
            on K), ``"sum_over_batch"`` (sum of the terms / B, as the official XBM code; grows with K) or
            ``"mean_per_kind"`` (a loss whose terms split into positive and negative pairs: the mean of each kind's
            active terms, summed).

    Raises:
        ValueError: an unknown reduction, or ``"mean_per_kind"`` for a loss whose terms do not split by pair kind.
    """

    #: whether pair_terms splits its total into positive and negative pairs (the "mean_per_kind" reduction)
    splits_by_kind = False

    def __init__(self, reduction: str = "mean_active") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if reduction == "mean_per_kind" and not self.splits_by_kind:
            raise ValueError(f"loss reduction: mean_per_kind averages positive and negative pairs apart, which only "
                             f"the contrastive loss's terms are; {type(self).__name__} takes mean_active or "
                             f"sum_over_batch")
        self.reduction = reduction

    def _reduce(self, terms: PairTerms, anchors: int, device: torch.device,
                count: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The reduction of `terms` over `anchors` anchors; `count` sums a count over the ranks."""
        if self.reduction == "sum_over_batch":  # a tensor (a copy to the device) only when the ranks sum it
            return terms.total / (anchors if count is None else count(torch.tensor(anchors, device=device)))
        count = count or (lambda n: n)
        if self.reduction == "mean_active":
            return terms.total / count(terms.num_terms).clamp(min=1)
        neg_total = terms.total - terms.pos_total  # mean_per_kind
        return (terms.pos_total / count(terms.pos_pairs).clamp(min=1)
                + neg_total / count(terms.neg_pairs).clamp(min=1))

    @abstractmethod
    def pair_terms(self, sim: Tensor, pos: Tensor, neg: Tensor) -> PairTerms:
        """sim: B x K similarities; pos, neg: B x K bool masks of candidate pairs (self-pairs removed).

        The masks are fresh for each call and owned by the hook, which may update them in place.

        Args:
            sim: B x K similarities ``emb @ ref_emb.T`` (cosines for unit-norm embeddings); the terms must be
                differentiable w.r.t. it.
            pos: B x K bool: candidate positive pairs (same label, not the anchor's own image).
            neg: B x K bool: candidate negative pairs (different label, not the anchor's own image).

        Returns:
            The sum of the terms, the count the ``"mean_active"`` reduction divides by, and the active positive
                and negative pairs.
        """

    def forward(
        self,
        emb: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        indices: Tensor | None = None,
        ref_indices: Tensor | None = None,
        count: Callable[[Tensor], Tensor] | None = None,
    ) -> LossOutput:
        """The loss of the anchors `emb` against the references (`ref_emb`, or the batch itself).

        Args:
            emb: B x D anchor embeddings (floating point, B >= 1; unit norm, so that sim is the cosine).
            labels: B integer class labels of the anchors.
            ref_emb: K x D reference embeddings (e.g. the memory's entries), on emb's device; None: the batch
                itself, its diagonal excluded. Cast to emb's dtype unless autocast is on.
            ref_labels: K integer labels of the references; given exactly when `ref_emb` is.
            indices: B integer dataset indices of the anchors. With them, a pair of an anchor and a reference of
                the same image (equal index) is excluded: an image sampled twice, or its own stored copy.
            ref_indices: K integer dataset indices of the references; given with `ref_emb` exactly when
                `indices` is, and None without `ref_emb` (then `indices` serve both sides).
            count: with several ranks, a function that sums a count over the ranks (``Dist.sum``), so that the
                reduction divides by the global number of terms (or anchors). None: this process's counts.

        Returns:
            The reduced loss (a differentiable scalar) and the active positive and negative pairs. Zero, with a
                zero gradient, when there is nothing to pair with (K = 0).

        Raises:
            ValueError: a tensor of the wrong type, device, shape or dtype; an empty batch; ref_emb without
                ref_labels (or the reverse); indices without ref_indices (or the reverse) when ref_emb is given.
        """
        ref_emb, pos, neg = _pairs(emb, labels, ref_emb, ref_labels, indices, ref_indices)
        if ref_emb.dtype != emb.dtype and not torch.is_autocast_enabled(emb.device.type):
            ref_emb = ref_emb.to(emb.dtype)
        # sim: B x K, a transposed view of the K x B product: the tall product runs faster on CPU (~15% at
        # K = 59,551, B = 64, D = 512), and the masks are built in the same K-major order so that every
        # elementwise pass walks memory contiguously
        sim = (ref_emb @ emb.T).T
        if sim.shape[1] == 0:  # nothing to pair with: zero loss, zero gradient, graph kept
            zero = torch.zeros((), dtype=torch.int64, device=emb.device)
            return LossOutput(sim.sum(), zero, zero)
        terms = self.pair_terms(sim, pos, neg)
        return LossOutput(self._reduce(terms, sim.shape[0], emb.device, count), terms.pos_pairs, terms.neg_pairs)

    def extra_repr(self) -> str:
        """The loss's settings in ``repr(loss)``."""
        return f"reduction={self.reduction!r}"

    @torch.enable_grad()
    def sim_gradient(self, emb: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor,
                     indices: Tensor | None = None, ref_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """d loss / d sim (B x K, float32) of this loss on (emb, ref_emb), computed on a detached copy (no
        effect on the training graph), and the negative-pair mask (B x K bool: different label, not the anchor's
        own image). A measurement: xbmcore.drift.staleness.

        The reduction divides by this process's counts (no `count`): with several ranks the scale differs from
        the training loss's, the shares between entries do not.

        Args:
            emb: B x D anchor embeddings.
            labels: B integer labels of the anchors.
            ref_emb: K x D reference embeddings (the memory's entries).
            ref_labels: K integer labels of the references.
            indices: B dataset indices of the anchors (excludes an anchor's own stored copies), or None.
            ref_indices: K dataset indices of the references; given exactly when `indices` is.

        Returns:
            ``(grad, negatives)``: d loss / d sim as B x K float32 (zeros when nothing is active), and the B x K
                bool mask of the negative pairs.
        """
        ref_emb, pos, neg = _pairs(emb, labels, ref_emb, ref_labels, indices, ref_indices)
        sim = (ref_emb.detach().float() @ emb.detach().float().T).T.requires_grad_(True)
        negatives = neg.clone()
        if sim.shape[1] == 0:
            return torch.zeros_like(sim), negatives
        loss = self._reduce(self.pair_terms(sim, pos, neg), sim.shape[0], sim.device)
        if not loss.requires_grad:
            return torch.zeros_like(sim), negatives
        (g,) = torch.autograd.grad(loss, sim)
        return g.detach(), negatives


class ContrastiveLoss(PairLoss):
    """Contrastive loss of XBM on similarities (Hadsell et al. 2006, as used by Wang et al. 2020).

    Positive pair (same label): term 1 - s, active when s < 1 - 1e-5 (an exact copy is not a pair).
    Negative pair: term s - margin, active when s > margin (the hinge [s - margin]_+).
    mean_active: sum / (active positive + active negative pairs); sum_over_batch: sum / B; mean_per_kind: the
    positives' sum / active positives + the negatives' sum / active negatives.
    The official code adds s instead of s - margin for an active negative: same gradient, a loss value
    larger by margin per active negative; the hinge keeps the value continuous at the margin.

    Args:
        margin: the negative margin in cosine similarity: a negative pair is active (and pushed apart) while its
            similarity exceeds it. The paper's 0.5.
        reduction: ``"mean_active"``, ``"sum_over_batch"`` or ``"mean_per_kind"`` (see `PairLoss`).
    """

    splits_by_kind = True

    def __init__(self, margin: float = 0.5, reduction: str = "mean_active") -> None:
        super().__init__(reduction)
        self.margin = float(margin)

    def pair_terms(self, sim: Tensor, pos: Tensor, neg: Tensor) -> PairTerms:
        """Terms ``1 - s`` of the active positives and ``s - margin`` of the active negatives.

        Args:
            sim: B x K similarities.
            pos: B x K bool candidate positives; narrowed in place to the active ones.
            neg: B x K bool candidate negatives; narrowed in place to the active ones.

        Returns:
            The sum of the terms, the active pairs (positive + negative) as the count, and each kind's count.
        """
        pos &= sim < 1 - POS_EPS  # active positives (in place: no new B x K mask)
        neg &= sim > self.margin  # active negatives
        # d total / d sim: -1, 0 or +1, constant. Built in int8: kernels mixing bool masks into float
        # tensors (where, masked_fill, float * bool) run an order of magnitude slower on CPU.
        coef = (neg.view(torch.int8) - pos.view(torch.int8)).to(sim.dtype)  # B x K
        n_pos, n_neg = pos.count_nonzero(), neg.count_nonzero()
        # sum_pos (1 - s) + sum_neg (s - margin) = sum(coef * s) + n_pos - margin * n_neg
        total = _sum_of_product(coef, sim) + n_pos - self.margin * n_neg
        # mean_per_kind needs the positives' part alone: one more B x K pass, only then
        pos_total = n_pos - _sum_of_product(pos.view(torch.int8).to(sim.dtype), sim) \
            if self.reduction == "mean_per_kind" else None
        return PairTerms(total, n_pos + n_neg, n_pos, n_neg, pos_total)

    def extra_repr(self) -> str:
        """The loss's settings in ``repr(loss)``."""
        return f"margin={self.margin}, {super().extra_repr()}"


class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (Wang et al. CVPR 2019), mining and weighting as in the official XBM code.

    Per anchor i, over positives P (s < 1 - 1e-5) and negatives N:
      mining:    keep negative n if s_n + epsilon > min_P s_p; keep positive p if s_p - epsilon < max_N s_n
      term_i:    1/alpha log(1 + sum_p exp(-alpha (s_p - base))) + 1/beta log(1 + sum_n exp(beta (s_n - base)))
    An anchor is active when it keeps at least one positive and one negative; inactive anchors add nothing.
    Active pairs are the kept pairs of active anchors.
    mean_active: sum of term_i / number of active anchors; sum_over_batch: sum of term_i / B.
    The log-sum-exp is evaluated stably, so a large beta cannot overflow.

    Args:
        alpha: the positives' scale (> 0): how sharply the term weighs the least similar positives.
        beta: the negatives' scale (> 0): how sharply it weighs the most similar negatives.
        base: the similarity the terms are centred on (lambda in the MS paper).
        epsilon: the mining margin: which pairs are informative enough to keep (see above).
        reduction: ``"mean_active"`` or ``"sum_over_batch"`` (see `PairLoss`).

    Raises:
        ValueError: alpha or beta <= 0, or an unknown reduction.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        reduction: str = "mean_active",
    ) -> None:
        super().__init__(reduction)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"multi-similarity alpha, beta: expected > 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.base, self.epsilon = float(alpha), float(beta), float(base), float(epsilon)

    def pair_terms(self, sim: Tensor, pos: Tensor, neg: Tensor) -> PairTerms:
        """Mining, then term_i of each active anchor, in float32 (float64 for float64 similarities).

        Args:
            sim: B x K similarities.
            pos: B x K bool candidate positives; narrowed in place to the kept pairs of active anchors.
            neg: B x K bool candidate negatives; narrowed in place likewise.

        Returns:
            The sum of term_i, the active anchors as the count, and the kept positive and negative pairs.
        """
        s = sim.to(_acc_dtype(sim))  # exp(beta * s) needs more than bfloat16
        sd = s.detach()
        pos &= sd < 1 - POS_EPS
        min_pos = sd.masked_fill(~pos, torch.inf).amin(1, keepdim=True)  # B x 1
        max_neg = sd.masked_fill(~neg, -torch.inf).amax(1, keepdim=True)  # B x 1
        neg &= sd > min_pos - self.epsilon  # s_n + epsilon > min_P s_p
        pos &= sd < max_neg + self.epsilon  # s_p - epsilon < max_N s_n
        # an anchor keeps a positive iff it keeps a negative (both say min_P < max_N + epsilon) up to
        # rounding; the explicit rule below is the official one and settles the rounding cases
        active = pos.any(1, keepdim=True) & neg.any(1, keepdim=True)  # B x 1
        pos &= active
        neg &= active
        pos_term = _log1p_sum_exp(-self.alpha * (s - self.base), pos) / self.alpha
        neg_term = _log1p_sum_exp(self.beta * (s - self.base), neg) / self.beta
        total = (pos_term + neg_term).sum()
        return PairTerms(total, active.sum(), pos.count_nonzero(), neg.count_nonzero())

    def extra_repr(self) -> str:
        """The loss's settings in ``repr(loss)``."""
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
            f"{super().extra_repr()}"
        )


class TripletLoss(PairLoss):
    """Triplet loss with the hardest positive and hardest negative of each anchor, on similarities.

    term_i = [max_N s_n - min_P s_p + margin]_+ ; 0 for an anchor without a positive or a negative.
    Active triplets are the anchors with term_i > 0; each has one active positive and one active negative
    pair, so pos_pairs = neg_pairs = active triplets.
    mean_active: sum of term_i / active triplets; sum_over_batch: sum of term_i / B.

    Args:
        margin: the required gap between the hardest positive's and the hardest negative's similarity.
        reduction: ``"mean_active"`` or ``"sum_over_batch"`` (see `PairLoss`).
    """

    def __init__(self, margin: float = 0.1, reduction: str = "mean_active") -> None:
        super().__init__(reduction)
        self.margin = float(margin)

    def pair_terms(self, sim: Tensor, pos: Tensor, neg: Tensor) -> PairTerms:
        """term_i of each anchor from its hardest positive and hardest negative.

        Args:
            sim: B x K similarities.
            pos: B x K bool candidate positives (read only).
            neg: B x K bool candidate negatives (read only).

        Returns:
            The sum of term_i, and the active triplets as the count and as both pair counts.
        """
        s = sim.to(_acc_dtype(sim))
        hardest_pos = s.masked_fill(~pos, torch.inf).amin(1)  # B; +inf without positives
        hardest_neg = s.masked_fill(~neg, -torch.inf).amax(1)  # B; -inf without negatives
        term = (hardest_neg - hardest_pos + self.margin).clamp(min=0)  # -inf (no pair) -> 0
        n = (term > 0).sum()
        return PairTerms(term.sum(), n, n, n)

    def extra_repr(self) -> str:
        """The loss's settings in ``repr(loss)``."""
        return f"margin={self.margin}, {super().extra_repr()}"


def build_loss(p: LossParams) -> PairLoss:
    """The loss named by the `loss` section of params.yaml.

    Args:
        p: the `loss` section: `name` picks the loss (contrastive, multi_similarity, triplet); `margin`,
            `ms_alpha`, `ms_beta`, `ms_base`, `ms_epsilon`, `triplet_margin` and `reduction` configure it.

    Returns:
        The configured ContrastiveLoss, MultiSimilarityLoss or TripletLoss.

    Raises:
        ValueError: an unknown loss name.
    """
    if p.name == "contrastive":
        return ContrastiveLoss(margin=p.margin, reduction=p.reduction)
    if p.name == "multi_similarity":
        return MultiSimilarityLoss(
            alpha=p.ms_alpha, beta=p.ms_beta, base=p.ms_base, epsilon=p.ms_epsilon, reduction=p.reduction
        )
    if p.name == "triplet":
        return TripletLoss(margin=p.triplet_margin, reduction=p.reduction)
    raise ValueError(f"loss.name: expected contrastive, multi_similarity or triplet, got {p.name!r}")


class XBMObjective(nn.Module):
    """The XBM objective: L(batch, batch) + weight * L(batch, memory).

    The memory part pairs each anchor with every stored entry except its own stored copies (matched by
    dataset index). It does not enqueue: the caller enqueues the batch's detached embeddings first, so that the
    memory already holds the batch (Alg. 1 of the paper; the trainer's `memory.enqueue: before`).
    With several ranks, `emb` holds this rank's anchors, `batch` the (ref_emb, ref_labels, ref_indices) of the
    whole global batch (gathered in rank order) and `count` sums a count over ranks (see PairLoss). `entries`
    (n x D) replaces the stored vectors as the memory side of the pairs (a memory of features, embedded by the
    current head: memory.store).

    Args:
        loss: the pair loss applied to both terms (`build_loss`).
        weight: w, the memory term's weight (>= 0; the paper's 1).

    Raises:
        ValueError: a negative weight.

    Attributes:
        loss (PairLoss): the pair loss of both terms.
        weight (float): the memory term's weight w.
    """

    def __init__(self, loss: PairLoss, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"memory weight: expected >= 0, got {weight}")
        self.loss, self.weight = loss, float(weight)

    def forward(
        self, emb: Tensor, labels: Tensor, indices: Tensor, memory: CrossBatchMemory | None = None,
        batch: tuple[Tensor, Tensor, Tensor] | None = None, count: Callable[[Tensor], Tensor] | None = None,
        entries: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """L(batch, batch) + weight * L(batch, memory) and the pair counts of both terms, as a dict of scalar
        tensors whose keys the Returns table lists.

        The memory term is zero (with a zero gradient) without a memory or with an empty one. The memory is only
        read: enqueue the batch first (Alg. 1) or after, as the caller decides.

        Args:
            emb: B x D unit-norm anchor embeddings (this rank's part of the batch with several ranks); the loss is
                differentiable w.r.t. them.
            labels: B integer class labels of the anchors.
            indices: B integer dataset indices of the anchors: an anchor is never paired with another copy of
                its own image, in the batch or in the memory.
            memory: the cross-batch memory the anchors are paired with; None or empty: no memory term.
            batch: with several ranks, ``(ref_emb, ref_labels, ref_indices)`` of the whole global batch
                (gathered in rank order, ref_emb differentiably): the batch term pairs the anchors with it.
                None: the batch term pairs `emb` with itself.
            count: with several ranks, the sum of a count over the ranks (``Dist.sum``), so that the reductions
                divide by global counts. None: this process's counts.
            entries: n x D embeddings that stand in for the memory's stored vectors as the memory side of the
                pairs, in the order of ``memory.get()`` (``memory.store: features``: the stored features embedded
                by the current head). None: the stored vectors.

        Returns:
            loss (Tensor): the objective L(batch, batch) + weight * L(batch, memory), a differentiable scalar:
                what the optimiser minimises.
            loss_batch (Tensor): L(batch, batch), the batch term (scalar).
            loss_memory (Tensor): L(batch, memory), the memory term before the weight (scalar; 0 without a
                memory or with an empty one).
            pos_pairs (Tensor): int64 scalar: the batch term's active positive pairs.
            neg_pairs (Tensor): int64 scalar: the batch term's active negative pairs.
            mem_pos_pairs (Tensor): int64 scalar: the memory term's active positive pairs (0 without a memory).
            mem_neg_pairs (Tensor): int64 scalar: the memory term's active negative pairs (0 without a memory).
        """
        if batch is None:
            batch = self.loss(emb, labels, indices=indices, count=count)
        else:
            ref_emb, ref_labels, ref_indices = batch
            batch = self.loss(emb, labels, ref_emb, ref_labels, indices, ref_indices, count=count)
        if memory is None or len(memory) == 0:
            zero = torch.zeros((), dtype=torch.int64, device=emb.device)
            mem = LossOutput(torch.zeros((), dtype=batch.loss.dtype, device=emb.device), zero, zero)
        else:
            feats, mem_labels, mem_indices = memory.get()
            feats = feats if entries is None else entries  # the stored features' embeddings (memory.store)
            mem = self.loss(emb, labels, feats, mem_labels, indices, mem_indices, count=count)
        return {
            "loss": batch.loss + self.weight * mem.loss,
            "loss_batch": batch.loss,
            "loss_memory": mem.loss,
            "pos_pairs": batch.pos_pairs,
            "neg_pairs": batch.neg_pairs,
            "mem_pos_pairs": mem.pos_pairs,
            "mem_neg_pairs": mem.neg_pairs,
        }

    def extra_repr(self) -> str:
        """The objective's memory weight in ``repr(objective)``."""
        return f"weight={self.weight}"


# ---------------------------------------------------------------------- helpers


def _acc_dtype(sim: Tensor) -> torch.dtype:
    return torch.float64 if sim.dtype == torch.float64 else torch.float32


def _sum_of_product(coef: Tensor, sim: Tensor) -> Tensor:
    """sum(coef * sim) without a B x K product in float32/64 (dot of the K-major buffers); low-precision
    similarities are accumulated in float32."""
    if sim.dtype not in (torch.float32, torch.float64):
        return (coef * sim).sum(dtype=torch.float32)
    return torch.dot(coef.T.reshape(-1), sim.T.reshape(-1))  # views when both are K-major, as built


def _log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """Per row, log(1 + sum_{j in mask} exp(x_j)), without overflow; 0 for an empty row. x, mask: B x K."""
    x = x.masked_fill(~mask, -torch.inf)  # exp(-inf) = 0 with a zero gradient, no NaN
    m = x.detach().amax(1, keepdim=True).clamp(min=0)  # B x 1, >= 0 so that exp(-m) <= 1
    return (m + torch.log(torch.exp(-m) + torch.exp(x - m).sum(1, keepdim=True))).squeeze(1)


def _pairs(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    indices: Tensor | None,
    ref_indices: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the inputs; return ref_emb and the positive / negative masks (B x K bool, self-pairs removed)."""
    _check_tensor("emb", emb, emb.device if isinstance(emb, Tensor) else None, ndim=2, floating=True)
    B, D = emb.shape
    if B == 0:
        raise ValueError("loss emb: expected at least one row, got shape (0, D)")
    _check_tensor("labels", labels, emb.device, shape=(B,))
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("loss ref_emb, ref_labels: expected both or neither, got only one")
    batch_ref = ref_emb is None
    if batch_ref:
        if ref_indices is not None:
            raise ValueError("loss ref_indices: expected None when ref_emb is None (indices serve both sides)")
        ref_emb, ref_labels, ref_indices = emb, labels, indices
    else:
        _check_tensor("ref_emb", ref_emb, emb.device, ndim=2, floating=True)
        if ref_emb.shape[1] != D:
            raise ValueError(f"loss ref_emb: expected K x {D} to match emb, got {tuple(ref_emb.shape)}")
        _check_tensor("ref_labels", ref_labels, emb.device, shape=(ref_emb.shape[0],))
        if (indices is None) != (ref_indices is None):
            raise ValueError("loss indices, ref_indices: expected both or neither with ref_emb, got only one")
    if indices is not None:
        _check_tensor("indices", indices, emb.device, shape=(B,))
        _check_tensor("ref_indices", ref_indices, emb.device, shape=(ref_emb.shape[0],))

    # two fresh B x K masks, combined in place (each new 15 MB buffer costs page faults on CPU)
    pos = (ref_labels[:, None] == labels[None, :]).T  # B x K, K-major like sim: same label
    if indices is not None:
        neg = (ref_indices[:, None] != indices[None, :]).T  # B x K: not the anchor's own image
    elif batch_ref:
        neg = ~torch.eye(B, dtype=torch.bool, device=emb.device)
    else:
        return ref_emb, pos, ~pos
    pos &= neg  # same label and valid
    neg.gt_(pos)  # valid and not (same and valid) = valid and different label (bool a > b is a & ~b)
    return ref_emb, pos, neg


def _check_tensor(
    name: str,
    t: object,
    device: torch.device | None,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    floating: bool = False,
) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"loss {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"loss {name}: expected a tensor on {device} (emb's device), got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"loss {name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"loss {name}: expected shape {shape}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"loss {name}: expected a floating-point tensor, got {t.dtype}")
    if not floating and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"loss {name}: expected an integer tensor, got {t.dtype}")
