"""Images the product did not make, within the pixel budget (xbmcore.data.decode): a decompression bomb in a
folder is named or skipped, an 80 MP PNG is decoded to a bounded size, an extreme strip is refused, and only one
large image is decoded at a time per process."""
from __future__ import annotations

import logging

import pytest
from PIL import Image

from bench.serve import blank_png
from xbmcore.config import ModelParams
from xbmcore.data import decode, open_splits, prepare_dataset
from xbmcore.data.decode import ImageTooLarge, decode_rgb, open_image
from pipeline.embedding_store import Embedder
from xbmcore.models import build_model

from test_data_own import class_folder, params


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """20,000 x 20,000 grey: ~400 KB on disk, 400 MB decoded; above Pillow's own limit (~179 MP)."""
    return blank_png(20_000, 20_000, 1)


def test_blank_png_is_the_png_it_says():
    # the helper itself: a valid PNG of the stated size whose pixels decode (zlib and CRC checksums included)
    data = blank_png(300, 5000, 3)  # 5,000 rows: several repeated deflate blocks and a remainder
    with open_image(data) as im:
        assert im.size == (300, 5000) and im.mode == "RGB"
        im.load()
        assert im.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_a_bomb_in_a_folder_is_named_without_skip_corrupt_and_skipped_with_it(tmp_path, caplog, bomb):
    root = tmp_path / "photos"
    class_folder(root, 4, per_class=3)
    (root / "class 03" / "bomb.png").write_bytes(bomb)
    p = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"1 of 13 listed images cannot be read: .*class 03/bomb\.png \(too large: "
                                         r"over the pixel limit of 50 MP \(max_pixels\).*raise data\.max_pixels"):
        prepare_dataset(p, tmp_path, progress=False)
    skip = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        s = open_splits(prepare_dataset(skip, tmp_path, progress=False), skip)
    assert "skipped 1 of 13 listed images that cannot be read" in caplog.text and "bomb.png (too large" in caplog.text
    assert len(s.train) + len(s.test) == 12


def test_an_image_under_pillows_limit_but_over_max_pixels_is_named_with_its_size(tmp_path):
    root = tmp_path / "photos"
    class_folder(root, 4, per_class=3)
    (root / "class 00" / "wide.png").write_bytes(blank_png(3000, 2000, 1))  # 6 MP
    p = params(tmp_path, "folder", root, test_fraction=0.5, val_fraction=0.0, max_pixels=5_000_000)
    with pytest.raises(ValueError, match=r"wide\.png \(too large: 3000 x 2000 pixels \(6 MP\), over the limit "
                                         r"of 5 MP \(max_pixels\)\)"):
        prepare_dataset(p, tmp_path, progress=False)


def test_an_80_megapixel_png_is_decoded_to_a_bounded_size_or_refused():
    png = blank_png(10_000, 8_000, 1)  # 80 MP: 80 MB of grey when decoded whole (240 MB as RGB)
    with pytest.raises(ImageTooLarge, match=r"10000 x 8000 pixels \(80 MP\), over the limit of 50 MP"):
        decode_rgb(png, 32)  # the default budget
    im = decode_rgb(png, 32, max_pixels=100_000_000)
    assert im.size == (40, 32) and im.mode == "RGB"  # torchvision's Resize(32) of the original's shape


def test_a_strip_whose_resize_would_be_huge_is_refused():
    # 200,000 x 1 is 0.2 MP, but resized to shorter side 32 it would be 6,400,000 x 32 = 204.8 MP
    with pytest.raises(ImageTooLarge, match=r"200000 x 1 pixels resized to shorter side 32 would be 6400000 x 32 "
                                            r"\(204\.8 MP\)"):
        decode_rgb(blank_png(200_000, 1, 1), 32)


def test_a_large_decode_holds_the_process_lock_and_a_small_one_does_not(monkeypatch):
    held = []
    reduce = Image.Image.reduce

    def spy(self, factor, box=None):
        held.append((self.size, decode._LARGE_DECODE.locked()))
        return reduce(self, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", spy)
    monkeypatch.setattr(decode, "LARGE_PIXELS", 1_000_000)
    decode_rgb(blank_png(2000, 1000, 3), 16)  # 2 MP: large, reduced by 31 under the lock
    decode_rgb(blank_png(500, 400, 3), 16)  # 0.2 MP: reduced by 12 without it
    assert held == [((2000, 1000), True), ((500, 400), False)]
    assert not decode._LARGE_DECODE.locked()


def test_embedder_names_the_image_over_the_budget():
    p = ModelParams(embedding_dim=8)
    embedder = Embedder(build_model(p), p.model_dump(), 16, 16, max_pixels=10_000)
    ok = blank_png(90, 100, 3)  # 9,000 pixels
    emb = embedder.embed_images([ok, ok], batch_size=1)
    assert emb.shape == (2, 8)
    with pytest.raises(ValueError, match=r"image\[1\]: cannot decode the image \(ImageTooLarge: 101 x 100 pixels"):
        embedder.embed_images([ok, blank_png(101, 100, 3)], names=["image[0]", "image[1]"])
