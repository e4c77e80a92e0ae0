"""pipeline.embed / pipeline.search / --dedup on a generated folder, against brute-force numpy references."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import embed, search
from pipeline.store import EmbeddingStore
from tiny_project import write_params
from xbmcore.checkpoint import save_checkpoint
from pipeline.collection import load_rgb
from xbmcore.config import DataParams, ModelParams
from xbmcore.data.transforms import pil_transform
from xbmcore.models import build_model

torch.set_num_threads(1)
CLASSES = {"cat": 4, "dog": 3, "owl": 3}


def save_model(path, seed=0, dim=16):
    torch.manual_seed(seed)
    p = ModelParams(embedding_dim=dim)
    model = build_model(p)
    save_checkpoint({"model": model.state_dict(), "model_params": p.model_dump(), "step": 1, "phase": "xbm"}, path)
    return model.eval()


def make_images(root, rng):
    """<root>/<class>/<i>.png (varied sizes and modes), a BMP copy of one of them, and a corrupt file."""
    for c, n in CLASSES.items():
        (root / c).mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for i in range(n):
            h, w = rng.integers(14, 30, size=2)
            px = np.clip(base + rng.normal(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(px)
            im = im.convert("L") if i == 1 else im  # a grayscale file: converted to RGB
            im.save(root / c / f"{i}.png")
    Image.open(root / "cat/0.png").save(root / "cat/0_copy.bmp")  # the same pixels in another format
    (root / "owl" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    params = write_params(root)
    model = save_model(root / "model.pt")
    make_images(root / "images", np.random.default_rng(0))
    return root, params, model


def reference_embeddings(model, paths, size=16):
    """One image at a time: decode, test transform, forward."""
    tf = pil_transform(DataParams(test_resize=size, test_size=size), train=False)
    with torch.no_grad():
        return np.stack([model(tf(load_rgb(p))[None])[0].numpy() for p in paths]).astype(np.float64)


def run_embed(root, params, out, *extra):
    return embed.main(["--model", str(root / "model.pt"), "--images", str(root / "images"), "--out", str(out),
                       "--params", str(params), "--workers", "0", "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def index(project):
    root, params, _ = project
    assert run_embed(root, params, root / "index") == 0
    return EmbeddingStore.load(root / "index")


def test_embed_writes_embeddings_paths_labels_and_the_model_identity(project, index, capsys):
    root, _, model = project
    names = sorted(f"{c}/{i}.png" for c, n in CLASSES.items() for i in range(n)) + ["cat/0_copy.bmp"]
    assert sorted(index.names) == sorted(names)
    assert index.classes == ["cat", "dog", "owl"]
    assert [index.classes[label] for label in index.labels] == [n.split("/")[0] for n in index.names]
    ref = reference_embeddings(model, [root / "images" / n for n in index.names])
    np.testing.assert_allclose(index.embeddings, ref, atol=1e-5)
    assert index.embeddings.dtype == np.float32 and index.index is None and len(index) == len(names)
    meta = json.loads((root / "index/meta.json").read_text())
    assert meta["model"]["embedding_dim"] == 16 and meta["model"]["test_size"] == 16
    assert meta["model"]["source"] == str((root / "model.pt").resolve()) and len(meta["model"]["digest"]) == 64
    # The undecodable image: named, skipped and counted.
    assert [s[0] for s in meta["skipped"]] == ["owl/broken.jpg"]
    assert not list((root / "index").rglob(".*.tmp"))


def test_float16_halves_the_embeddings(project, index):
    root, params, _ = project
    assert run_embed(root, params, root / "index16", "--dtype", "float16") == 0
    half = EmbeddingStore.load(root / "index16")
    assert half.embeddings.dtype == np.float16
    np.testing.assert_allclose(half.embeddings.astype(np.float32), index.embeddings, atol=2e-3)
    size = lambda folder: sum(p.stat().st_size for p in (root / folder / "shards").glob("*.npy"))  # noqa: E731
    assert size("index16") < 0.6 * size("index")


def test_strict_stops_at_the_undecodable_image(project, capsys):
    root, params, _ = project
    assert run_embed(root, params, root / "strict", "--strict") == 1
    assert "owl/broken.jpg: cannot decode the image" in capsys.readouterr().err
    assert not (root / "strict/meta.json").exists()


def brute_force_search(index, q, k):
    sim = q.astype(np.float64) @ index.embeddings.astype(np.float64).T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, 1), order


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_search_equals_brute_force(project, index, capsys, kind):
    root, params, model = project
    folder = root / "index" if kind == "exact" else root / f"index_{kind}"
    if kind != "exact":
        assert run_embed(root, params, folder, "--index", kind, "--code-bytes", "8") == 0
        assert json.loads((folder / "meta.json").read_text())["index"]["kind"] == kind
    query = root / "images" / "dog" / "1.png"
    assert search.main(["--index", str(folder), "--query", str(query), "-k", "4", "--json",
                        "--params", str(params)]) == 0
    found = json.loads(capsys.readouterr().out)
    q = reference_embeddings(model, [query])
    sims, _ = brute_force_search(index, q, 4)
    all_sims = (q @ index.embeddings.astype(np.float64).T)[0]
    got = found[0]["results"]
    # The top-k similarities, and each listed image's own similarity (exact duplicates tie in either order).
    np.testing.assert_allclose([r["similarity"] for r in got], sims[0], atol=1e-5)
    rows = [index.names.index(r["path"].split("images/", 1)[1]) for r in got]
    np.testing.assert_allclose(all_sims[rows], sims[0], atol=1e-5)
    assert len(set(rows)) == 4
    assert found[0]["results"][0]["path"] == str(query) and found[0]["results"][0]["class"] == "dog"


def test_search_a_folder_as_a_table(project, index, capsys):
    root, params, _ = project
    assert search.main(["--index", str(root / "index"), "--query", str(root / "images" / "dog"), "-k", "2",
                        "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert out.count("query: ") == 3 and "[dog]" in out


def union_find_groups(x, threshold):
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    parent = list(range(len(x)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if sim[i, j] > threshold:
                parent[find(i)] = find(j)
    groups = {}
    for i in range(len(x)):
        groups.setdefault(find(i), []).append(i)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
def test_dedup_groups_equal_connected_components_of_brute_force_pairs(project, index, capsys, kind):
    """ivfpq: one list and R >= N here, so the two-stage search must find every pair exactly."""
    root, params, _ = project
    folder = root / "index"
    if kind == "ivfpq":
        folder = root / "dedup_ivfpq"
        assert run_embed(root, params, folder, "--index", kind, "--code-bytes", "8") == 0
        assert EmbeddingStore.load(folder).spec["nlist"] == 1
    x = index.embeddings.astype(np.float32)
    sim = x @ x.T
    off = np.sort(sim[np.triu_indices(len(x), 1)])
    for threshold in (0.999, float(off[-4]) - 1e-4, float(np.median(off))):
        out = root / f"dups_{kind}_{threshold}.csv"
        assert search.main(["--index", str(folder), "--dedup", "--threshold", str(threshold),
                            "--out", str(out)]) == 0
        with open(out) as f:
            rows = list(csv.DictReader(f))
        got = {}
        for r in rows:
            got.setdefault(r["group"], []).append(index.names.index(r["path"].split("images/", 1)[1]))
        assert all(int(r["count"]) == len(got[r["group"]]) for r in rows)
        assert sorted(sorted(g) for g in got.values()) == union_find_groups(x, threshold)
    # The BMP copy of cat/0.png is its duplicate at 0.999.
    with open(root / f"dups_{kind}_0.999.csv") as f:
        paths = {r["path"].rsplit("images/", 1)[1] for r in csv.DictReader(f)}
    assert {"cat/0.png", "cat/0_copy.bmp"} <= paths
    assert "groups of near-duplicates" in capsys.readouterr().err


# ---- bad input ----

def test_a_model_with_another_dimension_or_input_size_is_refused_naming_both(project, index, capsys):
    root, params, _ = project
    save_model(root / "model8.pt", dim=8)
    query = str(root / "images/dog/0.png")
    assert search.main(["--index", str(root / "index"), "--query", query, "--model", str(root / "model8.pt"),
                        "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "embedding_dim 16" in err and "embedding_dim 8" in err and "model8.pt" in err
    assert search.main(["--index", str(root / "index"), "--query", query, "--params", str(params),
                        "-S", "data.test_size=12", "-S", "data.test_resize=12"]) == 1
    err = capsys.readouterr().err
    assert "test_size 16" in err and "test_size 12" in err


def test_a_query_with_another_model_is_refused(project, index, capsys):
    root, params, _ = project
    save_model(root / "other.pt", seed=1)
    assert search.main(["--index", str(root / "index"), "--query", str(root / "images/dog/0.png"),
                        "--model", str(root / "other.pt"), "--params", str(params)]) == 1
    assert "built by another model" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("empty", "no images found"),
    ("missing_model", "no such file (expected the train_xbm stage's model.pt"),
    ("scheme", "unknown URI scheme 's3'"),
    ("not_an_index", "not an embedded collection"),
    ("bad_csv", "expected 2 columns"),
])
def test_bad_input_is_a_clear_error(project, tmp_path, capsys, case, message):
    root, params, _ = project
    model, images = str(root / "model.pt"), str(root / "images")
    if case == "empty":
        (tmp_path / "empty").mkdir()
        images = str(tmp_path / "empty")
    elif case == "missing_model":
        model = str(tmp_path / "nope" / "model.pt")
    elif case == "scheme":
        model = "s3://bucket/model"
    elif case == "bad_csv":
        (tmp_path / "list.csv").write_text("path,label\nimages/cat/0.png,cat\nimages/cat/1.png\n")
        images = str(tmp_path / "list.csv")
    if case == "not_an_index":
        rc = search.main(["--index", str(tmp_path), "--query", str(root / "images/dog/0.png")])
    else:
        rc = embed.main(["--model", model, "--images", images, "--out", str(tmp_path / "out"),
                         "--params", str(params), "--workers", "0"])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_csv_layout_with_labels(project, tmp_path):
    root, params, model = project
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(
        f"{root}/images/{c}/0.png,{c}\n" for c in CLASSES))
    assert embed.main(["--model", str(root / "model.pt"), "--images", str(tmp_path / "list.csv"), "--out",
                       str(tmp_path / "out"), "--params", str(params), "--workers", "0"]) == 0
    store = EmbeddingStore.load(tmp_path / "out")
    assert store.classes == sorted(CLASSES) and store.labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(store.embeddings, reference_embeddings(
        model, [root / f"images/{c}/0.png" for c in CLASSES]), atol=1e-5)


def test_a_prepared_dataset_split_through_its_own_storage(project, tmp_path):
    """--images data/prepared/<name>: the embedded set's test split, each image against a one-image forward."""
    from tiny_project import tiny_params
    from xbmcore.config import validate_params
    from xbmcore.data import prepare_dataset
    from xbmcore.data.index import read_index
    from xbmcore.data.transforms import BatchTransform

    root, params, model = project
    p = validate_params(tiny_params())
    prepared = prepare_dataset(p.data, tmp_path, progress=False)
    assert embed.main(["--model", str(root / "model.pt"), "--images", str(prepared), "--out", str(tmp_path / "out"),
                       "--params", str(params), "--workers", "0", "--split", "test"]) == 0
    store = EmbeddingStore.load(tmp_path / "out")
    index = read_index(prepared, array_backed=True)
    test = index.splits == "test"
    assert store.names == [f"images.npy:{i}" for i in index.items[test]]
    assert store.labels.tolist() == index.labels[test].tolist()
    images = np.load(prepared / "images.npy")
    tf = BatchTransform(DataParams(test_resize=16, test_size=16), train=False)
    with torch.no_grad():
        ref = np.stack([model(tf(torch.from_numpy(images[i:i + 1])))[0].numpy() for i in index.items[test]])
    np.testing.assert_allclose(store.embeddings, ref, atol=1e-5)
