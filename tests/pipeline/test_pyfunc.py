"""The logged MLflow model embeds images: pyfunc predict and `mlflow models serve` equal the library; it is logged
from code (no pickle) with type hints and an input example, and refuses what is over its limits with a 400 that
names the row or the cap."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import servers
import torch

from bench.serve import blank_png
from pipeline import embed, stages
from pipeline.pyfunc_model import log_embedding_model
from pipeline.store import EmbeddingStore
from pipeline.tracking import StageRun, tracking_uri
from test_embed_search import make_images, save_model
from tiny_project import stage_env, write_params
from pipeline.embedding_store import Embedder
from xbmcore.config import load_params
from xbmcore.events import make_event

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
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mlflow").addHandler(handler)  # MLflow's logger does not propagate to the root
    try:
        with mlflow.start_run(experiment_id=exp), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = log_embedding_model(embedder)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    paths = sorted((root / "images").rglob("*.png"))
    return root, uri, info.model_uri, embedder, paths, said


def test_the_model_is_logged_from_code_with_type_hints_and_an_input_example(logged):
    root, _, model_uri, _, _, said = logged
    for warning in ("CloudPickle", "Add type hints to the `predict` method", "An input example was not provided"):
        assert not [m for m in said if warning in m], warning
    folder = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / "downloaded"))
    conf = mlflow.models.Model.load(folder).flavors["python_function"]
    assert conf["model_code_path"].endswith("pyfunc_code.py") and "python_model" not in conf  # no pickle file
    assert conf["config"] == {"max_images": 64, "max_pixels": 50_000_000}
    assert not list((root / "downloaded").rglob("*.pkl"))
    example = json.loads((root / "downloaded" / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]


def test_pyfunc_predict_equals_the_library(logged):
    root, _, model_uri, embedder, paths, _ = logged
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
    root, _, model_uri, _, paths, _ = logged
    loaded = mlflow.pyfunc.load_model(model_uri)
    with pytest.raises(mlflow.MlflowException, match=r"image\[1\]: cannot decode the image \(UnidentifiedImageError"):
        loaded.predict(pd.DataFrame({"image": [paths[0].read_bytes(), b"not an image"]}))


def test_pyfunc_refuses_a_request_over_the_cap_naming_the_cap(logged):
    _, _, model_uri, _, paths, _ = logged
    loaded = mlflow.pyfunc.load_model(model_uri, model_config={"max_images": 2})  # overrides the logged 64
    images = [paths[0].read_bytes()] * 3
    with pytest.raises(mlflow.MlflowException, match=r"input: 3 images in one request, over the limit of 2 "
                                                     r"\(max_images\)") as err:
        loaded.predict(pd.DataFrame({"image": images}))
    assert err.value.get_http_status_code() == 400
    assert loaded.predict(pd.DataFrame({"image": images[:2]})).shape == (2, 16)


def test_pyfunc_refuses_an_image_over_the_pixel_budget_naming_its_row(logged):
    _, _, model_uri, _, paths, _ = logged
    loaded = mlflow.pyfunc.load_model(model_uri, model_config={"max_pixels": 10_000})
    with pytest.raises(mlflow.MlflowException, match=r"image\[2\]: cannot decode the image \(ImageTooLarge: 200 x "
                                                     r"100 pixels \(0\.02 MP\), over the limit of 0\.01 MP"):
        loaded.predict(pd.DataFrame({"image": [blank_png(100, 100), blank_png(50, 200), blank_png(200, 100)]}))


def test_embed_from_the_mlflow_model_equals_model_pt(logged, monkeypatch):
    root, uri, model_uri, _, _, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    common = ["--images", str(root / "images"), "--params", str(root / "params.yaml"), "--workers", "0"]
    assert embed.main(["--model", model_uri, "--out", str(root / "from_mlflow"), *common]) == 0
    assert embed.main(["--model", str(root / "model.pt"), "--out", str(root / "from_pt"), *common]) == 0
    a, b = EmbeddingStore.load(root / "from_mlflow"), EmbeddingStore.load(root / "from_pt")
    assert a.model.digest == b.model.digest and a.model.source == model_uri
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


@contextlib.contextmanager
def served(model_uri: str, uri: str):
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1, once it answers /ping (polled every 0.5 s,
    within 180 s); stopped (its whole process group) on the way out. Yields (port, server process)."""
    port = servers.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env={**stage_env(), "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        ready = servers.wait_http(f"http://127.0.0.1:{port}/ping", server)
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        assert ready, "the model server did not answer /ping within 180 s"
        yield port, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()



def _post(port: int, cells: list[str]) -> tuple[int, dict]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_mlflow_models_serve_answers_an_image_with_its_embedding_and_hostile_requests_with_400(logged):
    root, uri, model_uri, embedder, paths, _ = logged
    with served(model_uri, uri) as (port, server):
        images = [_b64(p.read_bytes()) for p in paths[:3]]
        status, answer = _post(port, images)
        assert status == 200
        got = np.array(answer["predictions"], dtype=np.float32)
        hostile = {  # cells, what the 400's message must say
            "over the cap": (images[:1] * 65, r"input: 65 images in one request, over the limit of 64 \(max_images\)"),
            "a bomb": (images[:1] + [_b64(blank_png(20_000, 20_000, 1))],
                       r"image\[1\]: cannot decode the image \(ImageTooLarge: over the pixel limit of 50 MP"),
            "not an image": ([_b64(b"<html>hello</html>")], r"image\[0\]: cannot decode the image \(Unidentified"),
            # MLflow decodes a binary column's base64 before predict, and answers a bad one itself (without a row)
            "bad base64": (images[:2] + ["*not base64*"], r"Invalid base64-encoded string"),
        }
        for name, (cells, message) in hostile.items():
            status, answer = _post(port, cells)
            assert status == 400, (name, answer)
            assert re.search(message, answer["message"]), (name, answer["message"][-600:])
        status, answer = _post(port, images)  # still up, and still right
        assert status == 200 and server.poll() is None
        np.testing.assert_array_equal(np.array(answer["predictions"], dtype=np.float32), got)
    want, _, _ = embedder.embed_files(paths[:3], num_workers=0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_evaluate_stage_links_its_metrics_to_the_logged_model(tmp_path, monkeypatch):
    """The LoggedModel's own metrics (its page in `mlflow ui`) are the evaluation's, equal to the run's, at its
    step, linked to the run and to the test split as a dataset; the run's history keeps one point per metric."""
    for var in ("MLFLOW_TRACKING_URI", "XBM_MLFLOW_RUN_ID", "XBM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    params = load_params(write_params(tmp_path))
    prepared = tmp_path / params.data.prepared / params.data.name
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text('{"dataset": "synthetic"}\n')
    model = save_model(tmp_path / "model.pt")
    metrics = {"recall@1": 0.625, "recall@2": 0.75, "map@r": 0.3125, "nmi": 0.5}  # exact in binary
    before = mlflow.get_tracking_uri()  # _log_model sets the project's; the module's fixture uses its own
    try:
        with StageRun(params, tmp_path, "evaluate", finish=True, progress=False) as run:
            evaluation = make_event("eval", 14, phase="evaluate", split="test", metrics=metrics)
            run.sink.emit(evaluation)  # as run_evaluate does: the sink logs the run's metrics in the background
            stages._log_model(run, model, params, tmp_path, evaluation)
        client = mlflow.MlflowClient(tracking_uri(params, tmp_path))
        got = client.get_run(run.run_id)
        [logged] = mlflow.search_logged_models(experiment_ids=[got.info.experiment_id], output_format="list")
        linked = mlflow.get_logged_model(logged.model_id).metrics
        history = client.get_metric_history(run.run_id, "test/recall_at_1")
    finally:
        mlflow.set_tracking_uri(before)
    want = {"test/recall_at_1": 0.625, "test/recall_at_2": 0.75, "test/map_at_r": 0.3125, "test/nmi": 0.5}
    assert {m.key: m.value for m in linked} == want == {k: got.data.metrics[k] for k in want}
    assert logged.source_run_id == run.run_id
    digest = hashlib.sha256((prepared / "meta.json").read_bytes()).hexdigest()[:12]
    assert {(m.step, m.run_id, m.dataset_name, m.dataset_digest) for m in linked} == {
        (14, run.run_id, "synthetic/test", digest)}
    assert [(d.dataset.name, d.dataset.digest) for d in got.inputs.dataset_inputs] == [("synthetic/test", digest)]
    assert [(m.step, m.value) for m in history] == [(14, 0.625)]  # the model's link added no second point


def test_a_timm_model_is_served_and_embedded_with_its_own_input(tmp_path, monkeypatch):
    """timm's test_vit at 32 px with its weights' filter and normalisation (bicubic, mean and std 0.5): the logged
    model is rebuilt from model_params without the weights file, and pipeline.embed, pyfunc predict and
    `mlflow models serve` give the library's embeddings."""
    pytest.importorskip("timm")
    from xbmcore.backbones import resolve_input
    from xbmcore.checkpoint import save_checkpoint
    from xbmcore.config import ModelParams
    from xbmcore.models import build_model

    model_section = {"backbone": "timm:test_vit", "embedding_dim": 16, "pretrained": "none", "input_size": 32}
    write_params(tmp_path, model=model_section, data={k: "auto" for k in ("train_size", "test_resize", "test_size")})
    params = resolve_input(load_params(tmp_path / "params.yaml"), tmp_path)
    d = params.data
    assert (d.test_size, d.interpolation, d.mean) == (32, "bicubic", (0.5,) * 3)
    torch.manual_seed(0)
    model = build_model(ModelParams(**model_section)).eval()
    save_checkpoint({"model": model.state_dict(), "model_params": params.model.model_dump(exclude={"sync_bn"}),
                     "step": 1, "phase": "xbm"}, tmp_path / "model.pt")
    make_images(tmp_path / "images", np.random.default_rng(2))
    (tmp_path / "images/owl/broken.jpg").unlink()
    paths = sorted((tmp_path / "images").rglob("*.png"))
    embedder = Embedder(model, params.model.model_dump(), d.test_resize, d.test_size, source="model.pt",
                        interpolation=d.interpolation, mean=d.mean, std=d.std)
    want = embedder.embed_images([p.read_bytes() for p in paths])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("timm", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        model_uri = log_embedding_model(embedder).model_uri
    got = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    np.testing.assert_allclose(got, want, atol=1e-5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    common = ["--images", str(tmp_path / "images"), "--params", str(tmp_path / "params.yaml"), "--workers", "0"]
    assert embed.main(["--model", model_uri, "--out", str(tmp_path / "from_mlflow"), *common]) == 0
    assert embed.main(["--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "from_pt"), *common]) == 0
    a, b = EmbeddingStore.load(tmp_path / "from_mlflow"), EmbeddingStore.load(tmp_path / "from_pt")
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert a.model.digest == b.model.digest and len(a.embeddings) == len(paths) + 1  # and the BMP copy
    with served(model_uri, uri) as (port, _):
        status, answer = _post(port, [_b64(p.read_bytes()) for p in paths[:2]])
        assert status == 200
        np.testing.assert_allclose(np.array(answer["predictions"], dtype=np.float32), want[:2], atol=1e-5)
