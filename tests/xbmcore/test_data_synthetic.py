"""The embedded benchmark: deterministic bytes, the promised class structure and splits, fast batched loading."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xbmcore.config import DataParams, SyntheticParams
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data.index import read_index, read_meta, write_meta
from xbmcore.data.synthetic import _exp2, _log2, _sincos, _superellipse, generate, num_images

# sha256 of images, labels and super-labels. A change here changes the benchmark: every recorded result (dvc.lock,
# metrics.json, the docs' figures) must be measured again.
SMALL = dict(num_classes=40, classes_per_superclass=5, image_size=16, seed=7)
SMALL_SHA = "9cd7d80f4cce49543e73b90b59c5e0de4c2ab2da58a3556f1f58e171e3d8cfe8"
# The same with 10 pretraining classes after the 40 (their own 2 super-classes): other bytes for every class,
# as the random stream now draws 50 classes' parameters.
SMALL_PRETRAIN_SHA = "6bd5400ce1ebf31c10c12f4e73e10a7fea0f18f90170e58bc6255591f5832b9b"
DEFAULT_SHA = "0c5d9ee1c2d316b8600a97e6834c82c1c4dfc453097d737fe33a6dc154502def"
# params.yaml's benchmark: 9,000 classes plus 2,000 pretraining classes, 57,740 images.
BENCHMARK_SHA = "beecaa8d247d005816de326077221a0872a75a09df30c3a929dd85ff012b3724"
# numpy's SIMD levels whose transcendental kernels gave other bytes before the generator avoided them.
DISPATCH_OFF = ["X86_V4 AVX512_ICL AVX512_SPR", "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"]
_HASH = """
import hashlib, sys, numpy as np
from xbmcore.config import SyntheticParams
from xbmcore.data.synthetic import generate
d = generate(SyntheticParams(**eval(sys.argv[1])))
m = hashlib.sha256()
for a in (d.images, d.labels, d.super_labels):
    m.update(np.ascontiguousarray(a).tobytes())
