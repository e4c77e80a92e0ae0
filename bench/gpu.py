"""The GPU benchmark: one command that measures what XBM costs on a GPU, and proves the CUDA path runs.

    python -m bench.gpu --out gpu.json            # the full measurement (a GPU; sections budgeted to ~5 min)
    python -m bench.gpu --quick --out quick.json  # small sizes, any device (the test suite runs it on the CPU)

On a machine without a package registry whose Python lacks pydantic and faiss (such as a GPU node with only torch,
torchvision, numpy, pillow, scikit-learn, pyyaml, tqdm and threadpoolctl), `bash bench/gpu_wheels.sh`
downloads, here, the wheels it needs into .whl/ (20.7 MiB); the one command there, from the repository root, is

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m bench.gpu --out gpu.json

Sections, in order, each isolated (a failure is recorded with its traceback and the next section runs), with
the seconds budgeted for each on a recent data-centre GPU (a section that would end past --deadline is skipped):

    env          (10 s)  CUDA, bf16 autocast, channels_last, the library's imports and versions
    train_step  (150 s)  Trainer steps on synthetic tensors already on the device: ResNet-50 at 224 px, batch
                         64 / 128 / 256, float32 and bfloat16 autocast, no memory and XBM at K = 59,551 (SOP's
                         train set) stored in float32 and in bfloat16: images/s, XBM's share of the step, peak
                         GPU memory with and without the memory
    data_cache    (0 s)  the decoded-image cache path: skipped, with the reason in the JSON
    knn          (40 s)  Recall@{1,10,100,1000} of 60,502 x 512 (SOP's test set): the library's evaluation (one
                         counting pass, xbmcore.evaluate) on the CPU and on the GPU, and this script's count on
                         the device in float32 and bfloat16 (bfloat16 products, near-threshold pairs rescored in
                         float32), all timed, results compared, and the counts' time against the N^2 D products
                         at the rates measured in the same run
    end_to_end   (90 s)  the embedded benchmark with the default params.yaml through the library's Trainer
                         (warm-up, memory init, XBM phase, test Recall@K), in a temporary folder

JSON goes to stdout as each part finishes (one object a line), and the whole result to --out, rewritten
atomically after every section, so a run stopped by a time limit still leaves the sections it finished.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEMORY_DTYPES = ("float32", "bfloat16")  # the memory's storage dtype (memory.dtype)
PRECISIONS = ("float32", "bfloat16")  # the step's autocast (train.precision)


@dataclass(frozen=True)
class Sizes:
    backbone: str
    image_size: int
    embedding_dim: int
    batches: tuple[int, ...]
    memory_K: int  # also the train-set size the memory indexes (memory.ratio 1.0)
    train_classes: int
    rounds: int  # the configurations of one (batch, precision) take turns over this many rounds ...
    steps: int  # ... of this many steps each
    knn_n: int
    knn_d: int
    knn_classes: int
    knn_ks: tuple[int, ...]
    knn_chunk: int
    knn_repeats: int
    e2e_overrides: tuple[str, ...]  # on top of params.yaml (the full run uses its defaults)


# SOP: 59,551 train images of 11,318 classes, 60,502 test images of 11,316; D = 512 as in the paper's tables.
FULL = Sizes("resnet50", 224, 512, (64, 128, 256), 59_551, 11_318, 3, 6,
             60_502, 512, 11_316, (1, 10, 100, 1000), 4096, 3, ())
# A few seconds a section on 2 CPU cores. The memory is large next to the tiny model, so its cost is clear of
# timing noise; the end-to-end run is long enough to learn well above chance.
QUICK = Sizes("smallcnn", 32, 128, (8, 16), 65_536, 2_000, 5, 3,
              3_000, 64, 600, (1, 10, 100), 1024, 2,
              ("data.synthetic.num_classes=300", "data.synthetic.pretrain_classes=100", "pretrain.steps=40",
               "pretrain.batch_size=32", "train.warmup_steps=40", "train.xbm_steps=40", "train.eval_every=0"))
EXPECTED_S = {"env": 10, "train_step": 150, "data_cache": 0, "knn": 40, "end_to_end": 90}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset (None on the CPU: no allocator stats)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 4)


# ---------------------------------------------------------------------------------------------------- env

def section_env(dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    import torchvision

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(), "device": str(dev), "cpu_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        out.update(gpu=prop.name, capability=f"{prop.major}.{prop.minor}", gpu_memory_gib=_gib(prop.total_memory),
                   multiprocessors=prop.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    # The settings the float32 figures depend on (cuDNN's convolutions may use TF32 even when matmuls do not).
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32

    # bf16 autocast: a matmul and a convolution come out in bfloat16, close to their float32 values.
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(256, 256, device=dev, generator=g)
    x = torch.randn(8, 16, 32, 32, device=dev, generator=g)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).to(dev)
    with torch.no_grad():
        ref_mm, ref_conv = a @ a, conv(x)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            mm, y = a @ a, conv(x)
    rel = lambda got, ref: float((got.float() - ref).norm() / ref.norm())  # noqa: E731
    out["bf16_autocast"] = {"matmul_dtype": str(mm.dtype), "conv_dtype": str(y.dtype),
                            "matmul_rel_error": rel(mm, ref_mm), "conv_rel_error": rel(y, ref_conv)}
    # channels_last: a convolution of an NHWC input keeps NHWC (cuDNN's tensor-core layout), same values.
    with torch.no_grad():
        y_cl = conv.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    # (Relative: cuDNN may pick another float32 algorithm, or TF32, for the other layout.)
    out["channels_last"] = {"output_channels_last": y_cl.is_contiguous(memory_format=torch.channels_last),
                            "rel_error": rel(y_cl, ref_conv)}
    out["ok_checks"] = (mm.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
                        and out["bf16_autocast"]["matmul_rel_error"] < 2e-2
                        and out["bf16_autocast"]["conv_rel_error"] < 2e-2
                        and out["channels_last"]["output_channels_last"]
                        and out["channels_last"]["rel_error"] < 5e-3)
    # What the library imports, and from where (carried wheels show their /tmp/site path).
    versions = {}
    for name in ("numpy", "faiss", "pydantic", "yaml", "tqdm", "sklearn", "PIL", "scipy"):
        try:
            mod = __import__(name)
            versions[name] = {"version": getattr(mod, "__version__", None), "path": os.path.dirname(mod.__file__)}
        except Exception as err:  # reported, not fatal: the sections that need it say so themselves
            versions[name] = {"error": f"{type(err).__name__}: {err}"}
    out["packages"] = versions
    importlib.import_module("xbmcore.trainer")  # the library's whole import chain: config, data, evaluate, faiss
    out["xbmcore_imports"] = True
    return out


# ---------------------------------------------------------------------------------------------------- train step

class _OnDevice(tuple):
    """A collated (images, labels, indices) batch that is already on the device: the loader's pinning leaves it
    as it is."""

    def pin_memory(self, device=None) -> "_OnDevice":
        return self


class DeviceTrainSet:
    """A train split of `labels` whose every batch of sampled items shows the same synthetic images, already on
    the device, with those items' labels and dataset indices: the Trainer's own loop (sampler, loader, step,
    records) with no decoding and no host-to-device copy of pixels."""

    def __init__(self, labels: np.ndarray, images: torch.Tensor):
        self.labels = labels  # N, read by the P x M sampler
        self.images = images  # B x 3 x H x W
        self._labels = torch.as_tensor(labels, device=images.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> _OnDevice:
        idx = torch.as_tensor(indices, device=self.images.device)
        return _OnDevice((self.images, self._labels[idx], idx))


def _step_params(sizes: Sizes, dev: torch.device, batch: int, precision: str, memory_dtype: str = "float32"):
    from xbmcore.config import load_params

    return load_params(ROOT / "params.yaml", [
        f"model.backbone={sizes.backbone}", f"model.embedding_dim={sizes.embedding_dim}",
        f"data.train_size={sizes.image_size}", f"train.batch_size={batch}", "train.images_per_class=4",
        f"train.precision={precision}", f"train.device={dev.type}", "train.num_threads=null", "train.eval_every=0",
        "memory.mode=queue", "memory.ratio=1.0", f"memory.dtype={memory_dtype}",
        # The loop alone: the memory view has its own benchmark (bench.memory_view).
        "train.memory_view_every=0",
    ])


def _full_memory(sizes: Sizes, dev: torch.device, memory_dtype: str, labels: np.ndarray, seed: int = 0):
    """The memory as the Trainer builds it for this train set (K = N, queue mode, item -> slot map), already
    full of unit vectors, as after memory init."""
    from xbmcore.memory import build_memory

    params = _step_params(sizes, dev, sizes.batches[0], "float32", memory_dtype)
    memory = build_memory(params, len(labels), sizes.embedding_dim, dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(memory.K, sizes.embedding_dim, device=dev, generator=g), dim=1)
    memory.enqueue(feats, torch.as_tensor(labels, device=dev), torch.arange(memory.K, device=dev), step=0)
    return memory


def _memory_bytes(memory) -> int:
    return sum(b.numel() * b.element_size() for b in memory.buffers())


def _time_steps(trainer, memory, steps: int) -> float:
    """Seconds per step of the Trainer's loop (batch, forward, loss, backward, optimiser, enqueue, records)."""
    _sync(trainer.device)
    t0 = time.perf_counter()
    trainer.train_phase("baseline" if memory is None else "xbm", steps, memory)
    _sync(trainer.device)
    return (time.perf_counter() - t0) / steps


