"""Keeping the memory consistent with the model, and measuring how stale it is: drift compensation (SDC), the
refresh of the oldest entries and the momentum encoder against float64 references; the staleness of the memory
term's gradient and the probe's directedness and backbone drift against recomputations; exact resume."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from test_drift import Recorder
from test_trainer import Events, _params_of, make, params_with
from xbmcore.drift import AGE_NAMES, WithBackbone, staleness
from xbmcore.hooks import Hook
from xbmcore.losses import ContrastiveLoss, MultiSimilarityLoss
from xbmcore.memory import CrossBatchMemory, compensate
from xbmcore.models import EmbeddingNet
from xbmcore.trainer import Trainer


def _unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


# ---- drift compensation ----

def _compensate64(feats, at, rate, valid, sigma):
    out = feats.double().clone()
    for k in range(len(feats)):
        w = [float(torch.exp(-((feats[k].double() - at[p].double()) ** 2).sum() / (2 * sigma ** 2)))
             if valid[p] else 0.0 for p in range(len(at))]
        if sum(w) > 0:
            out[k] += sum(wp * rate[p].double() for p, wp in enumerate(w)) / sum(w)
        out[k] /= out[k].norm()
    return out


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_compensation_is_the_gaussian_weighted_mean_drift(sigma):
    feats, at = _unit(40, 8, seed=1), _unit(6, 8, seed=2)
    rate = 0.01 * torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float32)
    got = compensate(feats, at, rate, valid, sigma)
    torch.testing.assert_close(got.double(), _compensate64(feats, at, rate, valid, sigma), rtol=0, atol=2e-6)
    assert (got - feats).abs().max() > 1e-3  # the entries moved: the test can fail
    # no observation at all: nothing moves
    torch.testing.assert_close(compensate(feats, at, rate, torch.zeros(6), sigma), feats, rtol=0, atol=1e-6)


class SDC64:
    """Float64 loop of the memory with drift compensation (queue mode, K >= every batch): entries, the copies as
    written, the ring of the newest `pool` enqueued rows."""

    def __init__(self, K, pool, sigma):
        self.K, self.pool, self.sigma = K, pool, sigma
        self.entries: list[dict] = []  # oldest first
        self.ring: list[tuple] = []  # (at, rate, valid), oldest first

    def enqueue(self, feats, indices, step):
        feats = feats.double()
        newest = {}
        for k, e in enumerate(self.entries):
            newest[e["idx"]] = k
        for r in range(len(feats)):
            i = int(indices[r])
            k = newest.get(i)
            if k is not None:
                e = self.entries[k]
                self.ring.append((feats[r], (feats[r] - e["written"]) / max(step - e["step"], 1), True))
            else:
                self.ring.append((feats[r], torch.zeros_like(feats[r]), False))
        self.ring = self.ring[-self.pool:]
        obs = [(a, r) for a, r, v in self.ring if v]
        for e in self.entries:
            if obs:
                w = [float(torch.exp(-((e["feat"] - a) ** 2).sum() / (2 * self.sigma ** 2))) for a, _ in obs]
                e["feat"] = e["feat"] + sum(wp * r for wp, (_, r) in zip(w, obs)) / sum(w)
                e["feat"] = e["feat"] / e["feat"].norm()
        for r in range(len(feats)):
            self.entries.append({"feat": feats[r].clone(), "written": feats[r].clone(), "idx": int(indices[r]),
                                 "step": step})
        self.entries = self.entries[-self.K:]


def test_memory_with_compensation_equals_a_float64_loop():
    K, pool, sigma, D = 30, 8, 0.8, 6
    mem = CrossBatchMemory(K, D, num_items=20, sdc_sigma=sigma, sdc_pool=pool)
    ref = SDC64(K, pool, sigma)
    g = torch.Generator().manual_seed(0)
    base = _unit(20, D, seed=5)
    for step in range(1, 9):
        idx = torch.randperm(20, generator=g)[:5]
        feats = nn.functional.normalize(base[idx] + 0.05 * step * torch.randn(5, D, generator=g), dim=1)
        mem.enqueue(feats, idx % 4, idx, step)
        ref.enqueue(feats, idx, step)
    # ring order: slot (ptr + j) % K is the j-th oldest
    order = [(mem._ptr + j) % K for j in range(len(mem))] if len(mem) == K else list(range(len(mem)))
    got = mem.feats[order].double()
    want = torch.stack([e["feat"] for e in ref.entries])
    assert float(mem.drift_total[2]) > 5  # images came round again: observations were made
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - torch.stack([e["written"] for e in ref.entries])).abs().max() > 1e-3  # compensation moved them


def test_compensation_needs_the_item_map_and_a_valid_width():
    with pytest.raises(ValueError, match="sdc_sigma"):
        CrossBatchMemory(8, 4, sdc_sigma=0.5)
    with pytest.raises(ValueError, match="sdc_sigma"):
        CrossBatchMemory(8, 4, num_items=10, sdc_sigma=-1.0)
    with pytest.raises(ValueError, match="sdc_pool"):
        CrossBatchMemory(8, 4, num_items=10, sdc_sigma=0.5, sdc_pool=0)


# ---- refresh ----

def test_oldest_and_rewrite_by_hand():
    mem = CrossBatchMemory(6, 2, num_items=10)
    for step, idx in enumerate(([0, 1], [2, 3], [4, 5]), start=1):
        mem.enqueue(_unit(2, 2, seed=step), torch.tensor([0, 1]), torch.tensor(idx), step)
    oldest = mem.oldest(3).tolist()  # steps 1, 1, 2, 2, 3, 3: slots 0 and 1, then one of 2 and 3
    assert sorted(oldest[:2]) == [0, 1] and oldest[2] in (2, 3)
    new = _unit(2, 2, seed=9)
    mem.rewrite(torch.tensor([0, 1]), new, step=7)
    assert torch.equal(mem.feats[:2], new) and mem.steps.tolist() == [7, 7, 2, 2, 3, 3]
    assert mem.indices.tolist() == [0, 1, 2, 3, 4, 5] and mem._ptr == 0  # the ring's order is unchanged
    assert sorted(mem.oldest(2).tolist()) == [2, 3] and sorted(mem.oldest(99).tolist()[4:]) == [0, 1]


def test_refresh_leaves_out_the_slots_the_next_batch_overwrites():
    mem = CrossBatchMemory(6, 2, num_items=10)
    for step, idx in enumerate(([0, 1], [2, 3], [4, 5]), start=1):
        mem.enqueue(_unit(2, 2, seed=step), torch.tensor([0, 1]), torch.tensor(idx), step)
    # full ring, next write at slot 0: slots 0 and 1 (the oldest) are overwritten by a batch of 2
    assert sorted(mem.oldest(2, skip_next=2).tolist()) == [2, 3]
    assert sorted(mem.oldest(9, skip_next=2).tolist()) == [2, 3, 4, 5]
    mem.enqueue(_unit(2, 2, seed=7), torch.tensor([0, 1]), torch.tensor([6, 7]), 4)  # ptr -> 2
    assert sorted(mem.oldest(2, skip_next=2).tolist()) == [4, 5]


def test_refresh_re_embeds_the_oldest_entries_with_the_current_model():
    p = params_with({"refresh": 5})
    trainer, _ = make(p)
    trainer.splits.train.train = False  # the clean view: no noise, so the embeddings can be recomputed
    trainer.train_phase("warmup", 3)
    memory = trainer.init_memory()
    trainer.train_phase("xbm", 2, memory)
    before = memory.steps[: len(memory)].clone()
    later = before.clone()  # the slots the next batch overwrites are not refreshed
    later[(memory._ptr + torch.arange(p.train.batch_size)) % memory.K] = 10 ** 9
    want_slots = torch.topk(later, 5, largest=False, sorted=True).indices
    trainer._refresh(memory)
    assert memory.steps[want_slots].tolist() == [trainer.step + 1] * 5
    x = torch.stack([trainer.splits.train[int(i)][0] for i in memory.indices[want_slots]])
    model = copy.deepcopy(trainer.model).double().eval()
    with torch.no_grad():
        want = model(x.double())
    torch.testing.assert_close(memory.feats[want_slots].double(), want, rtol=0, atol=1e-5)
    others = torch.ones(len(memory), dtype=torch.bool)
    others[want_slots] = False
    assert torch.equal(memory.steps[: len(memory)][others], before[others])


# ---- momentum encoder ----

class EmaRecorder(Hook):
    def __init__(self):
        self.model, self.ema = [], []

    def on_phase_start(self, trainer):
        self.on_step(trainer)

    def on_step(self, trainer):
        self.model.append([q.detach().double().clone() for q in trainer.model.parameters()])
        self.ema.append([q.detach().double().clone() for q in trainer.state.ema.parameters()])


def test_momentum_encoder_is_the_moving_average_of_the_model_and_writes_the_entries():
    m = 0.9
    p = params_with({"momentum": m})
    trainer, _ = make(p)
    trainer.train_phase("warmup", 3)
    memory = trainer.init_memory()
    rec = EmaRecorder()
    seen = []
    objective = trainer.objective

    def spy(emb, labels, indices, mem=None):
        seen.append((copy.deepcopy(trainer.state.ema), emb.detach().clone(), indices.clone(), mem.feats.clone(),
                     mem._ptr))
        return objective(emb, labels, indices, mem)

    trainer.objective = spy
    trainer.train_phase("xbm", 4, memory, hooks=[rec])
    for a, b in zip(rec.ema[0], rec.model[0]):  # it starts as the model
        assert torch.equal(a, b)
    for t in range(1, 5):  # then ema_t = m ema_{t-1} + (1 - m) model_t, in float64
        for e, e_prev, w in zip(rec.ema[t], rec.ema[t - 1], rec.model[t]):
            torch.testing.assert_close(e, m * e_prev + (1 - m) * w, rtol=0, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(rec.ema[-1], rec.model[-1])) > 1e-4  # it lags the model
    # the stored copies of a batch are the moving average's embeddings (train mode, as the loss's), not the loss's
    ema, emb, idx, feats, ptr = seen[-1]
    B, K = len(idx), memory.K
    slots = (ptr - B + torch.arange(B)) % K
    assert not torch.allclose(feats[slots], emb, atol=1e-4)
    assert torch.equal(memory.indices[slots], idx)


# ---- staleness ----

@pytest.mark.parametrize("loss", [ContrastiveLoss(0.2), MultiSimilarityLoss()])
def test_staleness_shares_the_gradient_by_the_age_of_the_entries(loss):
    B, K, D, step = 6, 40, 8, 2500
    emb = _unit(B, D, seed=1, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    mem = CrossBatchMemory(K, D, num_items=100, dtype=torch.float32)
    feats = _unit(K, D, seed=2)
    mem_labels = torch.arange(K) % 5
    ages = torch.tensor([0, 5, 50, 500, 1500] * 8)
    for k in range(K):  # one entry per enqueue, so that each has its own age
        mem.enqueue(feats[k:k + 1], mem_labels[k:k + 1], torch.tensor([10 + k]), step=step - int(ages[k]))
    idx = torch.arange(B)
    out = staleness(loss, emb.float(), labels, idx, mem, step)
    # reference: the gradient of the float64 loss with respect to the anchors, split by entry
    sim = (emb @ feats.double().T).detach().requires_grad_(True)
    _, pos, neg = __import__("xbmcore.losses", fromlist=["_pairs"])._pairs(
        emb.detach(), labels, feats.double(), mem_labels, idx, torch.arange(10, 10 + K))
    terms = loss.pair_terms(sim, pos.clone(), neg.clone())
    (terms.total / terms.num_terms.clamp(min=1)).backward()
    g = sim.grad.abs().sum(0)
    bucket = [0 if a < 10 else 1 if a < 100 else 2 if a < 1000 else 3 for a in ages.tolist()]
    total = float(g.sum())
    for b, name in enumerate(AGE_NAMES):
        want = float(sum(g[k] for k in range(K) if bucket[k] == b)) / total
        assert out["grad_share"][name] == pytest.approx(want, abs=1e-5), name
    active = (sim.grad != 0) & neg
    want_age = float((active.sum(0).double() * ages.double()).sum() / active.sum())
    assert out["active_neg_age"] == pytest.approx(want_age, rel=1e-6)
    assert out["mean_age"] == pytest.approx(float(ages.double().mean()))
    # the split is tested: as many buckets carry gradient as in the reference (more than one)
    carrying = {bucket[k] for k in range(K) if g[k] > 0}
    assert sum(v > 0 for v in out["grad_share"].values()) == len(carrying) >= 2


def test_staleness_goes_out_with_the_drift_event_at_the_probe_steps():
    p = params_with({}, drift_probe=10, drift_every=4, drift_dts=[2, 4])
    trainer, sink = make(p)
    trainer.train_phase("warmup", 4)
    trainer.train_phase("xbm", 8, trainer.init_memory())
    events = [e for e in sink.of("drift") if e["phase"] == "xbm"]
    assert [e["step"] for e in events] == [8, 12]
    for e in events:
        share = e["staleness"]["grad_share"]
        assert sum(share.values()) == pytest.approx(1.0)
        # the memory was initialised at step 4: at step 8 no entry is 10 steps old
        assert share["0-10"] == pytest.approx(1.0) and e["staleness"]["mean_age"] <= 8


# ---- the probe: directedness, backbone ----

class TinyEmbeddingNet(EmbeddingNet):
    def __init__(self):
        body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
        super().__init__(body, 12, 16)


def test_probe_measures_the_backbone_and_how_directed_the_drift_is():
    p = params_with({}, drift_probe=20, drift_every=4, drift_dts=[2, 4])
    splits, sink = make(p)[0].splits, Events()
    torch.manual_seed(0)
    trainer = Trainer(p, TinyEmbeddingNet(), splits, sink)
    trainer.splits.train.train = False
    rec = Recorder(trainer.probe, trainer.splits.train)
    trainer.hooks.append(rec)
    feats: dict[int, np.ndarray] = {}

    class Backbone(Hook):
        def on_phase_start(self, t):
            self.on_step(t)

        def on_step(self, t):
            net = copy.deepcopy(t.model).double().eval()
            with torch.no_grad():
                feats[t.step] = WithBackbone(net)(rec.x.double())[:, 16:].numpy()

    trainer.hooks.append(Backbone())
    trainer.train_phase("warmup", 12)
    hist = {h["step"]: h for h in trainer.probe.history}
    for t in (4, 8, 12):
        Db = float(((feats[t] - feats[t - 4]) ** 2).sum(1).mean())
        assert hist[t]["D_backbone"][4] == pytest.approx(Db, rel=1e-4)
        assert hist[t]["D"][4] == pytest.approx(float(((rec.emb[t] - rec.emb[t - 4]) ** 2).sum(1).mean()), rel=1e-4)
    u = {t: rec.emb[t] - rec.emb[t - 2] for t in (4, 8, 12)}
    for t in (8, 12):
        cos = (u[t] * u[t - 4]).sum(1) / np.linalg.norm(u[t], axis=1) / np.linalg.norm(u[t - 4], axis=1)
        assert hist[t]["cos10"] == pytest.approx(float(cos.mean()), abs=1e-4)
    assert "cos10" not in hist[4]  # no earlier displacement yet
    assert any(abs(hist[t]["cos10"]) > 1e-3 for t in (8, 12))


# ---- resume ----

def test_resume_with_every_freshness_setting_is_bit_identical(tmp_path):
    p = params_with({"momentum": 0.9, "refresh": 3, "sdc_sigma": 0.5, "sdc_pool": 8})

    def run(folder, stop_at=None):
        trainer, sink = make(p)
        trainer.train_phase("warmup", 6)
        memory = trainer.init_memory()

        class Stop(Hook):
            def on_step(self, t):
                if t.step == stop_at:
                    t.stop(KeyError("cut"))

        try:
            trainer.train_phase("xbm", 10, memory, checkpoint_dir=folder, hooks=[Stop()])
        except KeyError:
            pass
        return trainer, memory

    ref, ref_mem = run(tmp_path / "ref")
    run(tmp_path / "cut", stop_at=13)
    again, mem = run(tmp_path / "cut")
    for a, b in zip(_params_of(ref.model), _params_of(again.model)):
        assert torch.equal(a, b)
    for a, b in zip(_params_of(ref.state.ema), _params_of(again.state.ema)):
        assert torch.equal(a, b)
    for name, buf in ref_mem.state_dict().items():
        assert torch.equal(buf, mem.state_dict()[name]), name
    assert ref.history == again.history


# ---- a memory of features, embedded by the current head ----

def _feature_trainer(memory: dict):
    from test_trainer import Blobs, Splits
    p = params_with({"store": "features", **memory})
    torch.manual_seed(0)
    splits = Splits(Blobs(12, 6, 1, True), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False))
    return Trainer(p, TinyEmbeddingNet(), splits, Events()), p


def test_a_memory_of_features_is_embedded_by_the_current_head_at_every_step():
    trainer, _ = _feature_trainer({})
    trainer.splits.train.train = False
    trainer.train_phase("warmup", 3)
    memory = trainer.init_memory()
    assert memory.dim == 12 == trainer.memory_dim  # the backbone's width, not the embedding's 16
    x = torch.stack([trainer.splits.train[int(i)][0] for i in memory.get()[2]])
    net = copy.deepcopy(trainer.model).double().eval()
    with torch.no_grad():
        want = net.pool(net.backbone(x.double()))
    torch.testing.assert_close(memory.get()[0].double(), want, rtol=0, atol=1e-5)
    seen = []
    objective = trainer.objective

    def spy(emb, labels, indices, mem=None, entries=None):
        seen.append((copy.deepcopy(trainer.model), mem.get()[0].clone(), entries.clone()))
        return objective(emb, labels, indices, mem, entries=entries)

    trainer.objective = spy
    trainer.train_phase("xbm", 3, memory)
    for model, stored, entries in seen:  # each step: the head of that step applied to every stored feature
        head = copy.deepcopy(model.head).double()
        with torch.no_grad():
            want = nn.functional.normalize(head(stored.double()), dim=1)
        torch.testing.assert_close(entries.double(), want, rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0][2][:5], seen[-1][2][:5], atol=1e-4)  # the same entries, another head


def test_a_memory_of_features_refuses_what_it_cannot_combine_with():
    from xbmcore.config import ParamsError
    for bad in ({"sdc_sigma": 0.5}, {"momentum": 0.9}):
        with pytest.raises((ValueError, ParamsError), match="store: features"):
            params_with({"store": "features", **bad})
    with pytest.raises(ValueError, match="memory.store: features needs a model with a backbone"):
        make(params_with({"store": "features"}))