print(m.hexdigest())
"""


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


def test_the_pretrain_split_shares_no_class_or_super_class_with_the_others(tmp_path):
    p = tiny(tmp_path, val_fraction=0.25, synthetic={"pretrain_classes": 15})
    out = prepare_dataset(p, tmp_path, progress=False)
    index = read_index(out, array_backed=True)
    assert len(index) == num_images(p.synthetic) == len(np.load(out / "images.npy", mmap_mode="r"))
    classes = {s: set(index.labels[index.splits == s].tolist()) for s in ("train", "val", "test", "pretrain")}
    supers = {s: set(index.super_labels[index.splits == s].tolist()) for s in classes}
    # The 40 classes split as without pretraining classes; the 15 more, in 3 super-classes of their own, pretrain.
    assert classes == {"train": set(range(15)), "val": set(range(15, 20)), "test": set(range(20, 40)),
                       "pretrain": set(range(40, 55))}
    assert supers["pretrain"] == {8, 9, 10}
    assert not supers["pretrain"] & (supers["train"] | supers["val"] | supers["test"])
    s = open_splits(out, p)
    assert s.pretrain.num_classes == 15 and s.pretrain.train and not s.test.train  # augmented like train
    assert sorted(set(s.pretrain.labels.tolist())) == list(range(15))  # contiguous, for a classifier
    with pytest.raises(ValueError, match=r"num_classes \(42\) must be a multiple of classes_per_superclass \(5\)"):
        SyntheticParams(num_classes=42, classes_per_superclass=5, pretrain_classes=10)


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


def test_a_folder_from_an_older_generator_is_regenerated(tmp_path, monkeypatch):
    from xbmcore.data import synthetic
    p = tiny(tmp_path)
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION - 1)
    out = prepare_dataset(p, tmp_path, progress=False)
    np.save(out / "images.npy", np.zeros_like(np.load(out / "images.npy")))  # stands in for the old bytes
    meta = read_meta(out)
    meta["sha256"] = digest(out)
    write_meta(out, meta)
    assert prepare_dataset(p, tmp_path, progress=False) == out  # same version: verified and kept
    assert not np.load(out / "images.npy").any()
    monkeypatch.undo()
    prepare_dataset(p, tmp_path, progress=False)
    np.testing.assert_array_equal(np.load(out / "images.npy"), generate(p.synthetic).images)


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


def set_sha(**kw) -> str:
    d = generate(SyntheticParams(**kw))
    m = hashlib.sha256()
    for a in (d.images, d.labels, d.super_labels):
        m.update(np.ascontiguousarray(a).tobytes())
    return m.hexdigest()


def test_golden_bytes():
    assert set_sha(**SMALL) == SMALL_SHA
    assert set_sha(**SMALL, pretrain_classes=10) == SMALL_PRETRAIN_SHA
    assert set_sha() == DEFAULT_SHA  # the schema's defaults (6,698 images, ~5 s)


def test_golden_bytes_of_the_committed_benchmark():
    import yaml

    params_yaml = Path(__file__).resolve().parents[2] / "params.yaml"
    synthetic = yaml.safe_load(params_yaml.read_text())["data"]["synthetic"]
    assert set_sha(**synthetic) == BENCHMARK_SHA  # ~25 s of one core


@pytest.mark.parametrize("disabled", ["", *DISPATCH_OFF])
def test_golden_bytes_whatever_simd_numpy_dispatches_to(disabled):
    # numpy's own dispatch (this suite runs in portable mode, which caps it), then each setting that switches its
    # kernels to a lower SIMD level, as on an older CPU: the bytes must not move.
    native = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
    probe = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(' '.join(k for k in f if f[k]))"
    have = subprocess.run([sys.executable, "-c", probe], env=native, capture_output=True, text=True,
                          check=True).stdout.split()
    missing = [f for f in disabled.split() if f not in have]
    if missing:
        pytest.skip(f"this CPU lacks {missing}: disabling them would not change numpy's dispatch")
    env = {**native, "NPY_DISABLE_CPU_FEATURES": disabled}
    probe = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(any(f[k] for k in %r))"
    off = subprocess.run([sys.executable, "-c", probe % disabled.split()], env=env, capture_output=True, text=True,
                         check=True)
    assert off.stdout.strip() == "False"  # the setting took effect in the child
    out = subprocess.run([sys.executable, "-c", _HASH, repr(SMALL)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == SMALL_SHA


def test_elementary_functions_match_float64_references():
    x = np.exp(np.linspace(-40, 40, 20001))
    np.testing.assert_allclose(_log2(x), np.log2(x), rtol=0, atol=2e-9)
    np.testing.assert_allclose(_log2(x.astype(np.float32)), np.log2(x), rtol=0, atol=4e-6)
    assert _log2(np.float32([1.0]))[0] == 0 and _log2(np.float32([8.0]))[0] == 3
    y = np.linspace(-125, 127, 20001)
    np.testing.assert_allclose(_exp2(y), np.exp2(y), rtol=1e-8, atol=0)
    np.testing.assert_allclose(_exp2(y.astype(np.float32)), np.exp2(y.astype(np.float32).astype(np.float64)),
                               rtol=3e-7, atol=0)
    assert _exp2(np.float32([-1000.0]))[0] == np.float32(2.0 ** -125)  # clipped, never subnormal
    t = np.linspace(-100, 100, 200001)
    s, c = _sincos(t)
    np.testing.assert_allclose(s, np.sin(t), rtol=0, atol=1e-11)
    np.testing.assert_allclose(c, np.cos(t), rtol=0, atol=1e-11)


def test_superellipse_matches_a_float64_power_reference():
    rng = np.random.default_rng(0)
    n, S = 64, 32
    g = ((np.arange(S) + 0.5) / S) * 2 - 1
    X, Y = g[None, None, :], g[None, :, None]
    cx, cy = rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)
    a, b = rng.uniform(0.1, 0.9, n), rng.uniform(0.1, 0.9, n)
    e, t, px = np.exp(rng.uniform(np.log(0.9), np.log(6.0), n)), rng.uniform(0, np.pi, n), np.full(n, 2 / S)
    got = _superellipse(X.astype(np.float32), Y.astype(np.float32), cx, cy, a, b, e, t, px)
    col = lambda v: v[:, None, None]  # noqa: E731
    dx, dy = X - col(cx), Y - col(cy)
    u = np.abs(dx * np.cos(col(t)) + dy * np.sin(col(t))) / col(a)
    v = np.abs(dy * np.cos(col(t)) - dx * np.sin(col(t))) / col(b)
    r = (u ** col(e) + v ** col(e)) ** (1 / col(e))
    want = np.clip(0.5 - (r - 1) * col(np.minimum(a, b)) / col(px), 0, 1)
    assert got.dtype == np.float32 and 0.05 < want.mean() < 0.95  # shapes with edges inside the image
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
