"""pipeline.embed in chunks and ranks: 2 gloo ranks under torchrun write the same bits as one process, a killed rank
resumes from the last finished chunk, and the MLflow model embeds into and searches a sharded IVF-PQ store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from pipeline import embed, search
from pipeline.pyfunc_model import log_embedding_model
from pipeline.store import EmbeddingStore
from test_embed_search import make_images, run_embed, save_model
from tiny_project import stage_env, write_params
from pipeline.embedding_store import Embedder

torch.set_num_threads(1)
COMMON = ["--workers", "0", "--batch-size", "2", "--chunk-size", "2"]  # 12 images: 6 chunks, 3 per rank


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    params = write_params(root)
    save_model(root / "model.pt")
    make_images(root / "images", np.random.default_rng(0))
    return root, params


def embed_cmd(root, params, images, out, *extra):
    return [sys.executable, "-m", "pipeline.embed", "--model", str(root / "model.pt"), "--images", str(images),
            "--out", str(out), "--params", str(params), *COMMON, *extra]


def same_store(a, b) -> None:
    """Two store folders hold the same shards, byte for byte, and the same items and manifest."""
    ma, mb = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    assert ma == mb
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes(), s["file"]
    assert (a / "items.csv").read_bytes() == (b / "items.csv").read_bytes()


def test_two_ranks_equal_one_process_to_the_bit(project):
    root, params = project
    assert run_embed(root, params, root / "one", *COMMON) == 0
    done = subprocess.run(embed_cmd(root, params, root / "images", root / "two", "--nproc", "2"), env=stage_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same_store(root / "one", root / "two")
    meta = json.loads((root / "two/meta.json").read_text())
    assert len(meta["shards"]) == 6 and sum(s["rows"] for s in meta["shards"]) == 11  # broken.jpg skipped
    assert [s[0] for s in meta["skipped"]] == ["owl/broken.jpg"]
    one, two = EmbeddingStore.load(root / "one"), EmbeddingStore.load(root / "two")
    assert np.array_equal(one.embeddings, two.embeddings) and one.names == two.names


def _wait_for(condition, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the embed ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)  # the poll interval of the wait on `condition`, not a synchronisation


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "pipeline.embed" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_killed_rank_resumes_from_the_last_finished_chunk(project, tmp_path):
    """Rank 1 (chunks 3-6) blocks on a FIFO at the start of chunk 4; it is killed there, then the run resumes."""
    root, params = project
    names = sorted(str(p.relative_to(root / "images")) for p in (root / "images").rglob("*") if p.is_file())
    assert len(names) == 12
    data = tmp_path / "data"
    shutil.copytree(root / "images", data)
    os.mkfifo(data / "slow.png")  # opening it for reading blocks until someone writes: rank 1 waits here
    names.insert(8, "slow.png")  # row 8: the first of chunk 4
    (data / "list.csv").write_text("path\n" + "".join(f"{n}\n" for n in names))
    out = tmp_path / "out"
    proc = subprocess.Popen(embed_cmd(root, params, data / "list.csv", out, "--nproc", "2"), env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(lambda: (out / "shards/000003.json").is_file(), proc, "chunk 3 (rank 1's first)")
        _wait_for(lambda: _rank(proc, 1) is not None, proc, "rank 1's process")
        _rank(proc, 1).send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "meta.json").exists()
    assert not (out / "shards/000004.json").exists() and not (out / "shards/000004.npy").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("00000[0-3].*")}
    assert {"000003.npy", "000003.json"} <= set(finished)

    (data / "slow.png").unlink()
    shutil.copy(root / "images/dog/2.png", data / "slow.png")
    done = subprocess.run(embed_cmd(root, params, data / "list.csv", out, "--nproc", "2"), env=stage_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr
    after = {name: ((out / "shards" / name).stat().st_ino, (out / "shards" / name).stat().st_mtime_ns)
             for name in finished}
    assert after == finished  # the finished chunks were kept, not embedded again
    assert not list(out.rglob(".*.tmp"))
    assert embed.main(["--model", str(root / "model.pt"), "--images", str(data / "list.csv"), "--out",
                       str(tmp_path / "fresh"), "--params", str(params), *COMMON]) == 0
    same_store(tmp_path / "fresh", out)


def test_the_mlflow_model_embeds_and_searches_a_sharded_ivfpq_store(project, tmp_path, monkeypatch, capsys):
    import mlflow

    root, params = project
    model = save_model(tmp_path / "model.pt")
    shutil.copytree(root / "images", tmp_path / "images", ignore=shutil.ignore_patterns("broken.jpg"))
    shutil.copy(params, tmp_path / "params.yaml")
    root, uri = tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("embed", artifact_location=(root / "artifacts").as_uri())
    embedder = Embedder(model, {"backbone": "smallcnn", "embedding_dim": 16, "pretrained": "none",
                                "freeze_bn": False}, 16, 16, source="model.pt")
    with mlflow.start_run(experiment_id=exp):
        model_uri = log_embedding_model(embedder).model_uri
    query = root / "images/dog/1.png"  # (cat/0.png has an exact copy, which may come first)
    common = ["--images", str(root / "images"), "--params", str(root / "params.yaml"), "--workers", "0",
              "--chunk-size", "3", "--index", "ivfpq", "--code-bytes", "8"]
    assert embed.main(["--model", model_uri, "--out", str(root / "sharded_mlflow"), *common]) == 0
    assert embed.main(["--model", str(root / "model.pt"), "--out", str(root / "sharded_pt"), *common]) == 0
    a, b = EmbeddingStore.load(root / "sharded_mlflow"), EmbeddingStore.load(root / "sharded_pt")
    assert len(a.shards) == 4 and a.model.source == model_uri and a.spec["kind"] == "ivfpq"
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    found = []
    for folder in ("sharded_mlflow", "sharded_pt"):  # queries embedded by the model each store records
        assert search.main(["--index", str(root / folder), "--query", str(query), "-k", "3", "--json",
                            "--params", str(root / "params.yaml")]) == 0
        found.append(json.loads(capsys.readouterr().out)[0]["results"])
    assert [r["path"] for r in found[0]] == [r["path"] for r in found[1]]
    assert found[0][0]["path"] == str(query) and found[0][0]["similarity"] == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose([r["similarity"] for r in found[0]], [r["similarity"] for r in found[1]], atol=1e-5)
