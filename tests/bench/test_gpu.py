"""bench.gpu: the quick mode end to end on the CPU (so the GPU script cannot rot between lent GPUs), and its
exact kNN against float64 references."""
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

ROOT = Path(__file__).resolve().parents[2]


def recall_float64(x: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """Brute force in float64: a query hits at K iff one of its K most similar other items shares its label."""
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    rel = labels[order] == labels[:, None]
    first = np.where(rel.any(1), rel.argmax(1), len(x))
    return {f"recall@{k}": float((first < k).mean()) for k in ks}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of `python -m bench.gpu --quick` on the CPU, as a user runs it: (JSON file, stdout lines)."""
    out = tmp_path_factory.mktemp("bench_gpu") / "quick.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(out.read_text()), lines


def test_quick_runs_every_section(quick):
    result, lines = quick
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
    assert env["channels_last"]["output_channels_last"]
    assert "version" in env["packages"]["faiss"] and "version" in env["packages"]["pydantic"]


def test_quick_train_step(quick):
    ts = quick[0]["sections"]["train_step"]
    sizes = gpu.QUICK
    groups = {(g["precision"], g["batch"]): g for g in ts["groups"]}
    assert set(groups) == {(p, b) for p in gpu.PRECISIONS for b in sizes.batches}
    D, K = sizes.embedding_dim, sizes.memory_K
    for (precision, B), g in groups.items():
        c = g["configs"]
        assert set(c) == {"none", "memory_float32", "memory_bfloat16"}
        for rec in c.values():
            assert rec["images_per_s"] > 0
            assert rec["images_per_s"] == pytest.approx(B / (rec["ms_per_step"] / 1e3), rel=1e-3)
            assert len(rec["ms_per_step_rounds"]) == sizes.rounds
            assert rec["peak_bytes"] is None  # no allocator statistics on the CPU
        for dtype in gpu.MEMORY_DTYPES:
            m = c[f"memory_{dtype}"]
            assert m["memory_K"] == K
            # The memory at K = 65,536 is large next to the tiny CNN: its share is clearly positive.
            assert 0 <= m["xbm_share_of_step"] < 1
            assert m["xbm_share_of_step"] == pytest.approx(m["cost_vs_none"] / (1 + m["cost_vs_none"]), abs=2e-4)
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
        assert r["ratio_to_floor"] == pytest.approx(r["seconds"] / r["floor_seconds"], rel=1e-2)
    assert knn["float32"]["rescored_queries"] == 0
    assert 0 < knn["bfloat16"]["rescored_queries"] < s.knn_n  # the rounding margin is active, and narrow


def test_quick_end_to_end_learns(quick):
    e2e = quick[0]["sections"]["end_to_end"]
    assert e2e["warmup_steps"] == 40 and e2e["xbm_steps"] == 40
    assert set(e2e["phase_seconds"]) == {"pretrain", "warmup", "memory_init", "xbm", "evaluate_test"}
    assert e2e["memory_fill"] == 1.0
    assert e2e["images_per_s_median"]["xbm"] > 0
    chance = e2e["chance_recall_at_1"]
    assert 0 < chance < 0.05
    assert e2e["test"]["recall@1"] > 5 * chance  # 80 steps already learn well above chance


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
