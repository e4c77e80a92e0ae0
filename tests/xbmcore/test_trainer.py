"""Trainer: phases, enqueue order, exact resume, NaN handling, signals, devices -- on a tiny problem on the CPU."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbmcore.checkpoint import list_checkpoints, load_checkpoint
from xbmcore.config import Params
from xbmcore.hooks import Hook
import xbmcore.checkpoint as checkpoint_module
from xbmcore.device import resolve_device
from xbmcore.hooks import TrainingStopped
from xbmcore.memory import build_memory
from xbmcore.trainer import NonFiniteLossError, Trainer

torch.set_num_threads(1)


class Blobs(torch.utils.data.Dataset):
    """C classes of 3 x 8 x 8 images: a fixed random pattern per class plus noise (train: fresh noise per draw,
    from the global RNG, like an augmentation)."""

    def __init__(self, num_classes: int, per_class: int, seed: int, train: bool):
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(num_classes, 3, 8, 8, generator=g)
        self.labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
        self.base = self.protos[self.labels] + 0.8 * torch.randn(len(self.labels), 3, 8, 8, generator=g)
        self.num_classes, self.train = num_classes, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.base[i]
        if self.train:
            x = x + 0.3 * torch.randn_like(x)
        return x, int(self.labels[i]), i


@dataclass
class Splits:
    train: Blobs
    val: Blobs
    test: Blobs
    query: None = None
    gallery: None = None


class TinyNet(nn.Module):
    embedding_dim = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


class Events:
    def __init__(self):
        self.events = []

    def emit(self, e):
        self.events.append(e)

    def close(self):
        pass

    def of(self, kind):
        return [e for e in self.events if e["kind"] == kind]


def make(params: Params, seed: int = 0):
    torch.manual_seed(seed)
    splits = Splits(Blobs(12, 6, 1, True), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False))
    sink = Events()
    return Trainer(params, TinyNet(), splits, sink), sink


def params(**train) -> Params:
    t = dict(batch_size=8, images_per_class=2, warmup_steps=6, xbm_steps=10, checkpoint_every=5, eval_every=0,
             lr=3e-3, warmup_lr=3e-3, seed=0, device="cpu")
    t.update(train)
    return Params.model_validate({"train": t, "memory": {"ratio": 0.5}, "eval": {"recall_at": [1, 2]}})


def test_warmup_reduces_the_loss():
    trainer, sink = make(params(warmup_steps=120))
    trainer.train_phase("warmup", 120)
    steps = sink.of("step")
    assert [e["step"] for e in steps] == list(range(1, 121))
    assert all(e["phase"] == "warmup" and e["memory_fill"] == 0 and e["loss_memory"] == 0 for e in steps)
    first = np.mean([e["loss"] for e in steps[:20]])
    last = np.mean([e["loss"] for e in steps[-20:]])
    assert last < 0.6 * first, (first, last)
    assert trainer.history["step"] == list(range(1, 121))


def params_with(memory: dict, **train) -> Params:
    p = params(**train).model_dump()
    p["memory"].update(memory)
    return Params.model_validate(p)


@pytest.mark.parametrize("order", ["before", "after"])
def test_when_the_batch_joins_the_memory(order):
    p = params_with({"enqueue": order})
    trainer, sink = make(p)
    memory = build_memory(p, len(trainer.splits.train), 16, torch.device("cpu"))  # K = 36, empty
    seen = []
    objective = trainer.objective

    def spy(emb, labels, indices, mem=None):
        # What the loss sees: the memory with this step's batch (before) or without it (after).
        seen.append((len(mem), mem.get()[2].clone(), emb.detach().clone(), indices.clone()))
        return objective(emb, labels, indices, mem)

    trainer.objective = spy
    trainer.train_phase("xbm", 3, memory)
    steps = sink.of("step")
    assert [e["memory_size"] for e in steps] == [8, 16, 24]
    if order == "before":
        # Step k's loss sees the batches of steps 1..k, its own included: already at step 1 each anchor meets
        # the other 7 images of its batch in the memory (2 per class: 1 positive, 6 negatives).
        assert [s[0] for s in seen] == [8, 16, 24]
        assert torch.equal(seen[0][1], seen[0][3])
        assert steps[0]["mem_pos_pairs"] + steps[0]["mem_neg_pairs"] > 0
    else:
        # Step k's loss sees the batches of steps 1..k-1, never its own: no memory pairs at step 1.
        assert [s[0] for s in seen] == [0, 8, 16]
        assert steps[0]["mem_pos_pairs"] == 0 and steps[0]["mem_neg_pairs"] == 0 and steps[0]["loss_memory"] == 0
    assert torch.equal(memory.get()[2], torch.cat([s[3] for s in seen]))
    # The stored copy is the embedding the loss used (before the optimiser step), written at its step.
    feats, _, idx = memory.get()
    assert torch.equal(feats[16:24], seen[2][2]) and torch.equal(idx[16:24], seen[2][3])
    assert memory.steps[:24].tolist() == [1] * 8 + [2] * 8 + [3] * 8


def test_memory_init_embeds_a_seeded_random_subset():
    p = params()
    a, _ = make(p)
    a.splits.train.train = False  # no noise, so the stored embeddings can be recomputed below
    m1 = a.init_memory()
    b, _ = make(p)
    m2 = b.init_memory()
    N = len(a.splits.train)
    assert len(m1) == m1.K == round(0.5 * N)
    assert torch.equal(m1.get()[2], m2.get()[2])  # same seed, same subset
    assert len(set(m1.get()[2].tolist())) == m1.K  # distinct images
    x = torch.stack([a.splits.train[i][0] for i in m1.get()[2].tolist()])
    a.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m1.get()[0], a.model(x), rtol=0, atol=1e-6)
    assert torch.equal(m1.get()[1], torch.as_tensor(a.splits.train.labels)[m1.get()[2]])


def _params_of(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def _run_xbm(tmp_path, stop_at=None, eval_every=0):
    """Warm-up 6 steps, memory init, XBM 10 steps with checkpoints every 5; optionally interrupted."""
    p = params(eval_every=eval_every)
    trainer, sink = make(p)
    trainer.train_phase("warmup", 6)
    memory = trainer.init_memory()

    def on_eval(step, metrics):
        if step == stop_at:
            raise KeyError("interrupted")

    try:
        trainer.train_phase("xbm", 10, memory, checkpoint_dir=tmp_path, on_eval=on_eval)
    except KeyError:
        return trainer, memory, sink
    return trainer, memory, sink


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    ref, ref_mem, _ = _run_xbm(tmp_path / "ref")
    # XBM steps are 7..16; interrupted at step 12 (periodic checkpoint at 10, the hook's exception writes 12).
    _run_xbm(tmp_path / "cut", stop_at=12, eval_every=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [10, 12]
    # As a fresh process would: another model init, the same warm-up, a fresh memory; the phase resumes at 12.
    p = params()
    trainer, sink = make(p, seed=123)
    trainer.train_phase("warmup", 6)  # same warm-up (same seed inside the Trainer's own streams)
    memory = trainer.init_memory()
    trainer.train_phase("xbm", 10, memory, checkpoint_dir=tmp_path / "cut")
    assert sink.of("phase")[-1]["resumed"] is True
    assert [e["step"] for e in sink.of("step")][-4:] == list(range(13, 17))
    for a, b in zip(_params_of(ref.model), _params_of(trainer.model)):
        assert torch.equal(a, b)
    for name, buf in ref_mem.state_dict().items():
        assert torch.equal(buf, memory.state_dict()[name]), name
    assert trainer.history == ref.history  # the curves are continuous and identical
    assert trainer.optimizer.state_dict()["state"][0]["step"] == ref.optimizer.state_dict()["state"][0]["step"]


def test_evaluation_does_not_change_training(tmp_path):
    a, _, _ = _run_xbm(tmp_path / "a", eval_every=0)
    b, _, sink = _run_xbm(tmp_path / "b", eval_every=3)
    assert len(sink.of("eval")) == 5  # steps 3, 6 (warm-up) and 9, 12, 15
    for x, y in zip(_params_of(a.model), _params_of(b.model)):
        assert torch.equal(x, y)


def poison(trainer, at_step: int) -> None:
    """Make the loss of one step NaN."""
    objective = trainer.objective

    def poisoned(emb, labels, indices, mem=None):
        out = objective(emb, labels, indices, mem)
        if trainer.step + 1 == at_step:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.objective = poisoned


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, sink = make(params())
    poison(trainer, at_step=8)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_phase("warmup", 10, checkpoint_dir=tmp_path)
    msg = str(err.value)
    assert "loss is nan at step 8" in msg and "step_00000005.pt" in msg and "train.warmup_lr" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert load_checkpoint(tmp_path / "step_00000005.pt")["step"] == 5
    assert trainer.step == 7
    assert sink.of("end")[-1]["status"] == "failed"


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    p = params(eval_every=3)
    trainer, sink = make(p)
    with pytest.raises(TrainingStopped) as err:
        trainer.train_phase("warmup", 10, checkpoint_dir=tmp_path,
                            on_eval=lambda step, m: os.kill(os.getpid(), signal.SIGTERM))
    assert err.value.signum == signal.SIGTERM
    assert trainer.step == 3 and [s for s, _ in list_checkpoints(tmp_path)] == [3]
    end = sink.of("end")[-1]
    assert end["status"] == "stopped" and "SIGTERM" in end["message"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the phase


def test_stale_checkpoints_are_not_resumed(tmp_path, caplog):
    trainer, _ = make(params())
    trainer.train_phase("warmup", 5, checkpoint_dir=tmp_path)
    other, sink = make(params(warmup_lr=1e-3))  # another lr: the checkpoint does not continue this run
    with caplog.at_level(logging.WARNING, logger="xbmcore.trainer"):
        other.train_phase("warmup", 5, checkpoint_dir=tmp_path)
    assert any("starts over" in r.message for r in caplog.records)
    assert sink.of("phase")[0]["resumed"] is False
    assert [e["step"] for e in sink.of("step")] == [1, 2, 3, 4, 5]


def test_sum_over_batch_with_a_memory_warns_of_the_scale(caplog):
    p = params()
    p = p.model_copy(update={"loss": p.loss.model_copy(update={"reduction": "sum_over_batch"})})
    trainer, _ = make(p)
    memory = build_memory(p, len(trainer.splits.train), 16, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="xbmcore.trainer"):
        trainer.train_phase("warmup", 2)
        assert not caplog.records  # no memory: nothing to warn of
        trainer.train_phase("xbm", 2, memory)
    assert any(f"K/B = {memory.K / 8:.0f} times" in r.message and "mean_active" in r.message
               for r in caplog.records)


def test_checkpoints_of_other_code_are_not_resumed(tmp_path, monkeypatch):
    trainer, _ = make(params())
    trainer.train_phase("warmup", 5, checkpoint_dir=tmp_path / "a")
    same, sink = make(params())
    same.train_phase("warmup", 5, checkpoint_dir=tmp_path / "a")
    assert sink.of("phase")[0]["resumed"] is True  # same params, same code: resumed
    trainer, _ = make(params())
    trainer.train_phase("warmup", 5, checkpoint_dir=tmp_path / "b")
    fingerprint = checkpoint_module.code_fingerprint()
    monkeypatch.setattr(checkpoint_module, "code_fingerprint", lambda: "edited" + fingerprint[6:])
    edited, sink = make(params())
    edited.train_phase("warmup", 5, checkpoint_dir=tmp_path / "b")
    assert sink.of("phase")[0]["resumed"] is False
    assert [e["step"] for e in sink.of("step")] == [1, 2, 3, 4, 5]


def test_code_fingerprint_covers_the_library_sources(tmp_path, monkeypatch):
    lib = tmp_path / "xbmcore"
    (lib / "data").mkdir(parents=True)
    (lib / "checkpoint.py").write_text("x = 1\n")
    (lib / "data" / "prepare.py").write_text("y = 2\n")
    monkeypatch.setattr(checkpoint_module, "__file__", str(lib / "checkpoint.py"))

    def fingerprint():
        checkpoint_module.code_fingerprint.cache_clear()
        return checkpoint_module.code_fingerprint()

    try:
        a = fingerprint()
        assert fingerprint() == a
        (lib / "data" / "prepare.py").write_text("y = 3\n")  # a file in a subpackage
        assert fingerprint() != a
    finally:
        monkeypatch.undo()
        checkpoint_module.code_fingerprint.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train.device: 'cuda'.*no CUDA GPU.*train.device=cpu"):
        make(params(device="cuda"))
    assert resolve_device("auto").type == "cpu"


def test_phase_arguments_are_checked():
    trainer, _ = make(params())
    with pytest.raises(ValueError, match="needs a memory"):
        trainer.train_phase("xbm", 1)
    with pytest.raises(ValueError, match="takes no memory"):
        trainer.train_phase("baseline", 1, build_memory(params(), 72, 16, torch.device("cpu")))


def test_resumed_phase_says_from_which_step_it_continues(tmp_path):
    _run_xbm(tmp_path / "cut", stop_at=12, eval_every=2)  # checkpoints at 10 and 12
    trainer, sink = make(params(), seed=5)
    trainer.train_phase("warmup", 6)
    fresh = sink.of("phase")[-1]
    assert (fresh["resumed"], fresh["start_step"], fresh["resume_from"]) == (False, 0, 0)
    trainer.train_phase("xbm", 10, trainer.init_memory(), checkpoint_dir=tmp_path / "cut")
    resumed = sink.of("phase")[-1]
    assert (resumed["resumed"], resumed["start_step"], resumed["resume_from"]) == (True, 6, 12)


class Recorder(Hook):
    """A caller's hook: what it saw, in order."""

    def __init__(self):
        self.calls = []

    def on_phase_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_step(self, trainer):
        trainer.flush()
        self.calls.append(("step", trainer.step, trainer.history["step"][-1]))

    def on_phase_end(self, trainer, error):
        self.calls.append(("end", trainer.step, type(error).__name__ if error else None))