def _train_group(sizes: Sizes, dev: torch.device, B: int, precision: str, emit: Callable) -> dict[str, Any]:
    """One (batch, precision): no memory and a full K-entry memory in each storage dtype, timed in turns."""
    from xbmcore.events import NullSink
    from xbmcore.models import build_model
    from xbmcore.trainer import Trainer

    N, C = sizes.memory_K, sizes.train_classes
    labels = (np.arange(N) % C).astype(np.int64)  # item i is of class i % C: >= 4 images per class
    torch.manual_seed(0)
    params = _step_params(sizes, dev, B, precision)
    # NCHW, as batches come from the loader: the step converts them to channels_last on the GPU.
    images = torch.randn(B, 3, sizes.image_size, sizes.image_size, device=dev)
    # The step's speed does not depend on where the weights start: no pretrained file needed.
    trainer = Trainer(params, build_model(params.model, load_weights=False),
                      SimpleNamespace(train=DeviceTrainSet(labels, images)), NullSink())
    names = ("none",) + tuple(f"memory_{d}" for d in MEMORY_DTYPES)

    # Warm-up (cuDNN autotuning, allocator, the optimiser's state), then the peak memory of each configuration
    # with only its own memory allocated.
    _time_steps(trainer, None, 3)
    peaks, buffer_bytes = {}, {}
    for name in names:
        memory = None if name == "none" else _full_memory(sizes, dev, name.removeprefix("memory_"), labels)
        _peak_reset(dev)
        _time_steps(trainer, memory, 2)
        peaks[name] = _peak(dev)
        buffer_bytes[name] = 0 if memory is None else _memory_bytes(memory)
        del memory
        _free(dev)

    memories = {n: None if n == "none" else _full_memory(sizes, dev, n.removeprefix("memory_"), labels)
                for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(sizes.rounds):  # in turns, so a drift in clocks or load spreads over all configurations
        for n in names:
            times[n].append(_time_steps(trainer, memories[n], sizes.steps))
    out: dict[str, Any] = {"batch": B, "precision": precision, "configs": {}}
    for n in names:
        t = statistics.median(times[n])
        rec: dict[str, Any] = {
            "ms_per_step": round(1e3 * t, 3), "ms_per_step_rounds": [round(1e3 * x, 3) for x in times[n]],
            "images_per_s": round(B / t, 1), "peak_bytes": peaks[n], "peak_gib": _gib(peaks[n]),
        }
        if n != "none":
            # Paired within a round: median over rounds of (step with memory / step without) - 1.
            cost = statistics.median(x / b for x, b in zip(times[n], times["none"])) - 1
            rec.update(
                memory_K=memories[n].K, memory_buffer_bytes=buffer_bytes[n],
                cost_vs_none=round(cost, 4),
                xbm_share_of_step=round(cost / (1 + cost), 4),  # the XBM part of the step with memory
                extra_peak_bytes=None if peaks[n] is None else peaks[n] - peaks["none"],
                extra_peak_gib=None if peaks[n] is None else _gib(peaks[n] - peaks["none"]),
            )
        out["configs"][n] = rec
    del trainer, memories, images
    _free(dev)
    emit({"section": "train_step", "group": out})
    return out


def section_train_step(dev: torch.device, sizes: Sizes, emit: Callable) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": sizes.backbone, "image_size": sizes.image_size, "embedding_dim": sizes.embedding_dim,
        "memory_K": sizes.memory_K, "rounds": sizes.rounds, "steps_per_round": sizes.steps,
        "channels_last": dev.type == "cuda", "groups": [],
        "inputs": "synthetic images already on the device, P x 4 batches drawn by the Trainer's sampler",
    }
    for precision in PRECISIONS:
        for B in sizes.batches:
            try:
                out["groups"].append(_train_group(sizes, dev, B, precision, emit))
            except Exception as err:  # e.g. out of memory at one size: the other sizes still report
                out["groups"].append({"batch": B, "precision": precision, "status": "failed",
                                      "error": f"{type(err).__name__}: {err}"})
                emit({"section": "train_step", "group": out["groups"][-1]})
                _free(dev)
    ok = [g for g in out["groups"] if "configs" in g]
    bf16 = [g for g in ok if g["precision"] == "bfloat16"]
    if bf16:
        best = max(bf16, key=lambda g: g["configs"]["none"]["images_per_s"])
        out["best_bf16"] = {"batch": best["batch"], "images_per_s": best["configs"]["none"]["images_per_s"],
                            **{f"{n}_cost_vs_none": best["configs"][n]["cost_vs_none"] for n in best["configs"]
                               if n != "none"},
                            **{f"{n}_extra_peak_gib": best["configs"][n]["extra_peak_gib"]
                               for n in best["configs"] if n != "none"}}
    return out


