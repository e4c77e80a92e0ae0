"""The embedded benchmark: deterministic bytes, the promised class structure and splits, fast batched loading."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from xbmcore.config import DataParams, SyntheticParams
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data.index import read_index, read_meta
from xbmcore.data.synthetic import generate, num_images


def tiny(tmp_path, **kw) -> DataParams:
    syn = {"num_classes": 40, "classes_per_superclass": 5, "image_size": 16, **kw.pop("synthetic", {})}
    return DataParams(prepared=str(tmp_path / "prepared"), synthetic=syn, train_size=16, test_resize=16,
                      test_size=16, **kw)


def digest(folder) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("images.npy", "index.csv")}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = prepare_dataset(tiny(tmp_path / "a"), tmp_path / "a", progress=False)
    b = prepare_dataset(tiny(tmp_path / "b"), tmp_path / "b", progress=False)
    c = prepare_dataset(tiny(tmp_path / "c", synthetic={"seed": 1}), tmp_path / "c", progress=False)
    assert digest(a) == digest(b)
    assert digest(a)["images.npy"] != digest(c)["images.npy"]
    assert read_meta(a)["sha256"] == digest(a)


def test_structure_counts_and_disjoint_splits(tmp_path):
    p = tiny(tmp_path, val_fraction=0.25, synthetic={"images_per_class_min": 3, "images_per_class_max": 6})
    out = prepare_dataset(p, tmp_path, progress=False)
    images = np.load(out / "images.npy")
    index = read_index(out, array_backed=True)
    assert images.shape == (num_images(p.synthetic), 3, 16, 16) and images.dtype == np.uint8
    np.testing.assert_array_equal(index.items, np.arange(len(images)))
    per_class = np.bincount(index.labels, minlength=40)
    assert per_class.min() >= 3 and per_class.max() <= 6
    np.testing.assert_array_equal(index.super_labels, index.labels // 5)
    by_split = {s: set(index.labels[index.splits == s].tolist()) for s in ("train", "val", "test")}
    # Zero-shot: first half of the classes for training (minus the last quarter of them for validation),
    # second half for testing; no class in two splits.
    assert by_split == {"train": set(range(15)), "val": set(range(15, 20)), "test": set(range(20, 40))}
    s = open_splits(out, p)
    assert (s.train.num_classes, s.val.num_classes, s.test.num_classes) == (15, 5, 20)
    assert len(s.train) + len(s.val) + len(s.test) == len(images)
    assert s.query is None and s.gallery is None


def test_generate_matches_prepared_array_and_images_vary(tmp_path):
    sp = SyntheticParams(num_classes=20, classes_per_superclass=5, image_size=24, seed=3)
    data = generate(sp)
    out = prepare_dataset(DataParams(prepared=str(tmp_path), synthetic=sp), tmp_path, progress=False)
    np.testing.assert_array_equal(np.load(out / "images.npy"), data.images)
    # Two images of one class differ (pose, background, noise), and every image uses the colour range.
    assert (data.labels[0], data.labels[1]) == (0, 0)
    assert np.abs(data.images[0].astype(int) - data.images[1].astype(int)).mean() > 10
    assert data.images.reshape(len(data.images), -1).std(1).min() > 5
    with pytest.raises(ValueError, match="`out` must be uint8"):
        generate(sp, out=np.empty((3, 3, 24, 24), np.uint8))


def test_siblings_are_closer_than_strangers():
    # The class-defining render (no nuisance) of siblings in a super-class differs less than across super-classes:
    # the hard negatives the memory is meant to supply. Compared on class means over many images.
    sp = SyntheticParams(num_classes=60, classes_per_superclass=6, image_size=32, images_per_class_min=12,
                         images_per_class_max=12)
    data = generate(sp)
    means = data.images.reshape(60, 12, -1).astype(np.float64).mean(1)  # class x pixels
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    sup = np.arange(60) // 6
    same = (sup[:, None] == sup[None]) & ~np.eye(60, dtype=bool)
    assert np.median(d[same]) < 0.8 * np.median(d[~same & ~np.eye(60, dtype=bool)])


def test_prepare_is_idempotent_and_repairs(tmp_path):
    p = tiny(tmp_path)
    out = prepare_dataset(p, tmp_path, progress=False)
    stamp = (out / "images.npy").stat().st_mtime_ns
    prepare_dataset(p, tmp_path, progress=False)
    assert (out / "images.npy").stat().st_mtime_ns == stamp  # verified, not regenerated
    good = digest(out)
    arr = np.load(out / "images.npy", mmap_mode="r+")
    arr[0, 0, 0, 0] ^= 1  # one flipped bit
    arr.flush()
    del arr
    prepare_dataset(p, tmp_path, progress=False)
    assert digest(out) == good
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_array_batches_through_a_dataloader(tmp_path):
    p = tiny(tmp_path)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    ds = s.train
    batches = [[0, 5, 3, 3], [len(ds) - 1, 1]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=0)
    for idx, (x, y, i) in zip(batches, loader):
        assert x.shape == (len(idx), 3, 16, 16) and x.dtype == torch.float32
        assert i.tolist() == idx and y.tolist() == ds.labels[idx].tolist()
    # The test transform at the stored size is the identity up to normalisation: exact values.
    raw = torch.from_numpy(np.load(s.test._array.filename)[s.test._rows[[2, 7]]]).float() / 255
    m, sd = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    got = torch.stack([x for x, _, _ in s.test.__getitems__([2, 7])])
    torch.testing.assert_close(got, (raw - m) / sd, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.test[7][0], got[1])


def test_augmentation_switch(tmp_path):
    p = tiny(tmp_path)
    train = open_splits(prepare_dataset(p, tmp_path, progress=False), p).train
    clean = train.without_augmentation()
    assert train.train and not clean.train
    torch.manual_seed(0)
    a, b = train.__getitems__([0, 1, 2]), train.__getitems__([0, 1, 2])
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, b))  # random crops and flips
    c, d = clean.__getitems__([0, 1, 2]), clean.__getitems__([0, 1, 2])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(c, d))
    train.train = False  # the attribute alone switches too
    assert all(torch.equal(x[0], y[0]) for x, y in zip(c, train.__getitems__([0, 1, 2])))