def test_hooks_see_every_step_and_the_phase_end():
    trainer, _ = make(params())
    rec = Recorder()
    trainer.hooks.append(rec)
    trainer.train_phase("warmup", 3)
    assert rec.calls == [("start", 0), ("step", 1, 1), ("step", 2, 2), ("step", 3, 3), ("end", 3, None)]
    objective = trainer.objective

    def fails(emb, labels, indices, mem=None):
        raise ZeroDivisionError("in the loss")

    trainer.objective = fails
    with pytest.raises(ZeroDivisionError):
        trainer.train_phase("warmup", 2)
    assert rec.calls[-2:] == [("start", 3), ("end", 3, "ZeroDivisionError")]
    trainer.objective = objective


def _strip_timing(events):
    return [{k: v for k, v in e.items() if k not in ("time", "images_per_s", "path")} for e in events]


def test_log_every_reads_in_blocks_and_changes_nothing_else(tmp_path):
    a, a_mem, a_sink = _run_xbm(tmp_path / "a")
    p = params(log_every=4)
    b, b_sink = make(p)
    b.train_phase("warmup", 6)
    b_mem = b.init_memory()
    b.train_phase("xbm", 10, b_mem, checkpoint_dir=tmp_path / "b")
    for x, y in zip(_params_of(a.model), _params_of(b.model)):
        assert torch.equal(x, y)
    assert a.history == b.history
    assert _strip_timing(a_sink.events) == _strip_timing(b_sink.events)


