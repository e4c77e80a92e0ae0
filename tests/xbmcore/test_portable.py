"""Portable mode (xbmcore.portable): the switches, the process started again when torch loaded first, and the bytes
a portable process computes, against ones recorded on this project's reference CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xbmcore import portable

ROOT = Path(__file__).resolve().parents[2]
CAN = portable.unsupported() is None
needs_avx2 = pytest.mark.skipif(not CAN, reason=f"portable mode needs x86-64 with AVX2: {portable.unsupported()}")

# A convolution + BatchNorm, a matrix product + softmax, an L2 normalisation and a row sum of seeded inputs; the
# sha256 of each result's bytes. `torch` is imported before `enter` when argv[2] is "late": the process must then
# start again, and says so by printing "start" twice.
KERNELS = """
import hashlib, json, sys
print("start", flush=True)
if sys.argv[2] == "late":
    import torch
from xbmcore import portable
portable.enter(sys.argv[1] == "on")
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(64, 32, 16, 16, generator=g), torch.randn(64, 32, 3, 3, generator=g)
a, b = torch.randn(300, 700, generator=g), torch.randn(700, 500, generator=g)
v = torch.randn(1000, 1000, generator=g)
parts = {"conv_bn": F.batch_norm(F.conv2d(x, w, padding=1), None, None, training=True),
         "matmul_softmax": torch.softmax(a @ b / 30, dim=1), "normalize": F.normalize(v, dim=1), "sum": v.sum(dim=1)}
from xbmcore.blas import load_faiss
load_faiss()
out = {k: hashlib.sha256(t.numpy().tobytes()).hexdigest() for k, t in parts.items()}
print(json.dumps({"bytes": out, "report": portable.report()}))
"""
# Recorded in portable mode on an AMD EPYC with AVX-512, whose pretrain stage in portable mode gives the bytes an
# AVX2-only EPYC gives natively (torch 2.14). A new torch may change its kernels: record them again then.
PORTABLE_BYTES = {
    "conv_bn": "4c912fd8",
    "matmul_softmax": "5ddfc59f",
    "normalize": "09bf7289",
    "sum": "10268f60",
}


def run(mode: str, when: str = "early", env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    clean = {k: v for k, v in os.environ.items() if k not in portable.PORTABLE_ENV}
    proc = subprocess.run([sys.executable, "-c", KERNELS, mode, when], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return lines, json.loads(lines[-1])


def test_unsupported_names_the_reason(monkeypatch):
    for k in portable.PORTABLE_ENV:
        monkeypatch.delenv(k, raising=False)
    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert portable.unsupported("x86_64", avx2) is None
    assert portable.unsupported("aarch64", avx2) == "this CPU is aarch64, not x86-64"
    assert portable.unsupported("x86_64", frozenset({"avx", "sse4_2"})) == "this CPU lacks AVX2 and FMA"
    assert portable.unsupported("x86_64", frozenset({"avx2"})) == "this CPU lacks FMA"
    # Nothing is pinned where the kernels cannot run; off removes only what a portable parent set.
    assert portable.wanted_env(True, "aarch64", avx2) == {}
    assert portable.wanted_env(True, "x86_64", avx2) == portable.PORTABLE_ENV


def test_off_removes_only_the_portable_values(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")  # as a portable parent set it
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # the user's own
    for k in portable.PORTABLE_ENV:
        if k not in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA"):
            monkeypatch.delenv(k, raising=False)
    assert portable.wanted_env(False) == {"MKL_CBWR": None}


@needs_avx2
def test_a_portable_process_computes_the_recorded_bytes():
    lines, out = run("on")
    assert lines.count("start") == 1  # entered before torch loaded: no second start
    assert {k: v[:8] for k, v in out["bytes"].items()} == PORTABLE_BYTES
    r = out["report"]
    assert r["portable"] and r["aten_capability"] == "AVX2" and not r["numpy_avx512"]
    assert r["faiss_simd"] in ("AVX2", "swigfaiss_avx2")
    assert r["env"] == portable.PORTABLE_ENV


@needs_avx2
def test_torch_loaded_first_starts_the_process_again():
    lines, out = run("on", "late")
    assert lines.count("start") == 2
    assert {k: v[:8] for k, v in out["bytes"].items()} == PORTABLE_BYTES
    assert out["report"]["portable"]


@needs_avx2
def test_off_inside_a_portable_parent_runs_native_kernels():
    native = run("off")[1]
    inherited = run("off", "late", env=dict(portable.PORTABLE_ENV))  # started again without the parent's switches
    assert inherited[0].count("start") == 2
    assert inherited[1]["bytes"] == native["bytes"] and not inherited[1]["report"]["portable"]
    if "avx512f" in portable.cpu_flags():  # where the native kernels are wider, they round differently
        assert native["report"]["aten_capability"] == "AVX512"
        assert native["bytes"]["conv_bn"][:8] != PORTABLE_BYTES["conv_bn"]
        assert native["bytes"]["matmul_softmax"][:8] != PORTABLE_BYTES["matmul_softmax"]


def test_a_cpu_that_cannot_says_so_and_pins_nothing(monkeypatch, caplog):
    for k in portable.PORTABLE_ENV:
        monkeypatch.delenv(k, raising=False)  # nothing to remove either: enter changes nothing, starts nothing
    monkeypatch.setattr(portable, "platform", type("P", (), {"machine": staticmethod(lambda: "aarch64")}))
    with caplog.at_level("WARNING", logger="xbmcore.portable"):
        assert portable.enter(True) is False
    assert all(k not in os.environ for k in portable.PORTABLE_ENV)
    assert caplog.messages == ["train.portable: this CPU is aarch64, not x86-64, so it runs its own kernels: its "
                               "results are not comparable byte for byte with ones computed in portable mode (the "
                               "committed results among them)"]
