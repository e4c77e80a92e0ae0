"""The BLAS core of faiss's bundled OpenBLAS, chosen from the CPU's features before faiss loads.

The faiss-cpu wheel bundles its own OpenBLAS (0.3.15 in faiss-cpu 1.8-1.15), built for every x86 core and picking
one at load time from the CPU's model number. A CPU newer than that release (a recent AVX-512 Xeon) is not in its
table, and it falls back to the generic "Prescott" (SSE3) kernels: exact search then ran at 5.6x its GEMM floor
instead of 1.0x. OpenBLAS reads OPENBLAS_CORETYPE once, when it loads, so the project imports faiss only through
`load_faiss`, which first calls `select_openblas_core`: the variable is set at the one moment it counts, and
importing xbmcore changes nothing in the environment. `select_openblas_core` sets it from the CPU's instruction
sets, unless the user already has: SkylakeX on a CPU with the
AVX-512 subsets its sgemm kernels use, Haswell on one with AVX2 + FMA. Newer cores (Cooper Lake, Sapphire Rapids)
add bf16 / AMX kernels only, which float32 search never calls. Nothing is set on other CPUs (ARM, older x86) or
when faiss is already loaded (too late: the core is chosen once per process).

In portable mode (xbmcore.portable) the core is already set, to Haswell, and kept.

`generic_blas` says, from threadpoolctl, which loaded OpenBLAS runs a generic core on a CPU with AVX2: the test
suite and `bench.evaluate` check that it is empty.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from types import ModuleType

from xbmcore.portable import cpu_flags

ENV = "OPENBLAS_CORETYPE"
# OpenBLAS core names without AVX2 kernels, as threadpoolctl reports them (lower case).
GENERIC_CORES = frozenset({"prescott", "katmai", "coppermine", "northwood", "banias", "core2", "penryn",
                           "dunnington", "nehalem", "sandybridge", "atom", "generic", "barcelona", "opteron",
                           "opteron_sse3", "athlon"})
_AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")  # what OpenBLAS's SkylakeX kernels need


def core_for(flags: frozenset[str]) -> str | None:
    """The OpenBLAS core whose float32 kernels suit a CPU with these flags, or None (leave OpenBLAS's choice).

    Args:
        flags: the CPU's instruction-set flags (``xbmcore.portable.cpu_flags()``).

    Returns:
        ``"SkylakeX"`` (AVX-512), ``"Haswell"`` (AVX2 + FMA), or None.
    """
    if all(f in flags for f in _AVX512):
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def select_openblas_core() -> str | None:
    """Set OPENBLAS_CORETYPE for the OpenBLAS libraries loaded after this call; returns the core set, or None.

    Nothing is set when the user has set it, when faiss is loaded already, or on a CPU that is not x86-64.

    Returns:
        The core set, or None.
    """
    if os.environ.get(ENV) or "faiss" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    core = core_for(cpu_flags())
    if core is not None:
        os.environ[ENV] = core
    return core


@functools.cache
def load_faiss() -> ModuleType:
    """Import faiss, its OpenBLAS core chosen first (select_openblas_core); raises ImportError without faiss.

    Returns:
        The faiss module (imported once per process).

    Raises:
        ImportError: faiss is not installed.
    """
    select_openblas_core()
    import faiss

    return faiss


def generic_blas() -> list[dict]:
    """The loaded OpenBLAS libraries that run a generic (pre-AVX2) core although this CPU has AVX2, as
    threadpoolctl describes them; empty when all are fine or the CPU has no AVX2.

    Returns:
        threadpoolctl's description of each such library.
    """
    from threadpoolctl import threadpool_info

    if "avx2" not in cpu_flags():
        return []
    return [lib for lib in threadpool_info()
            if lib.get("internal_api") == "openblas" and str(lib.get("architecture", "")).lower() in GENERIC_CORES]