def test_nan_with_deferred_reads_stops_at_the_read_without_a_checkpoint_of_it(tmp_path):
    trainer, sink = make(params(log_every=4, checkpoint_every=4))
    poison(trainer, at_step=6)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 6"):
        trainer.train_phase("warmup", 10, checkpoint_dir=tmp_path)
    # Read at step 8 (steps 5..8), before step 8's optimiser step: 2 steps ran past the NaN, none is saved.
    assert trainer.step == 7 and [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert [e["step"] for e in sink.of("step")] == [1, 2, 3, 4, 5]


def test_a_batch_with_no_active_pair_takes_no_optimiser_step():
    trainer, _ = make(params())
    objective = trainer.objective

    def nothing_active(emb, labels, indices, mem=None):
        out = objective(emb, labels, indices, mem)
        zero = out["pos_pairs"] * 0
        return {**out, "loss": out["loss"] * 0, "pos_pairs": zero, "neg_pairs": zero}

    trainer.train_phase("warmup", 1)
    before = _params_of(trainer.model)
    trainer.objective = nothing_active
    trainer.train_phase("warmup", 2)
    assert trainer.step == 3
    for x, y in zip(before, _params_of(trainer.model)):
        assert torch.equal(x, y)  # Adam's weight decay would have moved them
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 1


def test_the_step_record_is_the_one_list_of_fields():
    from pipeline.tracking import STEP_METRICS
    from xbmcore.events import HISTORY_FIELDS, STEP_FIELDS, StepRecord
    import dataclasses

    names = [f.name for f in dataclasses.fields(StepRecord)]
    assert list(STEP_FIELDS) == names[1:]
    assert set(HISTORY_FIELDS) == set(names) - {"memory_size", "images_per_s"}  # a size and a timing
    assert set(STEP_METRICS) == set(names) - {"step", "phase", "memory_size"}
    trainer, sink = make(params())
    trainer.train_phase("warmup", 2)
    assert set(sink.of("step")[0]) == {"kind", "time", "step", *STEP_FIELDS}
    assert isinstance(sink.of("step")[0]["pos_pairs"], int)
    assert trainer.history.keys() == set(HISTORY_FIELDS)


def test_a_checkpoint_of_another_nproc_is_refused_with_what_to_do(tmp_path):
    trainer, _ = make(params())
    trainer.train_phase("warmup", 5, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "step_00000005.pt")
    state["nproc"] = 2
    torch.save(state, tmp_path / "step_00000005.pt")
    other, _ = make(params())
    with pytest.raises(ValueError, match=r"of 2 process\(es\), this run has 1.*-S train.nproc=2.*delete"):
        other.train_phase("warmup", 5, checkpoint_dir=tmp_path)


def test_one_state_starts_several_runs_alike():
    """Loading a state must not alias it: two runs from one in-memory warm-up state train identically (torch's
    optimizer would otherwise update the state's Adam moments in place during the first run)."""
    first, _ = make(params())
    first.train_phase("warmup", 4)
    warm = first.state_dict()
    runs = []
    for _ in range(2):
        trainer, _ = make(params())
        trainer.load_state_dict(warm)
        trainer.train_phase("xbm", 3, trainer.init_memory())
        runs.append([p.detach().clone() for p in trainer.model.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
