"""The decoded-image cache: pixels against PIL / torchvision on the original image, image modes, the batched
augmentation against PIL's resized crop, atomicity of the build, verification instead of rebuilding."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data_real import render_photo
from xbmcore.config import DataParams
from xbmcore.data import cache as cache_mod
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data.batch import collate_for, to_device
from xbmcore.data.cache import ImageCache, build_cache, decode_image
from xbmcore.data.transforms import MEAN, STD, crop_boxes, pil_transform

REPO = Path(__file__).resolve().parents[2]


def photo(path: Path, size=(120, 96), seed=0, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_photo(np.random.default_rng(seed), size=size).save(path, **({"quality": 90} | save))
    return path


def hwc(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def to_grey_levels(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: 3 x S x S in 0..255 (float64)."""
    m, s = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1), torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    return ((x.double() * s + m) * 255).numpy()


def folder_params(tmp_path: Path, **kw) -> DataParams:
    return DataParams(**{"name": "folder", "root": str(tmp_path / "photos"), "prepared": str(tmp_path / "prepared"),
                         "val_fraction": 0.0, "cache_size": 48, "train_size": 32, "test_resize": 48,
                         "test_size": 40, "cache_workers": 1, **kw})


def photo_folder(root: Path, classes=4, per_class=3, size=(120, 96)) -> list[Path]:
    return [photo(root / f"c{c}" / f"{i}.jpg", size, seed=10 * c + i) for c in range(classes) for i in range(per_class)]


# ------------------------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("size", [(120, 96), (96, 120), (64, 64), (30, 20)])  # landscape, portrait, square, upscale
def test_cached_pixels_are_torchvision_resize_of_the_original(tmp_path, size):
    path = photo(tmp_path / "a.jpg", size)
    got = decode_image(path, 48)
    with Image.open(path) as im:
        want = hwc(v2.Resize(48)(im.convert("RGB")))  # what torchvision users apply before the crop
    assert got.dtype == np.uint8 and min(got.shape[:2]) == 48 and got.shape[2] == 3
    np.testing.assert_array_equal(got, want)


def test_large_jpeg_is_decoded_at_a_reduced_scale_within_tolerance(tmp_path):
    path = photo(tmp_path / "big.jpg", (1000, 800))
    got = decode_image(path, 128).astype(int)  # 800 >= 4 x 128: DCT-domain downscale to >= 256 first
    with Image.open(path) as im:
        want = hwc(v2.Resize(128)(im.convert("RGB"))).astype(int)
    assert got.shape == want.shape == (128, 160, 3)
    diff = np.abs(got - want)
    # Tolerance of the draft decode: the 2x oversampled intermediate keeps the result within a few grey levels.
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 6, (diff.mean(), np.percentile(diff, 99))


