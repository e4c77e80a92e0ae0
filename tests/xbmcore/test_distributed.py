"""Data-parallel training on 2 gloo processes (torchrun, 127.0.0.1) against one process with the global batch."""
from __future__ import annotations

import hashlib

import pytest
import torch

from ddp_setup import TOTAL, WARMUP, XBM, Net, blob_splits, ddp_params, torchrun
from xbmcore.checkpoint import list_checkpoints
from xbmcore.events import NullSink
from xbmcore.trainer import Trainer

torch.set_num_threads(1)


def memory_hash(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + state[name].numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run (batch 8 each): both ranks' results."""
    root = tmp_path_factory.mktemp("ddp")
    out = torchrun(root / "out", root / "ckpt")
    assert out.returncode == 0, out.stdout + out.stderr
    return root, [torch.load(root / "out" / f"rank{r}.pt") for r in (0, 1)]


def test_two_ranks_reproduce_one_process_with_the_global_batch(two_ranks):
    _, (r0, r1) = two_ranks
    torch.manual_seed(0)
    one = Trainer(ddp_params(batch_size=16, nproc=1), Net(), blob_splits(), NullSink())
    one.train_phase("warmup", WARMUP)
    memory = one.init_memory()
    one.train_phase("xbm", XBM, memory)
    # Losses per step (the global loss: the ranks' partial sums added), weights after 20 XBM steps.
    assert len(r0["history"]["loss"]) == TOTAL
    torch.testing.assert_close(torch.tensor(r0["history"]["loss"]), torch.tensor(one.history["loss"]),
                               rtol=0, atol=1e-6)
    for k in ("pos_pairs", "neg_pairs", "mem_pos_pairs", "mem_neg_pairs"):
        assert r0["history"][k] == one.history[k], k
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(r0["model"][k], v, rtol=0, atol=1e-5, msg=k)
    # The memory: same entries in the same slots as one process, after the ring wrapped many times.
    mem = memory.state_dict()
    assert int(mem["fill"]) == memory.K == 18 and int(r0["memory"]["ptr"]) == int(mem["ptr"])
    for k in ("labels", "indices", "steps", "slot_of"):
        assert torch.equal(r0["memory"][k], mem[k]), k
    torch.testing.assert_close(r0["memory"]["feats"], mem["feats"], rtol=0, atol=1e-5)
    # ... and bit-identical on both ranks, as are the weights.
    assert memory_hash(r0["memory"]) == memory_hash(r1["memory"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    # Validation embedded in shards, searched once, broadcast: the same on both ranks and, up to a query whose
    # neighbours swap within float noise (1 of 20), the same as one process's.
    assert r0["evals"] == r1["evals"]
    assert [e["step"] for e in r0["evals"]] == [e["step"] for e in one.evals] == [10, 20]
    for a, b in zip(r0["evals"], one.evals):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], abs=0.05) for k in a if k.startswith("recall"))


def test_a_killed_rank_resumes_to_the_uninterrupted_result(two_ranks, tmp_path):
    _, (ref, _) = two_ranks
    killed = torchrun(tmp_path / "out", tmp_path / "ckpt", "--kill-at", str(WARMUP + 13))  # XBM checkpoint at step 15
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt" / "xbm")][-1] == 15
    again = torchrun(tmp_path / "out", tmp_path / "ckpt")
    assert again.returncode == 0, again.stdout + again.stderr
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in (0, 1))
    assert memory_hash(r0["memory"]) == memory_hash(r1["memory"]) == memory_hash(ref["memory"])
    for k in ref["model"]:
        assert torch.equal(r0["model"][k], ref["model"][k]) and torch.equal(r1["model"][k], ref["model"][k]), k
    assert r0["history"] == ref["history"]


def test_two_ranks_keep_rank_identical_memory_with_a_timm_model(tmp_path):
    """timm's test_vit, its backbone frozen in the warm-up (DDP built again when it thaws) and at half the lr."""
    pytest.importorskip("timm")
    out = torchrun(tmp_path / "out", tmp_path / "ckpt", "--timm")
    assert out.returncode == 0, out.stdout + out.stderr
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["history"]["loss"]) == TOTAL and r0["history"] == r1["history"]
    assert memory_hash(r0["memory"]) == memory_hash(r1["memory"]) and int(r0["memory"]["fill"]) == 18
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
