"""Miniature trees in each published layout: parsed into the right classes, splits and counts; bad input."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xbmcore.config import DataParams
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data import sources as sources_mod
from xbmcore.data.sources import Remote, get_source
from xbmcore.data.transforms import MEAN, STD


def colour(class_id: int) -> tuple[int, int, int]:
    # A distinct flat colour per class, so a loaded image tells which file was read.
    return (class_id * 37) % 256, (class_id * 91) % 256, (class_id * 53 + 11) % 256


def image(path: Path, class_id: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour(class_id)).save(path, quality=100)  # PNG would do; JPEG like the datasets
    return str(path)


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def params(tmp_path: Path, name: str, **kw) -> DataParams:
    return DataParams(name=name, root=str(tmp_path / "raw"), prepared=str(tmp_path / "prepared"), **kw)


def mean_colour(x: torch.Tensor) -> np.ndarray:
    # Undo the normalisation of a 3 x S x S image and average: RGB in 0..255.
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((x * s + m) * 255).mean((1, 2)).numpy()


def check_loads_its_own_file(ds) -> None:
    for i in range(len(ds)):
        img, label, idx = ds[i]
        assert img.shape == (3, 32, 32) and idx == i and label == ds.labels[i]
        np.testing.assert_allclose(mean_colour(img), colour(int(ds.class_ids[i])), atol=3.0)


# --------------------------------------------------------------------------------------------------- layouts

def make_sop(root: Path) -> Path:
    d = root / "Stanford_Online_Products"
    head = "image_id class_id super_class_id path"
    train = [(1, 1, "bicycle_final/1_0.JPG"), (1, 1, "bicycle_final/1_1.JPG"), (2, 1, "bicycle_final/2_0.JPG"),
             (2, 1, "bicycle_final/2_1.JPG"), (3, 2, "chair_final/3_0.JPG"), (3, 2, "chair_final/3_1.JPG")]
    test = [(4, 1, "bicycle_final/4_0.JPG"), (4, 1, "bicycle_final/4_1.JPG"), (5, 2, "chair_final/5_0.JPG"),
            (5, 2, "chair_final/5_1.JPG"), (5, 2, "chair_final/5_2.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        write(d / name, [head] + [f"{k + 1} {c} {s} {p}" for k, (c, s, p) in enumerate(rows)])
        for c, _, p in rows:
            image(d / p, c)
    return d


def test_sop(tmp_path):
    make_sop(tmp_path / "raw")
    p = params(tmp_path, "sop", val_fraction=0.34)
    out = prepare_dataset(p, tmp_path, progress=False)
    s = open_splits(out, p)
    assert (len(s.train), s.train.num_classes, sorted(set(s.train.class_ids))) == (4, 2, [1, 2])
    assert (len(s.val), sorted(set(s.val.class_ids))) == (2, [3])  # the last training class
    assert (len(s.test), sorted(set(s.test.class_ids))) == (5, [4, 5])
    assert s.query is None and s.gallery is None
    assert s.train.train and not s.test.train
    np.testing.assert_array_equal(s.test.labels, [0, 0, 1, 1, 1])  # contiguous within the split
    np.testing.assert_array_equal(s.test.super_labels, [1, 1, 2, 2, 2])
    check_loads_its_own_file(s.test)
    check_loads_its_own_file(s.train.without_augmentation())
    img, label, i = s.train[0]  # augmented: size and label still right
    assert img.shape == (3, 32, 32) and label == 0 and i == 0


def test_inshop(tmp_path, caplog):
    d = tmp_path / "raw" / "InShop"
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
            ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "train"),
            ("img/MEN/Denim/id_00000081/01_1_front.jpg", "id_00000081", "train"),
            ("img/MEN/Denim/id_00000081/01_2_side.jpg", "id_00000081", "train"),
            ("img/WOMEN/Skirts/id_00000100/01_1_front.jpg", "id_00000100", "query"),
            ("img/WOMEN/Skirts/id_00000100/01_2_side.jpg", "id_00000100", "gallery"),
            ("img/WOMEN/Skirts/id_00000100/01_3_back.jpg", "id_00000100", "gallery"),
            ("img/MEN/Denim/id_00000200/01_1_front.jpg", "id_00000200", "query")]
    write(d / "Eval" / "list_eval_partition.txt",
          [str(len(rows)), "image_name item_id evaluation_status"] + [" ".join(r) for r in rows])
    for rel, item, _ in rows:
        image(d / rel, int(item[3:]))
    p = params(tmp_path, "inshop", val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert s.test is None and s.val is None
    assert (len(s.train), sorted(set(s.train.class_ids))) == (6, [2, 80, 81])
    # Item 200 has no gallery image: as a query it can never be retrieved, so it is left out, with a count.
    assert (len(s.query), sorted(set(s.query.class_ids))) == (1, [100])
    assert "query: 1 images of 1 classes without a gallery image left out" in caplog.text
    assert (len(s.gallery), sorted(set(s.gallery.class_ids))) == (2, [100])
    # Super-class = gender/category in sorted order: MEN/Denim 0, WOMEN/Dresses 1, WOMEN/Skirts 2.
    np.testing.assert_array_equal(s.train.super_labels, [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(s.query.super_labels, [2])
    check_loads_its_own_file(s.query)


def test_inshop_count_line_must_match(tmp_path):
    d = tmp_path / "raw" / "InShop"
    write(d / "Eval" / "list_eval_partition.txt",
          ["3", "image_name item_id evaluation_status", "img/a/b/id_00000001/x.jpg id_00000001 train"])
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:1: declares 3 images, but 1 rows follow"):
        prepare_dataset(params(tmp_path, "inshop"), tmp_path, progress=False)


def test_cub(tmp_path):
    d = tmp_path / "raw" / "CUB_200_2011"
    rows = [(1, "001.Black_footed_Albatross/a1.jpg"), (1, "001.Black_footed_Albatross/a2.jpg"),
            (2, "002.Laysan_Albatross/b1.jpg"), (2, "002.Laysan_Albatross/b2.jpg"), (2, "002.Laysan_Albatross/b3.jpg"),
            (100, "100.Brown_Pelican/c1.jpg"), (100, "100.Brown_Pelican/c2.jpg"),
            (101, "101.White_Pelican/d1.jpg"), (101, "101.White_Pelican/d2.jpg"),
            (200, "200.Common_Yellowthroat/e1.jpg"), (200, "200.Common_Yellowthroat/e2.jpg")]
    write(d / "images.txt", [f"{k + 1} {rel}" for k, (_, rel) in enumerate(rows)])
    # Listed in another order than images.txt: the image id joins the two files.
    write(d / "image_class_labels.txt", [f"{k + 1} {c}" for k, (c, _) in reversed(list(enumerate(rows)))])
    for c, rel in rows:
        image(d / "images" / rel, c)
    p = params(tmp_path, "cub", val_fraction=0.0)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert (len(s.train), sorted(set(s.train.class_ids))) == (7, [1, 2, 100])  # classes 1-100
    assert (len(s.test), sorted(set(s.test.class_ids))) == (4, [101, 200])  # classes 101-200
    check_loads_its_own_file(s.test)
    check_loads_its_own_file(s.train.without_augmentation())


def test_cars(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    d = tmp_path / "raw" / "cars196"
    classes = [1, 1, 98, 98, 99, 99, 99, 196, 196, 50]
    annos = np.zeros(len(classes), dtype=[("relative_im_path", object), ("bbox_x1", object), ("class", object),
                                          ("test", object)])
    for k, c in enumerate(classes):
        rel = f"car_ims/{k + 1:06d}.jpg"
        annos[k] = (rel, 1, c, k % 2)  # the `test` flag is the classification split: ignored for retrieval
        image(d / rel, c)
    d.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(d / "cars_annos.mat", {"annotations": annos[None, :], "class_names": np.array(["a", "b"])})
    p = params(tmp_path, "cars", val_fraction=0.0)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert (len(s.train), sorted(set(s.train.class_ids))) == (5, [1, 50, 98])  # classes 1-98
    assert (len(s.test), sorted(set(s.test.class_ids))) == (5, [99, 196])  # classes 99-196
    check_loads_its_own_file(s.test)


def make_vehicleid(root: Path) -> Path:
    d = root / "VehicleID_V1.0"
    train = [("0000001", 1), ("0000002", 1), ("0000003", 2), ("0000004", 2), ("0000005", 2)]
    tests = {800: [("0000010", 10), ("0000011", 10)],
             1600: [("0000010", 10), ("0000011", 10), ("0000012", 11), ("0000013", 11)],
             2400: [("0000010", 10), ("0000011", 10), ("0000012", 11), ("0000013", 11), ("0000014", 12),
                    ("0000015", 12)]}
    write(d / "train_test_split" / "train_list.txt", [f"{n} {v:04d}" for n, v in train])
    for size, rows in tests.items():
        write(d / "train_test_split" / f"test_list_{size}.txt", [f"{n} {v:04d}" for n, v in rows])
    write(d / "attribute" / "model_attr.txt", ["1 7", "2 7", "10 3"])
    for n, v in train + tests[2400]:
        image(d / "image" / f"{n}.jpg", v)
    return d


def test_vehicleid(tmp_path):
    make_vehicleid(tmp_path / "raw")
    for size, n_test, test_classes in ((800, 2, [10]), (1600, 4, [10, 11]), (2400, 6, [10, 11, 12])):
        p = params(tmp_path, "vehicleid", val_fraction=0.0, vehicleid_test=size)
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)  # the test size is part of the recipe
        assert (len(s.train), sorted(set(s.train.class_ids))) == (5, [1, 2])
        assert (len(s.test), sorted(set(s.test.class_ids))) == (n_test, test_classes)
        assert s.query is None and s.gallery is None  # the test list is searched against itself
    np.testing.assert_array_equal(s.train.super_labels, [7, 7, 7, 7, 7])
    np.testing.assert_array_equal(s.test.super_labels, [3, 3, -1, -1, -1, -1])  # model unknown: -1
    check_loads_its_own_file(s.test)


# ------------------------------------------------------------------------------------------ idempotence, val

def test_prepared_folder_is_verified_not_rebuilt(tmp_path):
    d = make_sop(tmp_path / "raw")
    p = params(tmp_path, "sop", val_fraction=0.0)
    out = prepare_dataset(p, tmp_path, progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns
    prepare_dataset(p, tmp_path, progress=False)
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    # A changed annotation file or parameter makes a new index.
    text = (d / "Ebay_test.txt").read_text().splitlines()
    write(d / "Ebay_test.txt", text[:-1])
    prepare_dataset(p, tmp_path, progress=False)
    assert len(open_splits(out, p).test) == 4
    p2 = params(tmp_path, "sop", val_fraction=0.34)
    assert len(open_splits(prepare_dataset(p2, tmp_path, progress=False), p2).val) == 2


def test_val_fraction_leaving_too_few_training_classes(tmp_path):
    make_sop(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"val_fraction=0.9: the training split has 3 classes"):
        prepare_dataset(params(tmp_path, "sop", val_fraction=0.9), tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------- bad input

def test_wrong_column_count_names_file_and_line(tmp_path):
    d = make_sop(tmp_path / "raw")
    lines = (d / "Ebay_train.txt").read_text().splitlines()
    lines[2] = "2 1 bicycle_final/1_1.JPG"  # line 3: a column missing
    write(d / "Ebay_train.txt", lines)
    with pytest.raises(ValueError, match=r"Ebay_train.txt:3: expected 4 columns \(image_id class_id "
                                         r"super_class_id path\), got 3"):
        prepare_dataset(params(tmp_path, "sop"), tmp_path, progress=False)


def test_non_integer_and_bad_header(tmp_path):
    d = make_sop(tmp_path / "raw")
    lines = (d / "Ebay_test.txt").read_text().splitlines()
    write(d / "Ebay_test.txt", lines[:4] + ["5 five 2 chair_final/5_0.JPG"])
    with pytest.raises(ValueError, match=r"Ebay_test.txt:5: column 'class_id' must be an integer, got 'five'"):
        prepare_dataset(params(tmp_path, "sop"), tmp_path, progress=False)
    write(d / "Ebay_test.txt", ["id class super path"] + lines[1:])
    with pytest.raises(ValueError, match=r"Ebay_test.txt:1: expected the header"):
        prepare_dataset(params(tmp_path, "sop"), tmp_path, progress=False)
    vid = make_vehicleid(tmp_path / "raw")
    write(vid / "train_test_split" / "train_list.txt", ["0000001 0001", "0000002 0001 extra"])
    with pytest.raises(ValueError, match=r"train_list.txt:2: expected 2 columns \(image_name vehicle_id\), got 3"):
        prepare_dataset(params(tmp_path, "vehicleid"), tmp_path, progress=False)


def test_missing_image_is_named_or_skipped_with_a_count(tmp_path, caplog):
    d = make_sop(tmp_path / "raw")
    (d / "chair_final" / "5_1.JPG").unlink()
    (d / "chair_final" / "5_2.JPG").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"2 of 11 listed images cannot be read: .*5_1.JPG \(missing\); "
                                         r".*5_2.JPG \(corrupt"):
        prepare_dataset(params(tmp_path, "sop", val_fraction=0.0), tmp_path, progress=False)
    p = params(tmp_path, "sop", val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(p, tmp_path, progress=False)
    assert "skipped 2 of 11 listed images" in caplog.text
    # Class 5 kept one of its three images: as a query it can never be retrieved, so it is left out too.
    assert "test: 1 classes with a single image left out" in caplog.text
    assert len(open_splits(out, p).test) == 2


def test_image_corrupt_in_its_pixel_data_is_found_when_the_cache_is_built(tmp_path, caplog):
    d = make_sop(tmp_path / "raw")
    path = d / "chair_final" / "5_0.JPG"
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated: fails only when decoded
    with pytest.raises(ValueError, match=r"1 of 11 listed images cannot be decoded: .*5_0.JPG \(cannot decode: "
                                         r"OSError: image file is truncated.*data.skip_corrupt: true"):
        prepare_dataset(params(tmp_path, "sop", val_fraction=0.0), tmp_path, progress=False)
    assert not (tmp_path / "prepared" / "sop" / "meta.json").exists()
    p = params(tmp_path, "sop", val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert "skipped 1 of 11 listed images that cannot be decoded" in caplog.text and "5_0.JPG" in caplog.text
    assert len(s.test) == 4 and sorted(s.test.class_ids) == [4, 4, 5, 5]
    check_loads_its_own_file(s.test)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known datasets: synthetic, sop, inshop, cub, "
                                         "cars, vehicleid"):
        get_source("imagenet")
    with pytest.raises(ValueError, match="'synthetic', 'sop', 'inshop', 'cub', 'cars', 'vehicleid', 'folder' or "
                                         "'csv'"):
        DataParams(name="imagenet")


@pytest.mark.parametrize("name, where, to", [
    ("inshop", "mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html", "InShop/Eval/list_eval_partition"),
    ("vehicleid", "pkuml.org/resources/pku-vehicleid.html", "VehicleID_V1.0/train_test_split/train_list.txt"),
    ("cars", "offline", "cars196/cars_annos.mat"),
])
def test_by_hand_dataset_missing_says_where_to_get_and_put_it(tmp_path, name, where, to):
    with pytest.raises(FileNotFoundError) as err:
        prepare_dataset(params(tmp_path, name, download=False), tmp_path, progress=False)
    msg = str(err.value)
    assert where in msg and str(tmp_path / "raw" / to) in msg


def test_missing_downloadable_dataset_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Set data.download: true to fetch it from http://ftp.cs.stanford"):
        prepare_dataset(params(tmp_path, "sop", download=False), tmp_path, progress=False)


# ----------------------------------------------------------------------------------- download integration

@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_sop_downloaded_verified_unpacked_and_parsed(tmp_path, http_dir, monkeypatch):
    served, url = http_dir
    tree = make_sop(tmp_path / "build")
    archive = served / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(tree.rglob("*")):
            zf.write(f, f.relative_to(tree.parent).as_posix())
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    src = get_source("sop")
    monkeypatch.setitem(sources_mod.SOURCES, "sop", src.__class__(
        **{**src.__dict__, "remotes": (Remote(archive.name, f"{url}/{archive.name}", md5),)}))
    p = params(tmp_path, "sop", val_fraction=0.0)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert (len(s.train), len(s.test)) == (6, 5)
    assert (tmp_path / "raw" / "Stanford_Online_Products" / "Ebay_train.txt").is_file()
    check_loads_its_own_file(s.test)
    # A wrong checksum stops before unpacking, and nothing half-written stays.
    monkeypatch.setitem(sources_mod.SOURCES, "sop", src.__class__(
        **{**src.__dict__, "remotes": (Remote(archive.name, f"{url}/{archive.name}", "0" * 32),)}))
    with pytest.raises(ValueError, match="md5 mismatch"):
        prepare_dataset(params(tmp_path / "other", "sop"), tmp_path / "other", progress=False)
    assert list((tmp_path / "other" / "raw").iterdir()) == []


def test_unreachable_host_gives_the_by_hand_instructions(tmp_path, monkeypatch):
    src = get_source("cars")
    dead = tuple(Remote(r.filename, f"http://127.0.0.1:9/{r.filename}", r.md5, r.into, r.archive) for r in src.remotes)
    monkeypatch.setitem(sources_mod.SOURCES, "cars", src.__class__(**{**src.__dict__, "remotes": dead}))
    with pytest.raises(ConnectionError, match=r"download failed.*is offline. Get car_ims.tgz"):
        prepare_dataset(params(tmp_path, "cars", download=True), tmp_path, progress=False)


def test_archives_placed_by_hand_are_verified_and_unpacked(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    import tarfile

    build = tmp_path / "build"
    for k, c in enumerate([1, 1, 99, 99]):
        image(build / "car_ims" / f"{k + 1:06d}.jpg", c)
    annos = np.array([(f"car_ims/{k + 1:06d}.jpg", c) for k, c in enumerate([1, 1, 99, 99])],
                     dtype=[("relative_im_path", object), ("class", object)])
    raw = tmp_path / "raw" / "cars196"
    raw.mkdir(parents=True)
    scipy_io.savemat(raw / "cars_annos.mat", {"annotations": annos[None, :]})
    with tarfile.open(raw / "car_ims.tgz", "w:gz") as tar:
        tar.add(build / "car_ims", arcname="car_ims")
    md5 = {f: hashlib.md5((raw / f).read_bytes()).hexdigest() for f in ("car_ims.tgz", "cars_annos.mat")}
    src = get_source("cars")
    remotes = tuple(Remote(r.filename, r.url, md5[r.filename], r.into, r.archive) for r in src.remotes)
    monkeypatch.setitem(sources_mod.SOURCES, "cars", src.__class__(**{**src.__dict__, "remotes": remotes}))
    p = params(tmp_path, "cars", val_fraction=0.0, download=False)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert (len(s.train), len(s.test)) == (2, 2)
    check_loads_its_own_file(s.test)
    # A placed file that is not the published one is refused with both checksums.
    (tmp_path / "x" / "raw" / "cars196").mkdir(parents=True)
    (tmp_path / "x" / "raw" / "cars196" / "car_ims.tgz").write_bytes(b"other")
    (tmp_path / "x" / "raw" / "cars196" / "cars_annos.mat").write_bytes((raw / "cars_annos.mat").read_bytes())
    with pytest.raises(ValueError, match=r"Cars196 \(Stanford Cars\): .*car_ims.tgz: md5 mismatch, expected "
                                         + md5["car_ims.tgz"]):
        prepare_dataset(params(tmp_path / "x", "cars", download=False), tmp_path / "x", progress=False)


def test_relative_roots_make_a_movable_project(tmp_path):
    make_sop(tmp_path / "proj" / "raw")
    p = DataParams(name="sop", root="raw", prepared="prepared", val_fraction=0.0)
    out = prepare_dataset(p, tmp_path / "proj", progress=False)
    assert json.loads((out / "meta.json").read_text())["image_root"] == "../../raw/Stanford_Online_Products"
    (tmp_path / "proj").rename(tmp_path / "moved")
    check_loads_its_own_file(open_splits(tmp_path / "moved" / "prepared" / "sop", p).test)
