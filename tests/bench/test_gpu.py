"""bench.gpu: the quick mode end to end on the CPU (so the GPU script cannot rot between lent GPUs), its figures
recomputed another way (the kNN and the end-to-end test metrics against float64 brute force, the step timings'
derived values from their rounds), and its exact kNN against float64 references on hard cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu
from bench.evaluate import make_embeddings
from reference64 import metrics_float64, recall_float64

ROOT = Path(__file__).resolve().parents[2]


# Runs `python -m bench.gpu ARGS...` with the end-to-end section's test embeddings saved on the side to RECORD
# (xbmcore.evaluate.embed_split wrapped): what the test metrics it reports must be computed from.
RECORDING = """
import sys
import numpy as np
import xbmcore.evaluate as ev
from bench import gpu

record, argv = sys.argv[1], sys.argv[2:]
embed_split = ev.embed_split

def recorded(model, splits, which, *args, **kwargs):
    q, ql, g, gl = embed_split(model, splits, which, *args, **kwargs)
    if which == "test":
        np.savez(record, query=q, labels=ql, own_gallery=g is None)
    return q, ql, g, gl

ev.embed_split = recorded
sys.exit(gpu.main(argv))
"""


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of `python -m bench.gpu --quick` on the CPU, as a user runs it (its test embeddings recorded):
    (JSON file, stdout lines, the recorded test embeddings)."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out, record = tmp / "quick.json", tmp / "test_embeddings.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RECORDING, str(record), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(out.read_text()), lines, dict(np.load(record))


def test_quick_runs_every_section(quick):
    result, lines, _ = quick
    status = {name: r["status"] for name, r in result["sections"].items()}
    assert status == {"env": "ok", "train_step": "ok", "data_cache": "skipped", "knn": "ok", "end_to_end": "ok"}
    assert result["sections"]["data_cache"]["reason"]
    assert lines[-1]["done"] is True and lines[-1]["failed_sections"] == []
    # JSON lines as it goes: every section printed its own line before the end.
    assert [ln["section"] for ln in lines if "status" in ln and "section" in ln] == list(gpu.EXPECTED_S)
    assert result["meta"]["quick"] is True and result["meta"]["device"] == "cpu"
    assert "targets" not in result  # they hold for the full sizes on a GPU only


def test_quick_env(quick):
    env = quick[0]["sections"]["env"]
    assert env["ok_checks"] and env["xbmcore_imports"]
    assert env["bf16_autocast"]["matmul_dtype"] == "torch.bfloat16"
    # The same seeded matrix, its bfloat16 product against float64: the error it reports is bfloat16's (8 bits:
    # ~1e-3 relative), not float32's (~1e-7); within 5%, as another thread count may sum in another order.
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mm = a @ a
    exact = a.double() @ a.double()
    err = float((mm.double() - exact).norm() / exact.norm())
    assert env["bf16_autocast"]["matmul_rel_error"] == pytest.approx(err, rel=5e-2)
    assert 1e-4 < env["bf16_autocast"]["matmul_rel_error"] < 2e-2
    assert 1e-4 < env["bf16_autocast"]["conv_rel_error"] < 2e-2  # a convolution of bfloat16 inputs, too
    assert env["channels_last"]["output_channels_last"]
    assert "version" in env["packages"]["faiss"] and "version" in env["packages"]["pydantic"]


def test_quick_train_step(quick):
    ts = quick[0]["sections"]["train_step"]
    sizes = gpu.QUICK
    groups = {(g["precision"], g["batch"]): g for g in ts["groups"]}
    assert set(groups) == {(p, b) for p in gpu.PRECISIONS for b in sizes.batches}
    D, K = sizes.embedding_dim, sizes.memory_K
    half = 5e-4  # the rounds are rounded to 1e-3 ms
    for (precision, B), g in groups.items():
        c = g["configs"]
        assert set(c) == {"none", "memory_float32", "memory_bfloat16"}
        for rec in c.values():
            rounds = np.asarray(rec["ms_per_step_rounds"], dtype=np.float64)
            assert len(rounds) == sizes.rounds and (rounds > 0).all()
            # The step time is the median of its rounds (odd: one of them), images/s its batch over it.
            assert rec["ms_per_step"] == pytest.approx(np.median(rounds), abs=2 * half)
            # images/s is rounded to 0.1 and the step time to 1e-3 ms: the recomputed rate can differ by both.
            rate = B / (rec["ms_per_step"] / 1e3)
            assert abs(rec["images_per_s"] - rate) <= 0.05 + rate * half / (rec["ms_per_step"] - half) + 1e-9
            assert rec["peak_bytes"] is None  # no allocator statistics on the CPU
        none = np.asarray(c["none"]["ms_per_step_rounds"], dtype=np.float64)
        for dtype in gpu.MEMORY_DTYPES:
            m = c[f"memory_{dtype}"]
            assert m["memory_K"] == K
            # The memory's cost, recomputed in float64 from the rounds: the median over rounds of the paired
            # ratio, within what the rounding of the rounds (and of the cost to 1e-4) can move it.
            mem = np.asarray(m["ms_per_step_rounds"], dtype=np.float64)
            cost = float(np.median(mem / none)) - 1
            tol = (1 + cost) * (half / mem.min() + half / none.min()) + 5e-5
            assert m["cost_vs_none"] == pytest.approx(cost, abs=tol)
            # The XBM part of the step with memory: cost / (1 + cost) of the unrounded cost, rounded to 1e-4; from
            # the reported cost (itself rounded to 1e-4) it can move by 5e-5 / (1 + cost)^2 more.
            reported = m["cost_vs_none"]
            share_tol = 5e-5 + 5e-5 / (1 + reported - 5e-5) ** 2 + 1e-12
            assert abs(m["xbm_share_of_step"] - reported / (1 + reported)) <= share_tol
        # Storage: K x D features (4 or 2 bytes) plus the same int64 labels, indices, steps and slot map.
        assert c["memory_float32"]["memory_buffer_bytes"] - c["memory_bfloat16"]["memory_buffer_bytes"] == K * D * 2
        assert c["memory_bfloat16"]["memory_buffer_bytes"] >= K * D * 2 + 3 * K * 8
    best = ts["best_bf16"]
    assert best["images_per_s"] == max(g["configs"]["none"]["images_per_s"] for (p, _), g in groups.items()
                                       if p == "bfloat16")


def test_quick_knn_equals_float64_reference(quick):
    knn = quick[0]["sections"]["knn"]
    s = gpu.QUICK
    x, y = make_embeddings(n=s.knn_n, d=s.knn_d, classes=s.knn_classes)
    ref = recall_float64(x, y, s.knn_ks)
    assert knn["near_ties_within_1e-5"] == {k: 0 for k in ref}  # so every path must agree exactly
    assert knn["library_cpu"]["recall"] == ref
    for dtype in ("float32", "bfloat16"):
        r = knn[dtype]
        assert r["recall"] == ref
        assert r["equals_cpu"] and r["differences_explained_by_near_ties"]
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        # Both times are rounded to 1e-5 s and the ratio to 1e-3: the bound those roundings allow.
        s_, f_ = r["seconds"], r["floor_seconds"]
        ratio_tol = 5e-4 + (s_ + 5e-6) / (f_ - 5e-6) - s_ / f_ + 1e-12
        assert abs(r["ratio_to_floor"] - s_ / f_) <= ratio_tol
    assert knn["float32"]["rescored_queries"] == 0
    assert 0 < knn["bfloat16"]["rescored_queries"] < s.knn_n  # the rounding margin is active, and narrow
    for dtype in ("float32", "bfloat16"):  # the GEMM rate: 2 N^2 D flops over the floor's time
        r = knn[dtype]
        f_, flops = r["floor_seconds"], 2.0 * s.knn_n ** 2 * s.knn_d / 1e12
        # the rate rounded to 0.01, the floor to 1e-5 s
        assert abs(r["gemm_tflops"] - flops / f_) <= 5e-3 + flops / (f_ - 5e-6) - flops / f_ + 1e-12


def test_quick_end_to_end_learns(quick):
    e2e = quick[0]["sections"]["end_to_end"]
    assert e2e["warmup_steps"] == 40 and e2e["xbm_steps"] == 40
    assert set(e2e["phase_seconds"]) == {"pretrain", "warmup", "memory_init", "xbm", "evaluate_test"}
    assert e2e["memory_fill"] == 1.0
    assert e2e["images_per_s_median"]["xbm"] > 0
    chance = e2e["chance_recall_at_1"]
    assert 0 < chance < 0.05
    assert e2e["test"]["recall@1"] > 5 * chance  # 80 steps already learn well above chance


def test_quick_end_to_end_metrics_equal_float64(quick):
    """The test metrics it reports are the library's on the model's test embeddings: recomputed here in float64
    by brute force from the embeddings the run recorded, and the chance level from their labels by pair count."""
    e2e, rec = quick[0]["sections"]["end_to_end"], quick[2]
    x, y = rec["query"], rec["labels"]
    assert bool(rec["own_gallery"]) and len(x) == len(y) == e2e["test_images"]
    ks = [int(k.removeprefix("recall@")) for k in e2e["test"] if k.startswith("recall@")]
    assert ks == [1, 10, 100]  # params.yaml's eval.recall_at
    ref, ties, unsure = metrics_float64(x, y, ks)
    for k in ks:  # equal, but for queries within float32 rounding of a flip (if any)
        assert abs(e2e["test"][f"recall@{k}"] - ref[f"recall@{k}"]) * len(x) <= ties[f"recall@{k}"] + 1e-9, k
    assert sum(ties.values()) <= 0.01 * len(x)  # and those are rare, or the comparison says little
    assert e2e["test"]["map@r"] == pytest.approx(ref["map@r"], abs=unsure + 1e-9)
    _, counts = np.unique(y, return_counts=True)
    n = len(y)
    chance = float((counts * (counts - 1)).sum()) / (n * (n - 1))
    assert e2e["chance_recall_at_1"] == pytest.approx(chance, abs=5e-7 + 1e-12)  # rounded to 1e-6


# ---- the kNN in-process, against float64 on hard cases ----

def test_positives_table():
    labels = torch.tensor([3, 1, 3, 7, 1, 3])
    table = gpu.positives_table(labels)
    assert table.shape == (6, 3)
    for i, row in enumerate(table.tolist()):
        same = {j for j in range(6) if labels[j] == labels[i]}
        assert set(row) == same  # its class, itself included; padding repeats itself
        assert row.count(i) == 1 + 3 - len(same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_recall_equals_float64(dtype):
    # Low dimension and tight classes: many queries decide within bfloat16's rounding, so the rescoring must work.
    x, y = make_embeddings(seed=3, noise=1.5, n=1500, d=16, classes=300)
    y[:7] = np.arange(10_000, 10_007)  # singletons: no positive, a miss at every K
    ks = (1, 2, 5, 50, 1499, 5000)  # K up to and past the gallery size
    xt = torch.from_numpy(x)
    pos = gpu.positives_table(torch.from_numpy(y))
    # No decision within 1e-5 of flipping, so float32 rounding in any summation order cannot change one.
    assert gpu.near_ties(xt, pos, ks, 1e-5, chunk=256) == {f"recall@{k}": 0 for k in ks}
    recall, rescored, widest = gpu.device_recall(xt, pos, ks, dtype, chunk=256)
    assert recall == recall_float64(x, y, ks)
    if dtype == torch.float32:
        assert rescored == {"queries": 0, "pairs": 0} and widest == 0
    else:
        assert rescored["queries"] > 0 and rescored["pairs"] >= rescored["queries"] and 0 < widest < 0.02


def test_rounding_margin_bounds_bfloat16_products():
    x, _ = make_embeddings(seed=1, n=600, d=512, classes=100)
    xt = torch.from_numpy(x)
    xb = xt.bfloat16()
    err = (xb.float() - xt).norm(dim=1)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    sim = (xb @ xb.T).double().numpy()
    for q in range(0, 600, 37):  # each query's margin at thresholds across the similarity range
        for t in (-0.3, 0.0, 0.2, 0.6, 1.0):
            m = float(gpu.rounding_margin(err[q:q + 1], float(err.max()), torch.tensor([t]), torch.bfloat16, 512))
            near = np.abs(exact[q] - t) <= 2 * m
            assert (np.abs(sim[q] - exact[q])[near] <= m).all()


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(dev, sizes):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu, "section_data_cache", broken)
    out = tmp_path / "r.json"
    rc = gpu.main(["--quick", "--device", "cpu", "--sections", "data_cache,env", "--out", str(out)])
    assert rc == 1
    result = json.loads(out.read_text())
    assert result["sections"]["data_cache"]["status"] == "failed"
    assert "simulated failure" in result["sections"]["data_cache"]["error"]
    assert result["sections"]["env"]["status"] == "ok"  # the next section ran
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["failed_sections"] == ["data_cache"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_targets_read_the_full_run():
    result = {"sections": {
        "train_step": {"best_bf16": {"batch": 256, "images_per_s": 3100.0, "memory_float32_cost_vs_none": 0.02,
                                     "memory_bfloat16_cost_vs_none": 0.04, "memory_float32_extra_peak_gib": 0.25,
                                     "memory_bfloat16_extra_peak_gib": 0.1}},
        "knn": {"float32": {"ratio_to_floor": 1.1, "differences_explained_by_near_ties": True},
                "bfloat16": {"ratio_to_floor": 2.5, "differences_explained_by_near_ties": True}}}}
    t = gpu.targets(result)
    assert t["resnet50_bf16_images_per_s"]["met"]
    assert t["xbm_float32_memory_step_cost"]["met"] and not t["xbm_bfloat16_memory_step_cost"]["met"]
    assert t["xbm_float32_memory_extra_gb"]["value"] == pytest.approx(0.25 * 2**30 / 1e9, abs=1e-4)
    assert t["xbm_float32_memory_extra_gb"]["met"] and t["xbm_bfloat16_memory_extra_gb"]["met"]
    assert t["knn_float32"]["met"] and not t["knn_bfloat16"]["met"]