def test_image_modes_become_8_bit_rgb(tmp_path):
    rgb = render_photo(np.random.default_rng(1), size=(40, 32))
    grey = rgb.convert("L")
    grey.save(tmp_path / "grey.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "grey.png", 32), np.stack([np.asarray(grey)] * 3, -1))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "palette.png", 32), hwc(pal.convert("RGB")))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(decode_image(tmp_path / "cmyk.jpg", 32), hwc(im.convert("RGB")))
    # 16-bit grayscale: the top 8 bits (a plain convert would clip everything above 255 to white).
    ramp = (np.arange(40 * 32, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png", 32), np.stack([ramp >> 8] * 3, -1).astype(np.uint8))
    # Alpha: composited on white; fully transparent pixels become white whatever colour they hold.
    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., :3] = (200, 10, 10)
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = decode_image(tmp_path / "alpha.png", 32)
    assert (out[:, :20] == np.array([200, 10, 10])).all() and (out[:, 20:] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    im = render_photo(np.random.default_rng(2), size=(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    im.save(tmp_path / "rot.jpg", quality=95, exif=exif)
    got = decode_image(tmp_path / "rot.jpg", 40)
    assert got.shape == (60, 40, 3)
    with Image.open(tmp_path / "rot.jpg") as f:
        want = hwc(f.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------- the batched views

def test_test_view_equals_torchvision_resize_and_centre_crop_of_the_original(tmp_path):
    paths = photo_folder(tmp_path / "photos", classes=4, per_class=3)
    p = folder_params(tmp_path, test_fraction=0.5)
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    pil = pil_transform(p, train=False)  # Resize(48) + CenterCrop(40) + normalise, on the original file
    by_name = {f"{q.parent.name}/{q.name}": q for q in paths}
    items = [s.test, s.train.without_augmentation()]
    for ds in items:
        imgs, labels, idx = to_device(ds.__getitems__(list(range(len(ds)))), "cpu")
        assert imgs.shape == (len(ds), 3, 40, 40) and idx.tolist() == list(range(len(ds)))
        rows = ds._rows
        for k, row in enumerate(rows):
            with Image.open(by_name[_item(tmp_path, row)]) as im:
                want = pil(im.convert("RGB"))
            torch.testing.assert_close(imgs[k], want, rtol=0, atol=1e-5)


def _item(tmp_path: Path, row: int) -> str:
    lines = (tmp_path / "prepared" / "folder" / "index.csv").read_text(encoding="utf-8").splitlines()[1:]
    return lines[row].split(",")[0]


def test_train_view_is_pils_resized_crop_and_flip_within_one_grey_level(tmp_path):
    photo_folder(tmp_path / "photos", classes=4, per_class=3)
    p = folder_params(tmp_path, test_fraction=0.5, train_crop_scale=(0.2, 1.0))
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    cache = ImageCache(tmp_path / "prepared" / "folder" / "cache")
    batch = s.train.__getitems__(list(range(len(s.train))))
    torch.manual_seed(3)
    imgs, _, _ = to_device(batch, "cpu")
    # The same draws, replayed: boxes per image size, then flips.
    torch.manual_seed(3)
    boxes = crop_boxes(len(batch), batch.shapes[:, 0], batch.shapes[:, 1], (0.2, 1.0)).long()
    flips = torch.rand(len(batch)) < 0.5
    assert 0 < int(flips.sum()) < len(batch)
    worst = 0.0
    for k, row in enumerate(s.train._rows):
        cached = Image.fromarray(cache.image(int(row)))
        top, left, h, w = boxes[k].tolist()
        want = TF.resized_crop(cached, top, left, h, w, [32, 32], antialias=True)  # PIL's filter
        if flips[k]:
            want = TF.horizontal_flip(want)
        diff = np.abs(to_grey_levels(imgs[k]) - hwc(want).transpose(2, 0, 1).astype(np.float64))
        worst = max(worst, float(diff.max()))
    assert worst <= 1.0 + 1e-3, worst  # torch's antialiased bilinear rounds within one grey level of PIL's


def test_cpu_loader_workers_augment_and_hand_over_the_same_images(tmp_path):
    photo_folder(tmp_path / "photos", classes=4, per_class=3)
    p = folder_params(tmp_path, test_fraction=0.5)
    test = open_splits(prepare_dataset(p, tmp_path, progress=False), p).test
    assert pickle.loads(pickle.dumps(test._cache))._pixels is None  # workers reopen the memory map
    kw = dict(batch_size=4, collate_fn=collate_for("cpu"))
    direct = [to_device(b, "cpu")[0] for b in torch.utils.data.DataLoader(test, num_workers=0, **kw)]
    workers = [to_device(b, "cpu")[0] for b in torch.utils.data.DataLoader(test, num_workers=2, **kw)]
    raw = [b for b in torch.utils.data.DataLoader(test, collate_fn=collate_for("cuda"), batch_size=4)]
    assert type(raw[0]).__name__ == "ImageBatch" and raw[0].pixels.dtype == torch.uint8  # for a GPU: raw bytes
    for a, b, r in zip(direct, workers, raw):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, to_device(r, "cpu")[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------- build: atomic, verified

def test_killed_build_leaves_no_complete_cache_and_the_next_one_rebuilds(tmp_path):
    photo_folder(tmp_path / "photos", classes=4, per_class=3)
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from xbmcore.config import DataParams
        from xbmcore.data import cache, prepare_dataset
        real, n = cache._decode_job, [0]
        def slow(job):
            n[0] += 1
            if n[0] == 5:
                print("half-way", flush=True)
                time.sleep(60)
            return real(job)
        cache._decode_job = slow
        p = DataParams(name="folder", root={str(tmp_path / 'photos')!r}, prepared={str(tmp_path / 'prepared')!r},
                       val_fraction=0.0, cache_size=48, train_size=32, test_resize=48, test_size=40,
                       cache_workers=1, test_fraction={{}})
        prepare_dataset(p, Path({str(tmp_path)!r}), progress=False)
    """)
    out = tmp_path / "prepared" / "folder"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def killed(test_fraction: float) -> None:
        proc = subprocess.Popen([sys.executable, "-c", script.format(test_fraction)], stdout=subprocess.PIPE,
                                env=env, text=True)
        try:
            assert proc.stdout.readline().strip() == "half-way"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    killed(0.5)
    assert not (out / "meta.json").exists() and not (out / "cache" / "pixels.u8").exists()
    assert list((out / "cache").glob(".pixels.u8.*.tmp"))  # SIGKILL leaves the temporary file
    p = folder_params(tmp_path, test_fraction=0.5)
    prepare_dataset(p, tmp_path, progress=False)
    assert not list((out / "cache").glob(".*.tmp"))  # cleaned up by the next build
    complete = json.loads((out / "meta.json").read_text())
    assert complete["num_images"] == 12 and len(ImageCache(out / "cache")) == 12
    # A rebuild for other params killed half-way: the old meta.json no longer vouches for the folder.
    killed(0.25)
    assert not (out / "meta.json").exists()
    s = open_splits(prepare_dataset(p, tmp_path, progress=False), p)
    assert len(s.train) + len(s.test) == 12


def test_failed_build_removes_its_temporary_files(tmp_path, monkeypatch):
    paths = photo_folder(tmp_path / "photos", classes=2, per_class=3)

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_decode_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "out", paths, 32, workers=1, progress=False)
    assert list((tmp_path / "out" / "cache").iterdir()) == []


def test_preparing_again_only_verifies_and_a_changed_image_rebuilds(tmp_path):
    paths = photo_folder(tmp_path / "photos", classes=4, per_class=3)
    p = folder_params(tmp_path, test_fraction=0.5)
    out = prepare_dataset(p, tmp_path, progress=False)
    pixels = out / "cache" / "pixels.u8"
    stamp = pixels.stat().st_mtime_ns
    prepare_dataset(p, tmp_path, progress=False)
    assert pixels.stat().st_mtime_ns == stamp
    photo(paths[0], seed=99)  # replaced in place: same name, other content
    prepare_dataset(p, tmp_path, progress=False)
    assert pixels.stat().st_mtime_ns != stamp
    row = _row_of(out, "c0/0.jpg")
    np.testing.assert_array_equal(ImageCache(out / "cache").image(row), decode_image(paths[0], 48))
    # A cache damaged on disk is rebuilt, not trusted.
    with open(pixels, "r+b") as f:
        f.truncate(100)
    prepare_dataset(p, tmp_path, progress=False)
    assert len(ImageCache(out / "cache")) == 12
    with pytest.raises(ValueError, match=r"built at data.cache_size 48, but data.cache_size is 64"):
        open_splits(out, p.model_copy(update={"cache_size": 64}))


def _row_of(out: Path, item: str) -> int:
    lines = (out / "index.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [ln.split(",")[0] for ln in lines].index(item)


def test_parallel_build_writes_the_same_cache(tmp_path):
    paths = photo_folder(tmp_path / "photos", classes=3, per_class=3)
    build_cache(tmp_path / "one", paths, 40, workers=1, progress=False)
    build_cache(tmp_path / "two", paths, 40, workers=2, progress=False)
    for f in ("pixels.u8", "shapes.npy"):
        assert (tmp_path / "one" / "cache" / f).read_bytes() == (tmp_path / "two" / "cache" / f).read_bytes()


def test_to_device_writes_the_requested_memory_format(tmp_path):
    photo_folder(tmp_path / "photos", classes=4, per_class=3)
    p = folder_params(tmp_path, test_fraction=0.5)
    test = open_splits(prepare_dataset(p, tmp_path, progress=False), p).test
    batch = test.__getitems__(list(range(len(test))))
    plain, labels, idx = to_device(batch, "cpu")
    last, _, _ = to_device(batch, "cpu", torch.channels_last)  # what the trainer asks for on a GPU
    assert last.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    torch.testing.assert_close(last, plain, rtol=0, atol=0)
    assert labels.tolist() == test.labels.tolist() and idx.tolist() == list(range(len(test)))
