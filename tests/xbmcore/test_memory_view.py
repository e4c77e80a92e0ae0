"""The memory view: each anchor's hardest memory negatives against a brute-force float64 top-k from
the saved memory and model, the ages and super-class shares, and training bit-identical with the view on or off."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from test_trainer import make, params
from xbmcore.hooks import Hook
from xbmcore.memory_view import AGE_EDGES, memory_view

VIEW = dict(memory_view_every=4, memory_view_k=3, memory_view_anchors=5)


class Saver(Hook):
    """Saves the model and the memory at every step (what the brute force recomputes the view from)."""

    def __init__(self):
        self.saved = {}

    def on_step(self, trainer):
        m = trainer.state.memory
        self.saved[trainer.step] = (copy.deepcopy(trainer.model).double().eval(),
                                    *(b.clone() for b in m.get()), m.steps[: len(m)].clone())


def brute_force(model, x, labels, feats, mem_labels, mem_indices, mem_steps, step, k):
    with torch.no_grad():
        a = model(x.double())
    sim = (a @ feats.double().T).numpy()
    out = []
    for i in range(len(a)):
        js = [j for j in np.argsort(-sim[i], kind="stable") if mem_labels[j] != labels[i]][:k]
        out.append([(int(mem_indices[j]), float(sim[i, j]), int(step - mem_steps[j])) for j in js])
    return out


@pytest.mark.parametrize("probe", [0, 6])
def test_the_view_equals_a_brute_force_top_k_from_the_saved_memory_and_model(probe):
    trainer, sink = make(params(drift_probe=probe, drift_every=2, drift_dts=[2], **VIEW))
    trainer.splits.train.train = False  # one clean view: the brute force sees the anchors as the trainer does
    trainer.train_phase("warmup", 4)
    saver = Saver()
    trainer.train_phase("xbm", 10, trainer.init_memory(), hooks=[saver])
    views = sink.of("memory_view")
    assert [e["step"] for e in views] == [8, 12, 14]  # every 4 steps of the xbm phase, and its end
    for ev in views:
        model, feats, mem_labels, mem_indices, mem_steps = saver.saved[ev["step"]]
        items = [a["index"] for a in ev["anchors"]]
        assert len(items) == 5 and items == sorted(items)
        if probe:
            assert items == trainer.probe.items[:5].tolist()
        x = torch.stack([trainer.splits.train[i][0] for i in items])
        labels = trainer.splits.train.labels[items]
        want = brute_force(model, x, labels, feats, mem_labels, mem_indices, mem_steps, ev["step"], 3)
        for a, w in zip(ev["anchors"], want):
            got = [(n["index"], n["sim"], n["age"]) for n in a["negatives"]]
            assert [g[1] for g in got] == pytest.approx([s for _, s, _ in w], abs=1e-5)
            assert [g[0] for g in got] == [i for i, _, _ in w]
            assert [g[2] for g in got] == [t for _, _, t in w]
            assert all(n["label"] != a["label"] and n["same_super"] is None for n in a["negatives"])
            assert a["super"] is None
        assert ev["age_edges"] == list(AGE_EDGES) and sum(ev["age_hist"]) == ev["active_negatives"] > 0
        q = ev["age_quantiles"]
        assert q["p10"] <= q["p50"] <= q["p90"] and ev["super_share"] is None
        assert ev["memory_size"] == len(feats)


def test_training_is_bit_identical_with_the_view_on_or_off():
    runs = []
    for every in (0, 2):
        trainer, sink = make(params(memory_view_every=every, drift_probe=6, drift_every=2, drift_dts=[2]))
        trainer.train_phase("warmup", 4)
        trainer.train_phase("xbm", 6, trainer.init_memory())
        assert [e["step"] for e in sink.of("memory_view")] == ([6, 8, 10] if every else [])
        runs.append([p.detach().clone() for p in trainer.model.state_dict().values()]
                    + [trainer.state.memory.feats.clone()] + [torch.tensor(trainer.history["loss"])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_ages_active_negatives_and_super_class_shares_by_hand():
    # 2 anchors, 5 entries; anchor 0 (label 0, super 0), anchor 1 (label 1, super 1).
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    entries = torch.tensor([[0.9, 0.1], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    entries = entries / entries.norm(dim=1, keepdim=True)
    mem_labels = torch.tensor([2, 3, 1, 0, 4])
    mem_indices = torch.tensor([10, 11, 12, 13, 14])
    mem_steps = torch.tensor([95, 50, 99, 1, 0])
    supers = np.full(15, -1)
    supers[[0, 1]] = [0, 1]
    supers[10:15] = [0, 1, 1, 0, 0]
    v = memory_view(anchors, torch.tensor([0, 1]), torch.tensor([0, 1]), entries, mem_labels, mem_indices,
                    mem_steps, step=100, k=2, loss=None, supers=supers)
    a0, a1 = v["anchors"]
    assert [n["index"] for n in a0["negatives"]] == [10, 11] and [n["age"] for n in a0["negatives"]] == [5, 50]
    assert [n["same_super"] for n in a0["negatives"]] == [True, False] and a0["super"] == 0
    assert [n["index"] for n in a1["negatives"]] == [11, 10]  # entry 12 is its own label
    # active (no loss: sim > 0): anchor 0 -> 10, 11; anchor 1 -> 11, 10 (13 has sim 0)
    assert v["active_negatives"] == 4 and v["super_share"] == 0.5 and v["topk_super_share"] == 0.5
    assert v["age_hist"][0] == 2 and v["age_hist"][AGE_EDGES.index(50)] == 2


def test_a_memory_of_features_is_viewed_through_the_current_head():
    from test_freshness import TinyEmbeddingNet
    from test_trainer import Blobs, Events, Splits
    from xbmcore.config import Params
    from xbmcore.trainer import Trainer

    p = params(drift_probe=6, drift_every=2, drift_dts=[2], **VIEW).model_dump()
    p["memory"]["store"] = "features"
    torch.manual_seed(0)
    sink = Events()
    trainer = Trainer(Params.model_validate(p), TinyEmbeddingNet(),
                      Splits(Blobs(12, 6, 1, False), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False)), sink)
    trainer.train_phase("warmup", 4)
    saver = Saver()
    trainer.train_phase("xbm", 4, trainer.init_memory(), hooks=[saver])
    (ev,) = sink.of("memory_view")  # step 8: a probe step, so the probe's [embedding | features] is reused
    net, feats, mem_labels, mem_indices, mem_steps = saver.saved[8]
    with torch.no_grad():
        entries = net.embed_features(feats.double())
    items = [a["index"] for a in ev["anchors"]]
    x = torch.stack([trainer.splits.train[i][0] for i in items])
    want = brute_force(net, x, trainer.splits.train.labels[items], entries, mem_labels, mem_indices, mem_steps, 8, 3)
    for a, w in zip(ev["anchors"], want):
        assert [n["index"] for n in a["negatives"]] == [i for i, _, _ in w]
        assert [n["sim"] for n in a["negatives"]] == pytest.approx([s for _, s, _ in w], abs=1e-5)


def test_quantiles_from_counts_equal_numpys():
    from xbmcore.memory_view import quantiles_of_counts

    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 1000):
        ages = rng.integers(0, 50, size)
        got = quantiles_of_counts(np.bincount(ages, minlength=50), [0.1, 0.5, 0.9])
        assert got == pytest.approx(np.quantile(ages, [0.1, 0.5, 0.9]).tolist())
    assert quantiles_of_counts(np.zeros(3, int), [0.5]) == [None]


def test_anchors_in_chunks_give_the_same_view(monkeypatch):
    import xbmcore.memory_view as mv
    from xbmcore.losses import build_loss
    from xbmcore.config import Params

    g = torch.Generator().manual_seed(1)
    anchors = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1)
    entries = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    args = (anchors, torch.arange(9) % 4, torch.arange(9), entries, torch.arange(40) % 5, torch.arange(100, 140),
            torch.randint(0, 30, (40,), generator=g), 30, 4)
    kw = dict(loss=build_loss(Params().loss), supers=np.arange(140) % 3, show=5)
    whole = mv.memory_view(*args, **kw)
    monkeypatch.setattr(mv, "CHUNK_ELEMENTS", 80)  # 2 anchors per chunk
    chunked = mv.memory_view(*args, **kw)
    sims = [n.pop("sim") for v in (whole, chunked) for a in v["anchors"] for n in a["negatives"]]
    assert sims[:20] == pytest.approx(sims[20:], abs=1e-12)  # float64 products of other shapes: the last bits
    assert chunked == whole
    assert whole["active_negatives"] > 0 and len(whole["anchors"]) == 5
