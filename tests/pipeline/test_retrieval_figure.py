"""The evaluate stage's retrieval figure, from a tiny trained run: what it shows against a float64 brute force, the
MLflow artifact, and the DVC image plot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import stages
from pipeline.tracking import tracking_uri
from tiny_project import REPO, run_pipeline_in_process, stage_env, write_params
from xbmcore.evaluate import compute_embeddings
from pipeline.figures import BACKGROUND, FIGURE_K, FIGURE_QUERIES, FIGURE_SEED, OTHER, QUERY, SAME, split_figure
from xbmcore.retrieval import sample_queries

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    p, _ = run_pipeline_in_process(root)
    return root, p


def _reference(root, p):
    """Test-split embeddings by the library, the figure's fixed queries, and their top-k in float64."""
    model, _ = stages.load_model(p, root)
    test = stages._splits(p, root).test
    q, ql = compute_embeddings(model, test)
    picked = sample_queries(len(q), FIGURE_QUERIES, FIGURE_SEED)
    q64 = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
    sim = q64[picked] @ q64.T
    sim[np.arange(len(picked)), picked] = -np.inf  # a query is not its own neighbour
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :FIGURE_K]
    return test, q, ql, picked, np.take_along_axis(sim, ids, 1), ids


def test_figure_shows_each_querys_top5_framed_by_class(run):
    root, p = run
    png = np.asarray(Image.open(root / "plots" / "retrieval.png").convert("RGB"))
    test, q, ql, picked, ref_sims, ref_ids = _reference(root, p)
    fig = split_figure(test, None, q, ql)
    assert (np.asarray(fig.image) == png).all()  # the stage's file is this figure
    np.testing.assert_array_equal(fig.queries, picked)
    np.testing.assert_allclose(fig.sims, ref_sims, atol=1e-5)
    # the same neighbours, best first, up to float32 order among near-ties
    for r in range(len(picked)):
        for j in range(FIGURE_K):
            if fig.ids[r, j] != ref_ids[r, j]:
                assert abs(fig.sims[r, j] - ref_sims[r, j]) < 1e-5 and fig.ids[r, j] in ref_ids[r]
    assert not any(picked[r] in fig.ids[r] for r in range(len(picked)))  # never its own neighbour
    assert fig.frames.shape == (FIGURE_QUERIES, 1 + FIGURE_K, 4)
    same = ql[fig.ids] == ql[picked, None]
    assert same.any() and (~same).any()  # the tiny model gets some right and some wrong: both colours checked
    for r in range(FIGURE_QUERIES):
        for c in range(1 + FIGURE_K):
            x0, y0, x1, y1 = fig.frames[r, c]
            want = QUERY if c == 0 else (SAME if same[r, c - 1] else OTHER)
            assert tuple(png[y0, x0]) == want and tuple(png[y1, x1]) == want, (r, c)
        line = png[fig.frames[r, 0, 1] + 1]  # through the top border of the row's frames
        framed = ~(line == BACKGROUND).all(1)
        assert int(framed[0] + (framed[1:] & ~framed[:-1]).sum()) == 1 + FIGURE_K
    # the query thumbnail is the stored test image, upscaled: its centre pixel is the image's centre pixel
    x0, y0, x1, y1 = fig.frames[0, 0]
    img = np.asarray(test.image(int(picked[0])))
    h, w = img.shape[:2]
    assert tuple(png[(y0 + y1) // 2 + 1, (x0 + x1) // 2 + 1]) == tuple(img[h // 2, w // 2])


def test_figure_is_an_mlflow_artifact_of_the_run(run, tmp_path):
    root, p = run
    client = mlflow.MlflowClient(tracking_uri(p, root))
    exp = client.get_experiment_by_name(p.tracking.experiment)
    (r,) = client.search_runs([exp.experiment_id])
    assert "retrieval.png" in [a.path for a in client.list_artifacts(r.info.run_id)]
    got = client.download_artifacts(r.info.run_id, "retrieval.png", str(tmp_path))
    assert open(got, "rb").read() == (root / "plots" / "retrieval.png").read_bytes()


def test_dvc_declares_the_figure_as_an_image_plot(run):
    root, _ = run
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert {"plots/retrieval.png": {"cache": False}} in spec["stages"]["evaluate"]["outs"]
    assert "plots/retrieval.png" in spec["plots"]
    for dep in ("pipeline/figures.py", "xbmcore/retrieval.py"):
        assert dep in spec["stages"]["evaluate"]["deps"]
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root)
    env = stage_env()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "plots/retrieval.png"],
                         cwd=root, env=env, capture_output=True, text=True, check=True)
    (entry,) = json.loads(out.stdout)["data"]["plots/retrieval.png"]
    assert entry["type"] == "image"
    assert Image.open(entry["url"]).size == Image.open(root / "plots" / "retrieval.png").size
