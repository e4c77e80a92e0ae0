"""The served model under a bounded load, with and without a stream of hostile requests. Prints JSON.

    python -m bench.serve [--model artifacts/train_xbm/model.pt | models:/<id>] [--params params.yaml]
                          [--clients 4] [--rounds 3] [--hostile-rounds 2] [--no-hostile] [--workers 1]
                          [--launcher mlflow|direct] [--malloc-arena-max 2] [--arrow-pool system]
                          [--markdown docs/generated/serve.md]

Starts `mlflow models serve` on 127.0.0.1 for the model (a model.pt is first logged, with the params' limits
data.max_pixels and serve.max_images, into a temporary MLflow store; an MLflow URI is served as it is, from
MLFLOW_TRACKING_URI), then `clients` threads each send `rounds` x requests of 1, 8 and 64 images (JPEG and PNG,
224 to 1,000 px a side), while one more thread sends `hostile-rounds` x each hostile request: a 400 MP PNG bomb
(~400 KB), an 80 MP PNG, a 1 x 200,000 px strip, a truncated JPEG, bytes that are no image, bad base64, and
max_images + 1 images in one body. Then it checks /ping and stops the server.

The process tree: `mlflow models serve` is a launcher (~0.24 GB: the Python objects of MLflow's CLI) that starts
uvicorn as its child and waits for it; `--launcher direct` starts that same uvicorn command and environment
(mlflow.pyfunc.scoring_server.get_cmd) alone, as a container's entry point would. In the worker, importing the CUDA
build of torch takes ~0.5 GB and torchvision (which imports torch._dynamo, sympy and triton) ~0.15 GB. The server
runs with MALLOC_ARENA_MAX=2 and ARROW_DEFAULT_MEMORY_POOL=system unless told otherwise: with glibc's default (8
arenas per core) each request thread keeps its own arena of freed JSON and image buffers, and pandas copies each
request's base64 strings into Arrow buffers, whose default allocator (mimalloc) keeps what they freed.

JSON: legit images/s over the load, p50 / p99 latency per request size, the counts of 2xx, 4xx and 5xx, each
hostile kind's status codes, the server tree's RSS idle and at its peak (sampled every 20 ms, and the sum of its
processes' own peaks, VmHWM, which no sample can miss) with its anonymous part (RssAnon: what requests allocate;
the rest is libraries mapped from disk, whose resident share depends on the kernel and its page cache), each
process's own RSS, the tree's PSS (sampled every 100 ms; a page shared by the launcher and the worker counts once),
whether the server stayed up, and the targets: no 5xx, every legitimate request a 2xx, every hostile one a 4xx,
the server up, VmHWM sum under 1.5 GB. `--markdown` puts the run's row into a table (one row per load and
launcher), the generated file that the docs include.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

SIZES = (1, 8, 64)
RSS_TARGET_MB = 1536


def blank_png(width: int, height: int, channels: int = 3) -> bytes:
    """A black 8-bit PNG (grey: channels 1, RGB: 3) written without ever holding its pixels: 20,000 x 20,000 grey
    is ~400 KB on disk and 400 MB decoded. One block of rows is compressed once and its bytes repeated, which is
    valid deflate because a full flush leaves each copy independent of what precedes it."""
    row = bytes(1 + width * channels)  # filter byte 0, then black pixels
    per_block = max(1, (1 << 20) // len(row))
    full, rest = divmod(height, per_block)
    raw = row * per_block
    c = zlib.compressobj(9)
    first = c.compress(raw) + c.flush(zlib.Z_FULL_FLUSH)
    header, block = first[:2], first[2:]
    tail = c.compress(row * rest) + c.flush()  # ends with the adler32 of what this compressor saw: replaced below
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(raw, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = header + block * full + tail[:-4] + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _photo(rng: np.random.Generator, w: int, h: int, fmt: str) -> bytes:
    """Smooth colour noise (compresses like a photo, not like white noise)."""
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.BICUBIC).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _body(cells: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hostile_bodies(max_images: int) -> dict[str, bytes]:
    jpeg = _photo(np.random.default_rng(1), 640, 480, "JPEG")
    tiny = _photo(np.random.default_rng(2), 32, 32, "PNG")
    return {"bomb_400mp": _body([_b64(blank_png(20_000, 20_000, 1))]),
            "png_80mp": _body([_b64(blank_png(10_000, 8_000, 3))]),
            "strip_1x200000": _body([_b64(blank_png(200_000, 1, 1))]),
            "truncated_jpeg": _body([_b64(jpeg[:len(jpeg) // 2])]),
            "not_an_image": _body([_b64(b"<html><body>not an image</body></html>")]),
            "bad_base64": _body(["this is *not* base64!"]),
            "over_cap": _body([_b64(tiny)] * (max_images + 1))}


def _post(port: int, body: bytes) -> tuple[int, float, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, time.perf_counter() - t, r.read()
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - t, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:  # the server went away
        return 0, time.perf_counter() - t, str(err).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _status(procs: list[psutil.Process], *fields: str) -> list[int]:
    """Sums over the processes of /proc/<pid>/status fields (bytes): VmRSS, RssAnon (heap, stacks: what requests
    allocate), VmHWM (each process's own peak RSS)."""
    total = [0] * len(fields)
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in fields:
                    total[fields.index(key)] += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _pss(procs: list[psutil.Process]) -> int:
    """Sum of the processes' PSS (bytes): a page shared by k processes counts 1/k in each, so unlike summed RSS it
    does not count twice the libraries that the launcher and the worker both map."""
    total = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def _by_process(procs: list[psutil.Process], root: psutil.Process, launcher: str, field: str) -> dict[str, int]:
    """One /proc status field (MB) of each process, named: the `mlflow models serve` launcher, the uvicorn server."""
    out = {}
    for k, p in enumerate(procs):
        name = "launcher" if launcher == "mlflow" and p.pid == root.pid else "server"
        key = name if name not in out else f"{name}_{k}"
        out[key] = round(_status([p], field)[0] / 2**20)
    return out


def _ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _model_uri(args, tmp: Path) -> tuple[str, dict[str, str], int]:
    """(URI, server environment, max_images): a model.pt is logged with the params' limits first."""
    import mlflow

    from pipeline.embed import load_embedder
    from pipeline.pyfunc_model import log_embedding_model
    from xbmcore.config import load_params

    params = load_params(args.params)
    if args.model.startswith(("models:/", "runs:/")):
        return args.model, {}, params.serve.max_images
    embedder = load_embedder(args.model, params)
    embedder.max_pixels = params.data.max_pixels
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_embedding_model(embedder, pip_requirements=["torch", "torchvision", "pillow", "pydantic"],
                                   max_images=params.serve.max_images)
    return info.model_uri, {"MLFLOW_TRACKING_URI": uri}, params.serve.max_images


def _server_command(args, uri: str, port: int, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The server's command line and the environment it adds. `mlflow`: `mlflow models serve`, a launcher process
    that execs nothing itself: it starts uvicorn as its child and waits. `direct`: the very command and environment
    MLflow builds for that child (mlflow.pyfunc.scoring_server.get_cmd), started on its own, as a container's
    entry point would."""
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           # mlflow starts `uvicorn` by name: this interpreter's scripts first
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if args.malloc_arena_max:  # glibc's default is 8 arenas per core, each keeping what its threads freed
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    if args.arrow_pool:  # pandas keeps the request's strings in Arrow buffers; mimalloc, its default, keeps them
        env["ARROW_DEFAULT_MEMORY_POOL"] = args.arrow_pool
    if args.launcher == "mlflow":
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                "-h", "127.0.0.1", "-p", str(port), "-w", str(args.workers)], env
    import mlflow
    from mlflow.pyfunc import scoring_server

    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / "served"))
    cmd, cmd_env = scoring_server.get_cmd(local, port=port, host="127.0.0.1", nworkers=args.workers)
    added = {k: v for k, v in cmd_env.items() if os.environ.get(k) != v}  # the model path and the timeout
    return ["bash", "-c", f"exec {cmd}"], {**added, **env}


def _launcher_label(args) -> str:
    return "mlflow models serve" if args.launcher == "mlflow" else "uvicorn alone"


MARKDOWN_HEADER = ("| load | launcher | images/s | p50 / p99, 1 image | 8 images | 64 images | 2xx / 4xx / 5xx | "
                   "peak RSS (idle) | launcher + server peak RSS | peak PSS (idle) | of RSS anonymous (idle) | up |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(out: dict) -> str:
    """One table row of a run's JSON (bench.serve --markdown)."""
    def ms(n: str) -> str:
        lat = out["latency"].get(n)
        if not lat:
            return "-"
        if lat["p50_ms"] >= 1000:
            return f"{lat['p50_ms'] / 1000:.2f} / {lat['p99_ms'] / 1000:.2f} s"
        return f"{lat['p50_ms']:.0f} / {lat['p99_ms']:.0f} ms"

    r, st = out["rss_mb"], out["status"]
    per = " + ".join(f"{v:,}" for v in out["peak_rss_by_process_mb"].values())
    return (f"| hostile stream {'on' if out['hostile'] else 'off'} | {out['launcher']} | {out['images_per_s']:.0f} | "
            f"{ms('1')} | {ms('8')} | {ms('64')} | {st['2xx']} / {st['4xx']} / {st['5xx'] + st['no_answer']} | "
            f"{r['peak_vmhwm_sum']:,} MB ({r['idle']:,}) | {per} MB | {r['pss_peak_sampled']:,} MB "
            f"({r['pss_idle']:,}) | {r['anon_peak_sampled']:,} MB ({r['anon_idle']:,}) | "
            f"{'yes' if out['server_up'] else '**no**'} |")


def write_markdown(path: Path, out: dict) -> None:
    """Put this run's row into the table at `path` (a generated file the docs include), replacing the row of the
    same load and launcher and keeping the others: the table fills from one run per configuration."""
    from xbmcore.atomic import write_text

    row = markdown_row(out)
    key = row.split("|")[1:3]
    rows = []
    if path.exists():
        rows = [line for line in path.read_text().splitlines()  # rows of this table's columns only
                if line.startswith("| hostile stream") and line.count("|") == row.count("|")
                and line.split("|")[1:3] != key]
    # mlflow models serve first, then the server alone; the hostile stream on before off
    rows = sorted([*rows, row], key=lambda line: (line.split("|")[2] != " mlflow models serve ",
                                                   line.split("|")[1] != " hostile stream on "))
    write_text(path, "\n".join([*MARKDOWN_HEADER, *rows]) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/train_xbm/model.pt", help="a train_xbm model.pt or an MLflow URI")
    ap.add_argument("--params", default="params.yaml", help="sizes and limits for a model.pt")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of legitimate requests")
    ap.add_argument("--rounds", type=int, default=3, help="requests of each size (1, 8, 64) per client")
    ap.add_argument("--hostile-rounds", type=int, default=2, help="requests of each hostile kind")
    ap.add_argument("--no-hostile", action="store_true", help="the same load without the hostile stream")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (mlflow models serve -w)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server process (OMP_NUM_THREADS)")
    ap.add_argument("--launcher", choices=("mlflow", "direct"), default="mlflow",
                    help="mlflow: `mlflow models serve` (its launcher process stays, ~0.24 GB); direct: the uvicorn "
                         "command it would start, alone")
    ap.add_argument("--malloc-arena-max", type=int, default=2,
                    help="MALLOC_ARENA_MAX for the server (0: glibc's default, 8 per core); the request threads "
                         "of a worker otherwise each keep an arena of freed JSON and image buffers")
    ap.add_argument("--arrow-pool", choices=("system", "mimalloc", "jemalloc", ""), default="system",
                    help="ARROW_DEFAULT_MEMORY_POOL for the server ('': Arrow's default, mimalloc): pandas holds each "
                         "request's base64 strings in Arrow buffers, and mimalloc keeps what they freed")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="also put this run's row into this Markdown table (docs/generated/serve.md)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="xbm-serve-"))
    uri, env, max_images = _model_uri(args, tmp)
    rng = np.random.default_rng(0)
    pool = [_photo(rng, int(rng.integers(224, 1001)), int(rng.integers(224, 1001)), "PNG" if k % 4 == 0 else "JPEG")
            for k in range(64)]
    legit = [(n, _body([_b64(pool[(c * 7 + r * 13 + j) % len(pool)]) for j in range(n)]))
             for c in range(args.clients) for r in range(args.rounds) for n in SIZES]
    hostile = [] if args.no_hostile else [(k, b) for _ in range(args.hostile_rounds)
                                          for k, b in hostile_bodies(max_images).items()]
    random.Random(0).shuffle(hostile)

    port = _free_port()
    cmd, server_env = _server_command(args, uri, port, tmp)
    server = subprocess.Popen(cmd, env={**os.environ, **env, **server_env}, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "server.log", "wb"), start_new_session=True)
    results: list[tuple[str, int, float, int]] = []  # kind, status, seconds, images
    lock = threading.Lock()
    try:
        deadline = time.monotonic() + 300
        while not _ping(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the model server did not start: {(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        root = psutil.Process(server.pid)
        idle = _status(_tree(root), "VmRSS", "RssAnon")
        idle_by_process = _by_process(_tree(root), root, args.launcher, "VmRSS")
        idle_pss = _pss(_tree(root))
        peak, peak_pss = list(idle), [idle_pss]
        done = threading.Event()

        def monitor() -> None:  # RSS every 20 ms; PSS (a walk of the page tables) every 100 ms
            k = 0
            while not done.wait(0.02):
                procs = _tree(root)
                peak[:] = [max(a, b) for a, b in zip(peak, _status(procs, "VmRSS", "RssAnon"))]
                k += 1
                if k % 5 == 0:
                    peak_pss[0] = max(peak_pss[0], _pss(procs))

        def client(jobs: list[tuple[object, bytes]]) -> None:
            for kind, body in jobs:
                status, sec, _ = _post(port, body)
                with lock:
                    results.append((str(kind), status, sec, kind if isinstance(kind, int) else 0))

        per_client = [legit[c::args.clients] for c in range(args.clients)]
        threads = [threading.Thread(target=client, args=(jobs,)) for jobs in per_client]
        if hostile:
            threads.append(threading.Thread(target=client, args=(hostile,)))
        mon = threading.Thread(target=monitor)
        mon.start()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        mon.join()
        procs = _tree(root)
        hwm = _status(procs, "VmHWM")[0]
        hwm_by_process = _by_process(procs, root, args.launcher, "VmHWM")
        up = server.poll() is None and _ping(port)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)

    def pct(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)) * 1000, 1)

    ok = [r for r in results if r[3] and 200 <= r[1] < 300]
    latency = {str(n): {"p50_ms": pct(xs, 50), "p99_ms": pct(xs, 99), "requests": len(xs)}
               for n in SIZES if (xs := [r[2] for r in ok if r[3] == n])}
    hostile_status: dict[str, list[int]] = {}
    for kind, status, _, n in results:
        if not n:
            hostile_status.setdefault(kind, []).append(status)
    count = {c: sum(1 for r in results if r[1] // 100 == int(c[0])) for c in ("2xx", "4xx", "5xx")}
    count["no_answer"] = sum(1 for r in results if r[1] == 0)
    out = {
        "model": uri if args.model.startswith(("models:/", "runs:/")) else args.model,
        "launcher": _launcher_label(args), "clients": args.clients, "workers": args.workers,
        "threads": args.threads, "malloc_arena_max": args.malloc_arena_max or None,
        "arrow_pool": args.arrow_pool or None, "hostile": not args.no_hostile,
        "images_per_s": round(sum(r[3] for r in ok) / wall, 1), "wall_s": round(wall, 1),
        "latency": latency, "status": count, "hostile_status": hostile_status,
        "rss_mb": {"idle": round(idle[0] / 2**20), "peak_sampled": round(peak[0] / 2**20),
                   "peak_vmhwm_sum": round(hwm / 2**20), "anon_idle": round(idle[1] / 2**20),
                   "anon_peak_sampled": round(peak[1] / 2**20), "pss_idle": round(idle_pss / 2**20),
                   "pss_peak_sampled": round(peak_pss[0] / 2**20)},
        "idle_rss_by_process_mb": idle_by_process, "peak_rss_by_process_mb": hwm_by_process,
        "server_up": up,
    }
    out["targets"] = {"no_5xx": count["5xx"] == 0 and count["no_answer"] == 0,
                      "legit_all_2xx": len(ok) == len(legit),
                      "hostile_all_4xx": all(400 <= s < 500 for v in hostile_status.values() for s in v),
                      "server_up": up,
                      f"peak_rss_under_{RSS_TARGET_MB}_mb": hwm / 2**20 < RSS_TARGET_MB}
    out["targets_met"] = all(out["targets"].values())
    print(json.dumps(out, indent=1))
    if args.markdown:
        write_markdown(args.markdown, out)
    return out


if __name__ == "__main__":
    main()
