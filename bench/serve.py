"""The served model under a bounded load, with and without a stream of hostile requests. Prints JSON.

    python -m bench.serve [--model artifacts/train_xbm/model.pt | models:/<id>] [--params params.yaml]
                          [--clients 4] [--rounds 3] [--hostile-rounds 2] [--no-hostile] [--workers 1]

Starts `mlflow models serve` on 127.0.0.1 for the model (a model.pt is first logged, with the params' limits
data.max_pixels and serve.max_images, into a temporary MLflow store; an MLflow URI is served as it is, from
MLFLOW_TRACKING_URI), then `clients` threads each send `rounds` x requests of 1, 8 and 64 images (JPEG and PNG,
224 to 1,000 px a side), while one more thread sends `hostile-rounds` x each hostile request: a 400 MP PNG bomb
(~400 KB), an 80 MP PNG, a 1 x 200,000 px strip, a truncated JPEG, bytes that are no image, bad base64, and
max_images + 1 images in one body. Then it checks /ping and stops the server.

JSON: legit images/s over the load, p50 / p99 latency per request size, the counts of 2xx, 4xx and 5xx, each
hostile kind's status codes, the server tree's RSS idle and at its peak (sampled every 20 ms, and the sum of its
processes' own peaks, VmHWM, which no sample can miss) with its anonymous part (RssAnon: what requests allocate;
the rest is mostly shared libraries mapped from disk), whether the server stayed up, and the targets: no 5xx,
every legitimate request a 2xx, every hostile one a 4xx, the server up, VmHWM sum under 1.5 GB. The tree is the
`mlflow models serve` launcher and the uvicorn worker(s); with the CUDA build of torch that this project installs,
importing torch alone takes ~0.65 GB of a worker's RSS.
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
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port), "-w", str(args.workers)],
        env={**os.environ, **env, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
             # mlflow starts `uvicorn` by name: this interpreter's scripts first
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])},
        stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"), start_new_session=True)
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
        peak = list(idle)
        done = threading.Event()

        def monitor() -> None:
            while not done.wait(0.02):
                peak[:] = [max(a, b) for a, b in zip(peak, _status(_tree(root), "VmRSS", "RssAnon"))]

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
        hwm = _status(_tree(root), "VmHWM")[0]
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
        "clients": args.clients, "workers": args.workers, "threads": args.threads, "hostile": not args.no_hostile,
        "images_per_s": round(sum(r[3] for r in ok) / wall, 1), "wall_s": round(wall, 1),
        "latency": latency, "status": count, "hostile_status": hostile_status,
        "rss_mb": {"idle": round(idle[0] / 2**20), "peak_sampled": round(peak[0] / 2**20),
                   "peak_vmhwm_sum": round(hwm / 2**20), "anon_idle": round(idle[1] / 2**20),
                   "anon_peak_sampled": round(peak[1] / 2**20)},
        "server_up": up,
    }
    out["targets"] = {"no_5xx": count["5xx"] == 0 and count["no_answer"] == 0,
                      "legit_all_2xx": len(ok) == len(legit),
                      "hostile_all_4xx": all(400 <= s < 500 for v in hostile_status.values() for s in v),
                      "server_up": up,
                      f"peak_rss_under_{RSS_TARGET_MB}_mb": hwm / 2**20 < RSS_TARGET_MB}
    out["targets_met"] = all(out["targets"].values())
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
