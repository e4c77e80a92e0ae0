"""The trainer's XBM step is Algorithm 1 of the paper: checked step by step against a float64 loop written from
its pseudo-code (tests/xbmcore/algorithm1.py), in one process and on 2 gloo ranks, in both memory modes, and
against pytorch-metric-learning's CrossBatchMemory where the two definitions agree."""
from __future__ import annotations

import pytest
import torch

import algorithm1
from ddp_setup import WARMUP, XBM, Net, torchrun
from test_trainer import Blobs, Splits, TinyNet
from xbmcore.config import Params
from xbmcore.events import NullSink
from xbmcore.memory import build_memory
from xbmcore.trainer import Trainer

torch.set_num_threads(1)
COUNTS = ("pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs")


def xbm_params(mode: str, order: str, **memory) -> Params:
    # K = 0.5 x 72 = 36 entries, batch 8: the batch does not divide K, and 10 steps wrap the ring twice.
    return Params.model_validate({
        "train": dict(batch_size=8, images_per_class=2, warmup_steps=4, xbm_steps=10, checkpoint_every=100,
                      eval_every=0, lr=3e-3, warmup_lr=3e-3, seed=0, device="cpu"),
        "memory": {"ratio": 0.5, "mode": mode, "weight": 0.5, "enqueue": order, **memory},
        "loss": {"name": "contrastive", "margin": 0.5, "reduction": "mean_active"}})


def check_against_reference(steps, history, ref, model, mode, order, weight=0.5, margin=0.5):
    """Replay the recorded steps through the reference and compare each: loss parts, pair counts, gradients of
    every parameter and the memory after the step."""
    first = len(history["loss"]) - len(steps)
    for t, rec in enumerate(steps):
        out, grads = algorithm1.step(model, rec["weights"], rec["imgs"], rec["labels"], rec["indices"], ref,
                                     weight, margin, order)
        for k in COUNTS:
            assert history[k][first + t] == out[k], (t, k)
        for k in ("loss", "loss_batch", "loss_memory"):
            assert history[k][first + t] == pytest.approx(out[k], abs=1e-6), (t, k)
        for g, want in zip(rec["grads"], grads):
            torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)
        algorithm1.compare_memory(rec["memory"], ref, mode, atol=1e-6)


@pytest.mark.parametrize("mode", ["queue", "index"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_one_process_steps_are_algorithm1(mode, order):
    torch.manual_seed(0)
    splits = Splits(Blobs(12, 6, 1, True), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False))
    trainer = Trainer(xbm_params(mode, order), TinyNet(), splits, NullSink())
    trainer.train_phase("warmup", 4)
    memory = trainer.init_memory()
    initial = set(memory.get()[2].tolist())
    ref = algorithm1.initial(memory.state_dict(), mode, memory.K)
    steps = algorithm1.record(trainer)
    trainer.train_phase("xbm", 10, memory)
    assert len(steps) == 10 and memory.K == 36
    check_against_reference(steps, trainer.history, ref, trainer.model, mode, order)
    if mode == "queue":
        assert ref.n == 36 + 80  # the ring wrapped twice, the second time mid-batch
    else:  # more distinct images than slots: the per-image memory evicted some
        assert len(initial | set(torch.cat([s["indices"] for s in steps]).tolist())) > 36 + 8


@pytest.mark.parametrize("mode", ["queue", "index"])
def test_two_ranks_steps_are_algorithm1(mode, tmp_path):
    run = torchrun(tmp_path / "out", tmp_path / "ckpt", "--mode", mode, "--record")
    assert run.returncode == 0, run.stdout + run.stderr
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["steps"]) == len(r1["steps"]) == XBM
    # One global step: the ranks' parts in rank order, the same weights before it on both ranks, and the
    # gradients DDP left on each (the global loss's) compared once.
    steps = []
    for a, b in zip(r0["steps"], r1["steps"]):
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k
        steps.append({**a, **{k: torch.cat([a[k], b[k]]) for k in ("imgs", "labels", "indices")}})
        for g, h in zip(a["grads"], b["grads"]):
            torch.testing.assert_close(g, h, rtol=0, atol=1e-7)
    K = r0["initial_memory"]["feats"].shape[0]
    assert K == 18  # a global batch of 16 does not divide it
    ref = algorithm1.initial(r0["initial_memory"], mode, K)
    check_against_reference(steps, r0["history"], ref, Net(), mode, "before", weight=1.0)
    assert len(r0["history"]["loss"]) == WARMUP + XBM


def test_memory_term_and_ring_match_pytorch_metric_learning():
    """pml's CrossBatchMemory enqueues first too, and has no batch term: its loss is our memory term. The
    definitions agree with the contrastive loss summed (pml's SumReducer) and divided by B (our sum_over_batch),
    on a memory that starts empty and never holds an image twice (pml removes only the fresh copy)."""
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory
    from pytorch_metric_learning.reducers import SumReducer

    # 48 classes x 4 images, 4 classes a batch and each class once an epoch: 5 batches draw 40 distinct images.
    splits = Splits(Blobs(48, 4, 1, True), Blobs(4, 5, 2, False), Blobs(4, 5, 3, False))
    p = xbm_params("queue", "before", size=20, ratio=1.0)
    p = Params.model_validate({**p.model_dump(), "loss": {"name": "contrastive", "margin": 0.5,
                                                          "reduction": "sum_over_batch"}})
    torch.manual_seed(0)
    trainer = Trainer(p, TinyNet(), splits, NullSink())
    memory = build_memory(p, len(splits.train), 16, torch.device("cpu"))  # K = 20: B = 8 does not divide it
    seen = []
    objective = trainer.objective

    def spy(emb, labels, indices, mem=None):
        seen.append((emb.detach().clone(), labels.clone(), indices.clone()))
        return objective(emb, labels, indices, mem)

    trainer.objective = spy
    steps = algorithm1.record(trainer)
    trainer.train_phase("xbm", 5, memory)
    indices = torch.cat([s[2] for s in seen])
    assert len(set(indices.tolist())) == 40  # no image twice

    peer = CrossBatchMemory(ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity(),
                                            reducer=SumReducer()), embedding_size=16, memory_size=20)
    peer = peer.double()
    for t, (emb, labels, _) in enumerate(seen):
        loss = peer(emb.double(), labels)
        assert trainer.history["loss_memory"][t] == pytest.approx(loss.item() / 8, abs=1e-6), t
        ring = steps[t]["memory"]
        fill = int(ring["fill"])
        assert fill == (20 if peer.has_been_filled else peer.queue_idx)
        assert int(ring["ptr"]) == peer.queue_idx
        torch.testing.assert_close(ring["feats"][:fill].double(), peer.embedding_memory[:fill], rtol=0, atol=0)
        assert torch.equal(ring["labels"][:fill], peer.label_memory[:fill])
    assert pml.__version__ and peer.has_been_filled  # the ring wrapped
