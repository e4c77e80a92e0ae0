"""Where and in what precision training runs: `train.device` and `train.precision` resolved for this machine,
and the out-of-memory error that says which params to lower."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xbmcore.config import Params
    from xbmcore.memory import CrossBatchMemory

_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says which params to lower."""


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when torch sees a GPU, else CPU), cpu, or cuda (an error without a GPU).

    Args:
        name: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        The torch device.

    Raises:
        ValueError: ``"cuda"`` without a visible GPU (the message says how to proceed), or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device: 'cuda' was asked for, but torch sees no CUDA GPU (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}, torch.cuda.is_available() is False). Set train.device to "
            f"auto (the GPU when there is one) or cpu, e.g. `dvc exp run -S train.device=cpu`, or make the GPU "
            f"visible (driver, CUDA_VISIBLE_DEVICES)."
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def set_cpu_threads(n: int | None) -> None:
    """`n` CPU threads for torch and for faiss's OpenMP and OpenBLAS (faiss is loaded first, so that its libraries
    are there to limit): a sum split across threads depends on how many there are, so a fixed number gives the same
    bytes on a machine with more cores. None leaves each library's default (one thread per core).

    Args:
        n: the number of threads, or None (or 0) to leave the defaults.
    """
    if not n:
        return
    from threadpoolctl import threadpool_limits

    from xbmcore.blas import load_faiss

    torch.set_num_threads(n)
    try:
        load_faiss()
    except ImportError:
        pass
    threadpool_limits(n)  # every loaded OpenMP and BLAS library, for the rest of the process


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of `train.precision`, None for float32. auto: bfloat16 on a GPU that has it, else float32.

    Args:
        name: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: the training device.

    Returns:
        ``torch.bfloat16`` or ``torch.float16`` for autocast, None for float32.

    Raises:
        ValueError: float16 on the CPU.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "float32":
        return None
    if name == "float16" and device.type != "cuda":
        raise ValueError("train.precision: float16 needs a CUDA device (the CPU autocasts to bfloat16); "
                         "set train.precision to auto, float32 or bfloat16")
    return _PRECISIONS[name]


def oom_message(err: BaseException, params: Params, device: torch.device, memory: CrossBatchMemory | None,
                step: int, phase: str | None) -> str:
    """What an OutOfMemory says: where it happened and the params that lower the memory use.

    Args:
        err: torch's out-of-memory error (quoted at the end).
        params: the run's params (their current values are quoted).
        device: the CUDA device that ran out.
        memory: the cross-batch memory, whose size is quoted; None outside the XBM phase.
        step: the step that failed.
        phase: the phase it failed in.

    Returns:
        The message.
    """
    p = params
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    mem = ""
    if memory is not None:
        gb = memory.K * memory.dim * memory.get()[0].element_size() / 2**30
        mem = (f", the memory size (memory.ratio / memory.size; now K = {memory.K} x D = {memory.dim}, "
               f"{gb:.2f} GiB) or use memory.dtype: bfloat16")
    return (f"CUDA out of memory at step {step} ({phase} phase) on "
            f"{torch.cuda.get_device_name()} ({total:.0f} GiB): lower train.batch_size (now "
            f"{p.train.batch_size}) or eval.batch_size (now {p.eval.batch_size}){mem}, use train.precision: "
            f"bfloat16, or a smaller model.backbone (now {p.model.backbone}). ({err})")
