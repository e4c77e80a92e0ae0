"""The logged MLflow model embeds images: pyfunc predict and `mlflow models serve` equal the library."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import embed
from pipeline.pyfunc_model import log_embedding_model
from pipeline.store import EmbeddingStore
from test_embed_search import make_images, save_model
from tiny_project import stage_env, write_params
from xbmcore.embedding_store import Embedder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyfunc")
    write_params(root)
    model = save_model(root / "model.pt")
    make_images(root / "images", np.random.default_rng(1))
    (root / "images/owl/broken.jpg").unlink()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("embed", artifact_location=(root / "artifacts").as_uri())
    embedder = Embedder(model, {"backbone": "smallcnn", "embedding_dim": 16, "pretrained": "none",
                                "freeze_bn": False}, 16, 16, source="model.pt")
    with mlflow.start_run(experiment_id=exp):
        info = log_embedding_model(embedder)
    paths = sorted((root / "images").rglob("*.png"))
    return root, uri, info.model_uri, embedder, paths


def test_pyfunc_predict_equals_the_library(logged):
    root, _, model_uri, embedder, paths = logged
    want, kept, skipped = embedder.embed_files(paths, num_workers=0)
    assert len(kept) == len(paths) and not skipped
    loaded = mlflow.pyfunc.load_model(model_uri)
    got = loaded.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    assert got.shape == (len(paths), 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # base64 strings (what JSON carries) are accepted too.
    b64 = loaded.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths[:2]]}))
    np.testing.assert_allclose(b64, want[:2], atol=1e-5)


def test_pyfunc_names_the_row_it_cannot_decode(logged):
    root, _, model_uri, _, paths = logged
    loaded = mlflow.pyfunc.load_model(model_uri)
    with pytest.raises(Exception, match=r"image\[1\]: cannot decode the image"):
        loaded.predict(pd.DataFrame({"image": [paths[0].read_bytes(), b"not an image"]}))


def test_embed_from_the_mlflow_model_equals_model_pt(logged, monkeypatch):
    root, uri, model_uri, _, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    common = ["--images", str(root / "images"), "--params", str(root / "params.yaml"), "--workers", "0"]
    assert embed.main(["--model", model_uri, "--out", str(root / "from_mlflow"), *common]) == 0
    assert embed.main(["--model", str(root / "model.pt"), "--out", str(root / "from_pt"), *common]) == 0
    a, b = EmbeddingStore.load(root / "from_mlflow"), EmbeddingStore.load(root / "from_pt")
    assert a.model.digest == b.model.digest and a.model.source == model_uri
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_an_image_with_its_embedding(logged):
    root, uri, model_uri, embedder, paths = logged
    port = _free_port()
    env = {**stage_env(), "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the model server did not answer /ping within 180 s"
            time.sleep(0.5)
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(p.read_bytes()).decode()] for p in paths[:3]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.array(json.loads(r.read())["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    want, _, _ = embedder.embed_files(paths[:3], num_workers=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
