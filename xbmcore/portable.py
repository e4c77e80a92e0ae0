"""Portable CPU numerics: every kernel at one instruction-set level, so that any x86-64 CPU with AVX2 computes the
same bytes (`train.portable`).

PyTorch's results are bitwise only on one kind of CPU: ATen, oneDNN and MKL each pick their kernels from the
CPU's instruction sets at run time, and an AVX-512 kernel sums in another order than an AVX2 one. Each library has
its own switch to cap that choice, read once when it first runs a kernel; `PORTABLE_ENV` sets all of them to the
AVX2 level that every x86-64 server and desktop CPU of the last decade has. They are environment variables, so
`enter` sets them before torch, numpy or faiss loads, and when one of those is already loaded it starts the
process again with them (`os.execv` of the same command line). Child processes (torchrun's ranks, worker pools)
inherit them.

This module imports nothing heavy: entry points call `enter` first thing.
"""
from __future__ import annotations

import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# The libraries' own switches, each capped at AVX2 (with FMA): (variable, value, what it pins).
PORTABLE_SETTINGS = (
    ("ATEN_CPU_CAPABILITY", "avx2", "ATen's vectorised kernels: elementwise ops, reductions, softmax, norms"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2", "oneDNN's convolutions and BatchNorm"),
    ("MKL_CBWR", "AVX2", "MKL's matrix products (its conditional numerical reproducibility mode)"),
    ("OPENBLAS_CORETYPE", "Haswell", "the OpenBLAS of faiss and numpy (k-means of the NMI, exact search)"),
    # faiss >= 1.12 dispatches its SIMD kernels (normalisation, distances, k-means) at run time; older wheels load
    # one of several builds. An unknown FAISS_SIMD_LEVEL aborts the process: AVX2 is a name every version has.
    ("FAISS_SIMD_LEVEL", "AVX2", "faiss's SIMD kernels (normalisation, distances, k-means)"),
    ("FAISS_OPT_LEVEL", "AVX2", "which SIMD build a faiss older than 1.12 loads"),
    # numpy's dispatch targets above AVX2 (log, exp: sklearn's NMI), named as numpy >= 2.4 and earlier name them;
    # a name this numpy does not know is ignored.
    ("NPY_DISABLE_CPU_FEATURES", "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL "
                                 "AVX512_KNL AVX512_KNM", "numpy's SIMD kernels (log, exp, sin, ...)"),
)
PORTABLE_ENV = {name: value for name, value, _ in PORTABLE_SETTINGS}
# Loaded libraries that have read the switches already: with one of them in the process it is too late.
_READERS = ("torch", "numpy", "faiss")
_REQUIRED_FLAGS = ("avx2", "fma")


def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of this CPU (Linux /proc/cpuinfo); empty where unknown.

    Returns:
        The flags, lower case (``"avx2"``, ``"fma"``, ``"avx512f"``, ...).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def unsupported(machine: str | None = None, flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot run the portable kernels (None: it can).

    Args:
        machine: the architecture (``platform.machine()``); None: this machine's.
        flags: the CPU's flags; None: this CPU's (`cpu_flags`).

    Returns:
        A reason (not x86-64, or AVX2 or FMA missing), or None.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return f"this CPU is {machine}, not x86-64"
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in _REQUIRED_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {' and '.join(m.upper() for m in missing)}"
    return None


def in_force(env: dict[str, str] | os._Environ | None = None) -> bool:
    """Whether every portable switch is set in `env` (default: this process's environment).

    Args:
        env: an environment mapping; None: ``os.environ``.

    Returns:
        True when every variable of `PORTABLE_ENV` has its portable value.
    """
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in PORTABLE_ENV.items())


def wanted_env(enabled: bool, machine: str | None = None, flags: frozenset[str] | None = None) -> dict[str, str | None]:
    """The switches to set (a value) or remove (None) for `train.portable = enabled` on this CPU. Off, only values
    equal to the portable ones are removed (inherited from a portable parent); a user's own settings stay.

    Args:
        enabled: ``train.portable``.
        machine: the architecture; None: this machine's.
        flags: the CPU's flags; None: this CPU's.

    Returns:
        ``{variable: value}`` to set, or ``{variable: None}`` to remove. On a CPU that cannot run portable
            mode, enabled behaves as off.
    """
    if enabled and unsupported(machine, flags) is None:
        return dict(PORTABLE_ENV)
    return {k: None for k, v in PORTABLE_ENV.items() if os.environ.get(k) == v}


def enter(enabled: bool, what: str = "train.portable") -> bool:
    """Put this process in portable mode (`enabled`) or out of it, before torch, numpy or faiss loads; if one is
    loaded already and the environment must change, start the process again with the new environment (this
    call then does not return). Returns whether the portable switches are in force.

    Args:
        enabled: ``train.portable``: put the process in portable mode, or take it out.
        what: the setting named in the warning on a CPU without AVX2 and FMA.

    Returns:
        Whether the portable switches are in force (False on an unsupported CPU).
    """
    if enabled and (why := unsupported()):
        log.warning("%s: %s, so it runs its own kernels: its results are not comparable byte for byte with ones "
                    "computed in portable mode (the committed results among them)", what, why)
    changes = {k: v for k, v in wanted_env(enabled).items() if os.environ.get(k) != v}
    if not changes:
        return in_force()
    for k, v in changes.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if any(m in sys.modules for m in _READERS):
        # The loaded library read the old values; only a new process reads the new ones.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
    return in_force()


def report() -> dict[str, object]:
    """What this process runs: whether portable mode is in force, and the level each library actually chose
    (ATen's capability, numpy's highest dispatch target, faiss's build where loaded). Imports torch and numpy.

    Returns:
        ``{"portable", "cpu", "aten_capability", "numpy_avx512", "numpy", "faiss_simd", "env"}``: the `start`
            event's `numerics` field.
    """
    import numpy as np
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    # numpy's AVX-512 dispatch target (X86_V4 from numpy 2.4, AVX512_SKX before), False once switched off
    numpy_avx512 = bool(features.get("X86_V4") or features.get("AVX512_SKX"))
    faiss = sys.modules.get("faiss")
    return {
        "portable": in_force(),
        "cpu": platform.machine(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy_avx512": numpy_avx512,
        "numpy": np.__version__,
        "faiss_simd": None if faiss is None else _faiss_level(faiss),
        "env": {k: os.environ.get(k) for k in PORTABLE_ENV},
    }


def _faiss_level(faiss) -> str:
    """The SIMD level of the loaded faiss: its dispatched level (>= 1.12), else the build it loaded."""
    config = getattr(faiss, "SIMDConfig", None)
    if config is not None:
        return config.get_level_name()
    return next((m.removeprefix("faiss.") for m in sorted(sys.modules) if m.startswith("faiss.swigfaiss_")),
                "swigfaiss")


if __name__ == "__main__":  # `eval "$(python -m xbmcore.portable)"`: the switches for a process started by hand
    for name, value in PORTABLE_ENV.items():
        print(f"export {name}='{value}'")