# ---------------------------------------------------------------------------------------------------- data cache

def section_data_cache(dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("xbmcore.data.cache") is None:
        reason = ("this version of xbmcore/data has no decoded-image cache: training batches are decoded and "
                  "augmented per step, which the end_to_end section times on the embedded dataset")
    else:
        reason = ("xbmcore.data.cache is present, but this version of bench.gpu does not time training from it "
                  "(bench.data_real measures the cache's loading alone)")
    return {"status": "skipped", "reason": reason}


# ---------------------------------------------------------------------------------------------------- kNN

def positives_table(labels: torch.Tensor) -> torch.Tensor:
    """N x P: the indices of each item's same-label items, itself included, padded with its own index
    (P = the largest class)."""
    N = len(labels)
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(len(counts), device=labels.device), counts)  # per sorted item
    j = torch.arange(int(counts.max()), device=labels.device)
    members = order[(starts[group][:, None] + j).clamp(max=N - 1)]  # sorted item -> its class's items
    table_sorted = torch.where(j < counts[group][:, None], members, order[:, None])
    table = torch.empty_like(table_sorted)
    table[order] = table_sorted
    return table


def rounding_margin(err: torch.Tensor, err_max: float, t: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """Per query, a bound on |s^ - s| near its threshold t, for s = q . g of unit vectors in float32 and s^ the
    same product from inputs rounded to `dtype` (rounding errors ||q^ - q|| = err, ||g^ - g|| <= err_max),
    summed in float32 and rounded to `dtype` on output: err + err_max + err err_max for the inputs (Cauchy-
    Schwarz), dim u32 (1 + err)(1 + err_max) for the float32 sum, and u |s^| for the output, which for values
    near t solves to m = (e + u |t|) / (1 - u). 0 where t is -inf (no positive: a miss at every K)."""
    u, u32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    e = err + err_max + err * err_max + dim * u32 * (1 + err) * (1 + err_max)
    m = (e + u * t.abs()) / (1 - u)
    return torch.where(torch.isfinite(t), m, torch.zeros_like(m))


def _scores(x: torch.Tensor, xs: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor):
    """For the queries `rows`: t = each one's best same-label similarity (float32, itself excluded; -inf when it
    has none), and sim = their similarities with every item in xs's dtype, with itself and its same-label items
    set to -inf, so that only the negatives rank."""
    p = pos[rows]  # n x P
    ps = torch.einsum("nd,npd->np", x[rows], x[p])  # n x P, float32
    ps.masked_fill_(p == rows[:, None], float("-inf"))
    t = ps.max(1).values  # n
    sim = xs[rows] @ xs.T  # sim: n x N
    sim.scatter_(1, p, float("-inf"))
    return t, sim


def _rank_bounds(sim: torch.Tensor, t: torch.Tensor, margin: float | torch.Tensor = 0.0):
    """Negatives surely at least as similar as the best positive (>= t + margin) and possibly so (>= t - margin).
    The comparison runs in float32 (t is float32), so a bfloat16 sim is compared exactly."""
    if isinstance(margin, float) and margin == 0:
        r = (sim >= t[:, None]).sum(1)
        return r, r
    return (sim >= (t + margin)[:, None]).sum(1), (sim >= (t - margin)[:, None]).sum(1)


def device_recall(x: torch.Tensor, pos: torch.Tensor, ks: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  chunk: int = 4096) -> tuple[dict[str, float], dict[str, int], float]:
    """Exact Recall@K (query = gallery, self excluded) of unit-norm rows x (N x D float32) on x's device.

    A query hits at K iff fewer than K negatives are at least as similar as its best positive: one pass over
    each chunk x N block of similarities, no top-k. In bfloat16 the block comes from bfloat16 inputs, and the
    negatives that lie within the rounding margin of a query's threshold, for the queries whose decision at some
    K depends on them, are scored again in float32, so the result is float32's. Returns (recall, the number of
    queries and of (query, negative) pairs scored again, the widest margin).

    Not a second Recall@K of the project: the library's (xbmcore.evaluate.retrieval_metrics) is the one the
    pipeline reports, and section_knn compares every result of this one with it. This is the experiment the knn
    section times: bfloat16 products with the near-threshold pairs rescored, which the library has no path for
    (it decides everything on float32 similarities), against the GEMM floor; its float32 mode is the same count
    without the rounding, the baseline of that comparison.
    """
    N, D = x.shape
    exact = dtype == torch.float32
    xs = x if exact else x.to(dtype)
    if not exact:
        err = (xs.float() - x).norm(dim=1)  # N: each row's rounding error
        err_max = float(err.max())
    K = torch.tensor(ks, device=x.device)
    hits = torch.zeros(len(ks), dtype=torch.int64, device=x.device)
    again, pairs, widest = 0, 0, torch.zeros((), device=x.device)
    for s in range(0, N, chunk):
        rows = torch.arange(s, min(s + chunk, N), device=x.device)
        t, sim = _scores(x, xs, pos, rows)
        if exact:
            rank = _rank_bounds(sim, t)[0]
        else:
            margin = rounding_margin(err[rows], err_max, t, dtype, D)
            widest = torch.maximum(widest, margin.max())
            rank, upper = _rank_bounds(sim, t, margin)  # rank: the negatives surely above t
            unsure = ((rank[:, None] < K) & (K <= upper[:, None])).any(1).nonzero()[:, 0]  # sync (its size)
            if len(unsure):
                lo, hi = (t - margin)[unsure, None], (t + margin)[unsure, None]
                band = sim[unsure]
                band = ((band >= lo) & (band < hi)).nonzero()  # (query in unsure, negative): the undecided pairs
                rank[unsure] += _count_at_least(x, rows[unsure], band, t[unsure], len(unsure))
                again, pairs = again + len(unsure), pairs + len(band)
        del sim
        hits += (rank[:, None] < K).sum(0)
    recall = {f"recall@{k}": float(h) / N for k, h in zip(ks, hits.tolist())}
    return recall, {"queries": again, "pairs": pairs}, float(widest)


def _count_at_least(x: torch.Tensor, queries: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor, n: int,
                    block: int = 1 << 18) -> torch.Tensor:
    """Per query (n), how many of its (i, j) pairs have a float32 similarity x[queries[i]] . x[j] >= t[i];
    in blocks of pairs, so that the gathered rows stay bounded in memory."""
    count = torch.zeros(n, dtype=torch.int64, device=x.device)
    for s in range(0, len(pairs), block):
        i, j = pairs[s:s + block].unbind(1)
        above = (x[queries[i]] * x[j]).sum(1) >= t[i]
        count.index_add_(0, i, above.long())
    return count


def near_ties(x: torch.Tensor, pos: torch.Tensor, ks: tuple[int, ...], tol: float, chunk: int) -> dict[str, int]:
    """Per K, the queries whose decision would flip if similarities moved by `tol` (two float32 BLAS libraries
    order such near-ties differently)."""
    K = torch.tensor(ks, device=x.device)
    ties = torch.zeros(len(ks), dtype=torch.int64, device=x.device)
    for s in range(0, len(x), chunk):
        t, sim = _scores(x, x, pos, torch.arange(s, min(s + chunk, len(x)), device=x.device))
        lo, hi = _rank_bounds(sim, t, tol)
        ties += ((lo[:, None] < K) & (K <= hi[:, None])).sum(0)
    return {f"recall@{k}": int(v) for k, v in zip(ks, ties.tolist())}


def gemm_seconds(xs: torch.Tensor, chunk: int) -> float:
    """The bare products the search must do: all N x N similarities (2 N^2 D flops) in the same chunks."""
    buf = torch.empty(chunk, len(xs), dtype=xs.dtype, device=xs.device)
    _sync(xs.device)
    t0 = time.perf_counter()
    for s in range(0, len(xs), chunk):
        e = min(s + chunk, len(xs))
        torch.matmul(xs[s:e], xs.T, out=buf[: e - s])
    _sync(xs.device)
    return time.perf_counter() - t0


def _best_of(fn: Callable[[], Any], repeats: int, dev: torch.device) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        result = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, result


def section_knn(dev: torch.device, sizes: Sizes, emit: Callable) -> dict[str, Any]:
    from bench.evaluate import make_embeddings

    x_np, y_np = make_embeddings(n=sizes.knn_n, d=sizes.knn_d, classes=sizes.knn_classes)
    matmul = torch.backends.cuda.matmul
    before = (torch.get_float32_matmul_precision(), matmul.allow_bf16_reduced_precision_reduction)
    # float32 products in float32 (no TF32), like the CPU's; bfloat16 products summed in float32 (the margin's
    # premise), never in bfloat16 across split-K partial sums.
    torch.set_float32_matmul_precision("highest")
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return _knn(dev, sizes, emit, x_np, y_np)
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.allow_bf16_reduced_precision_reduction = before[1]


def _knn(dev: torch.device, sizes: Sizes, emit: Callable, x_np: np.ndarray, y_np: np.ndarray) -> dict[str, Any]:
    from bench.evaluate import TIE_TOL
    from xbmcore.evaluate import retrieval_metrics

    ks = sizes.knn_ks
    N, D = x_np.shape
    x = torch.from_numpy(x_np).to(dev)
    pos = positives_table(torch.from_numpy(y_np)).to(dev)
    flops = 2.0 * N * N * D
    out: dict[str, Any] = {"n": N, "d": D, "classes": sizes.knn_classes, "ks": list(ks), "chunk": sizes.knn_chunk,
                           "device": str(dev), "repeats": sizes.knn_repeats}

    t0 = time.perf_counter()
    ref = retrieval_metrics(x_np, y_np, recall_at=ks, nmi=False)
    out["library_cpu"] = {"seconds": round(time.perf_counter() - t0, 3),
                          "recall": {f"recall@{k}": ref[f"recall@{k}"] for k in ks}, "threads": torch.get_num_threads()}
    emit({"section": "knn", "library_cpu": out["library_cpu"]})
    if dev.type == "cuda":
        # The library's own evaluation on the GPU (xbmcore.evaluate: the CPU's float32 counting pass, on the
        # device), as the evaluate stage runs it with train.device cuda.
        try:
            retrieval_metrics(x_np[:4096], y_np[:4096], recall_at=ks, nmi=False, device=dev)  # warm-up
            t0 = time.perf_counter()
            lib = retrieval_metrics(x_np, y_np, recall_at=ks, nmi=False, device=dev)
            seconds = time.perf_counter() - t0
            differing = {f"recall@{k}": round(abs(lib[f"recall@{k}"] - ref[f"recall@{k}"]) * N) for k in ks}
            out["library_gpu"] = {"seconds": round(seconds, 3), "recall": {k: lib[k] for k in differing},
                                  "queries_differing_from_cpu": differing,
                                  "speedup_vs_cpu": round(out["library_cpu"]["seconds"] / seconds, 1)}
        except Exception as err:  # the other kNN figures still report
            out["library_gpu"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        _free(dev)

    ties = near_ties(x, pos, ks, TIE_TOL, sizes.knn_chunk)
    out["near_ties_within_1e-5"] = ties
    if "library_gpu" in out:
        lib = out["library_gpu"]
        if "queries_differing_from_cpu" in lib:
            lib["differences_explained_by_near_ties"] = all(
                v <= ties[k] for k, v in lib["queries_differing_from_cpu"].items())
        emit({"section": "knn", "library_gpu": lib})
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        xs = x.to(dtype)
        gemm_seconds(xs, sizes.knn_chunk)  # warm-up: cuBLAS handles, kernel choice, allocator
        floor, _ = _best_of(lambda xs=xs: gemm_seconds(xs, sizes.knn_chunk), sizes.knn_repeats, dev)
        device_recall(x, pos, ks, dtype, sizes.knn_chunk)  # warm-up
        seconds, (recall, rescored, widest) = _best_of(lambda: device_recall(x, pos, ks, dtype, sizes.knn_chunk),
                                            sizes.knn_repeats, dev)
        differing = {k: round(abs(recall[k] - ref[k]) * N) for k in recall}
        rec = {
            "seconds": round(seconds, 5), "floor_seconds": round(floor, 5), "ratio_to_floor": round(seconds / floor, 3),
            "gemm_tflops": round(flops / floor / 1e12, 2), "recall": recall,
            "rescored_queries": rescored["queries"], "rescored_pairs": rescored["pairs"],
            "rounding_margin_max": widest,
            "equals_cpu": all(v == 0 for v in differing.values()),
            "queries_differing_from_cpu": differing,
            "differences_explained_by_near_ties": all(differing[k] <= ties[k] for k in differing),
            "speedup_vs_cpu": round(out["library_cpu"]["seconds"] / seconds, 1),
        }
        out[name] = rec
        emit({"section": "knn", name: rec})
        del xs
        _free(dev)
    return out


# ---------------------------------------------------------------------------------------------------- end to end

class _Recorder:
    """Keeps the step and eval events of a run."""

    def __init__(self):
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def emit(self, event: dict) -> None:
        if event["kind"] == "step":
            self.steps.append(event)
        elif event["kind"] == "eval":
            self.evals.append(event)

    def close(self) -> None:
        pass


def chance_recall_at_1(labels: np.ndarray) -> float:
    """Expected Recall@1 of a random ranking, query = gallery: the mean over queries of R / (n - 1)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return float(((counts[inverse] - 1) / (len(labels) - 1)).mean())


def section_end_to_end(dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    from pipeline.stages import seed_everything
    from xbmcore.config import load_params
    from xbmcore.data import open_splits, prepare_dataset
    from xbmcore.evaluate import evaluate_model
    from xbmcore.models import build_model
    from xbmcore.pretrain import pretrain
    from xbmcore.trainer import Trainer

    overrides = [f"train.device={dev.type}", *sizes.e2e_overrides]
    p = load_params(ROOT / "params.yaml", overrides)
    out: dict[str, Any] = {"params": "params.yaml", "overrides": overrides, "model": p.model.backbone,
                           "batch_size": p.train.batch_size, "warmup_steps": p.train.warmup_steps,
                           "xbm_steps": p.train.xbm_steps}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        t0 = time.perf_counter()
        splits = open_splits(prepare_dataset(p.data, Path(tmp), progress=False), p.data)
        out["dataset_seconds"] = round(time.perf_counter() - t0, 2)
        seconds: dict[str, float] = {}
        rec = _Recorder()
        try:
            if p.model.pretrained not in ("none", "imagenet"):  # the pipeline's pretrain stage, into this folder
                t0 = time.perf_counter()
                if p.pretrain.num_threads:
                    torch.set_num_threads(p.pretrain.num_threads)
                seed_everything(p.pretrain.seed)
                net = build_model(p.model, load_weights=False)
                pretrain(net, splits.pretrain, p.pretrain, dev)
                torch.save({k: v.cpu() for k, v in net.state_dict().items()}, Path(tmp) / "pretrained.pt")
                p = p.model_copy(update={"model": p.model.model_copy(
                    update={"pretrained": str(Path(tmp) / "pretrained.pt")})})
                seconds["pretrain"] = time.perf_counter() - t0
            seed_everything(p.train.seed)
            trainer = Trainer(p, build_model(p.model), splits, rec)
            t0 = time.perf_counter()
            trainer.train_phase("warmup", p.train.warmup_steps)
            seconds["warmup"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            memory = trainer.init_memory()
            seconds["memory_init"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            trainer.train_phase("xbm", p.train.xbm_steps, memory)
            seconds["xbm"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = evaluate_model(trainer.model, splits, "test", p.eval.recall_at, p.eval.batch_size,
                                     trainer.device, nmi=False, num_workers=p.data.num_workers)
            seconds["evaluate_test"] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)  # train.num_threads is process-wide
        last = rec.steps[-1]
        out.update(
            device=str(trainer.device), precision=str(trainer.amp_dtype or torch.float32).removeprefix("torch."),
            phase_seconds={k: round(v, 2) for k, v in seconds.items()},
            images_per_s_median={ph: round(statistics.median(e["images_per_s"] for e in rec.steps
                                                             if e["phase"] == ph), 1) for ph in ("warmup", "xbm")},
            memory_K=memory.K, memory_fill=last["memory_fill"], final_loss=last["loss"],
            final_drift=last["drift"], val_evals=len(rec.evals),
            val_recall_at_1=[round(e["metrics"]["recall@1"], 4) for e in rec.evals],
            test=metrics, test_images=len(splits.test),
            chance_recall_at_1=round(chance_recall_at_1(np.asarray(splits.test.labels)), 6),
        )
    return out


# ---------------------------------------------------------------------------------------------------- targets

def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the GPU is held to (meaningful only for the full sizes on a GPU)."""
    s = result["sections"]
    ts, knn = s.get("train_step", {}), s.get("knn", {})
    out: dict[str, Any] = {}
    best = ts.get("best_bf16")
    if best:
        out["resnet50_bf16_images_per_s"] = {"value": best["images_per_s"], "target": ">= 3000",
                                             "met": best["images_per_s"] >= 3000}
        for d, limit in (("float32", 0.3), ("bfloat16", 0.15)):
            cost, extra = best.get(f"memory_{d}_cost_vs_none"), best.get(f"memory_{d}_extra_peak_gib")
            if cost is not None:
                out[f"xbm_{d}_memory_step_cost"] = {"value": cost, "target": "<= 0.03", "met": cost <= 0.03}
            if extra is not None:
                gb = extra * 2**30 / 1e9
                out[f"xbm_{d}_memory_extra_gb"] = {"value": round(gb, 4), "target": f"<= {limit}",
                                                   "met": gb <= limit}
    for d in ("float32", "bfloat16"):
        if d in knn:
            r = knn[d]
            out[f"knn_{d}"] = {"ratio_to_floor": r["ratio_to_floor"], "target": "<= 1.2 and equal to the CPU",
                               "met": r["ratio_to_floor"] <= 1.2 and r["differences_explained_by_near_ties"]}
    return out


# ---------------------------------------------------------------------------------------------------- main

def write_json(path: Path, obj: dict[str, Any]) -> None:
    # xbmcore.atomic needs nothing beyond the standard library: it writes even where the library's own
    # dependencies failed to import (what env reports).
    from xbmcore.atomic import write_text

    write_text(path, json.dumps(obj, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the whole JSON result (rewritten after each section)")
    ap.add_argument("--quick", action="store_true", help="small sizes (tiny CNN, 32 px, N = 3,000 for kNN)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the GPU when torch sees one")
    ap.add_argument("--sections", default=",".join(EXPECTED_S), help="comma-separated subset, in this order")
    ap.add_argument("--deadline", type=float, default=450.0,
                    help="seconds; a section whose expected time would end past it is skipped (default 450: "
                         "inside one 8-minute command)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       args.device if args.device != "auto" else "cpu")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(EXPECTED_S))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; expected some of {list(EXPECTED_S)}")
    sizes = QUICK if args.quick else FULL

    def emit(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    start = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {"command": " ".join(["python -m bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
                 "quick": args.quick, "device": str(dev), "torch": torch.__version__,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sizes": asdict(sizes),
                 "budget_seconds": EXPECTED_S, "deadline_seconds": args.deadline},
        "sections": {},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "env": lambda: section_env(dev, sizes),
        "train_step": lambda: section_train_step(dev, sizes, emit),
        "data_cache": lambda: section_data_cache(dev, sizes),
        "knn": lambda: section_knn(dev, sizes, emit),
        "end_to_end": lambda: section_end_to_end(dev, sizes),
    }
    for name in [n for n in EXPECTED_S if n in wanted]:
        elapsed = time.perf_counter() - start
        if not args.quick and elapsed + EXPECTED_S[name] > args.deadline:
            rec = {"status": "skipped", "reason": f"{elapsed:.0f} s elapsed + {EXPECTED_S[name]} s expected would "
                                                  f"pass --deadline {args.deadline:.0f} s"}
        else:
            t0 = time.perf_counter()
            try:
                rec = {"status": "ok", **runners[name]()}  # a section's own status (skipped) wins
            except Exception as err:
                rec = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()[-3000:]}
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            _free(dev)
        result["sections"][name] = rec
        emit({"section": name, **{k: v for k, v in rec.items() if k not in ("groups",)}})
        result["meta"]["seconds"] = round(time.perf_counter() - start, 2)
        if not args.quick and dev.type == "cuda":
            result["targets"] = targets(result)
        write_json(args.out, result)
    failed = [n for n, r in result["sections"].items() if r["status"] == "failed"]
    emit({"done": True, "seconds": result["meta"]["seconds"], "failed_sections": failed, "out": str(args.out)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
