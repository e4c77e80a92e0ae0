"""The batched uint8 transforms against torchvision's reference implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from xbmcore.config import DataParams
from xbmcore.data.transforms import MEAN, STD, BatchTransform, crop_boxes, pil_transform, resized_crop


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x / 255 - torch.tensor(MEAN).view(-1, 3, 1, 1)) / torch.tensor(STD).view(-1, 3, 1, 1)


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 32, 28), dtype=torch.uint8, generator=g)


def test_resized_crop_matches_torchvision(batch):
    x = batch.double()
    boxes = torch.tensor([[0, 0, 32, 28], [3, 5, 20, 15], [10, 0, 11, 28], [1, 2, 8, 8], [0, 7, 32, 21],
                          [5, 5, 16, 16]])
    flip = torch.tensor([False, True, False, True, False, False])
    for size in (16, 24):
        got = resized_crop(x.float(), boxes, flip, size).double()
        for i, (t, l, h, w) in enumerate(boxes.tolist()):
            ref = TF.resized_crop(x[i], t, l, h, w, [size, size], antialias=False)
            ref = ref.flip(-1) if flip[i] else ref
            # torchvision crops first, so it clamps at the box edge where grid_sample reads the neighbouring
            # pixel: compare away from the outer pixel ring when upsampling, everywhere otherwise.
            up = h < size or w < size
            inner = (slice(None), slice(1, -1), slice(1, -1)) if up else (slice(None),) * 3
            torch.testing.assert_close(got[i][inner], ref[inner], atol=1e-3, rtol=0)
    # Unscaled crops are exact copies, mirrored where asked.
    same = resized_crop(x.float(), torch.tensor([[4, 6, 16, 16]] * 6), flip, 16)
    for i in range(6):
        ref = x[i, :, 4:20, 6:22]
        torch.testing.assert_close(same[i].double(), ref.flip(-1) if flip[i] else ref, atol=1e-3, rtol=0)  # of 255


def test_crop_boxes_follow_random_resized_crop_rules():
    torch.manual_seed(0)
    H, W, scale = 32, 40, (0.3, 0.9)
    b = crop_boxes(5000, H, W, scale)
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (b == b.round()).all()
    area = h * w / (H * W)
    # Rounding to whole pixels moves area and ratio a little beyond the sampled range.
    assert area.min() > scale[0] * 0.85 and area.max() < scale[1] * 1.15
    r = w / h
    assert r.min() > 0.75 * 0.85 and r.max() < 4 / 3 * 1.15
    # Positions spread over the whole admissible range.
    assert top.min() == 0 and (top + h).max() == H and left.min() == 0 and (left + w).max() == W
    # Impossible draws fall back to the whole image (centred, aspect within range).
    np.testing.assert_array_equal(crop_boxes(4, 32, 32, (1.0, 1.0), ratio=(2.0, 3.0)).numpy(),
                                  [[8, 0, 16, 32]] * 4)


def test_full_scale_train_transform_is_the_image_or_its_mirror(batch):
    # scale (1, 1): no 3:4..4:3 box but the square one fits a square image, so every crop is the whole image.
    p = DataParams(train_size=32, train_crop_scale=(1.0, 1.0))
    x = torch.nn.functional.pad(batch, (0, 4))  # 32 x 32
    torch.manual_seed(1)
    out = BatchTransform(p, train=True)(x)
    ref = normalise(x.float())
    flipped = 0
    for i in range(len(x)):
        if torch.allclose(out[i], ref[i], atol=1e-4):
            continue
        torch.testing.assert_close(out[i], ref[i].flip(-1), atol=1e-4, rtol=0)
        flipped += 1
    assert 0 < flipped < len(x)


def test_test_transform_matches_torchvision(batch):
    p = DataParams(test_resize=24, test_size=20)
    got = BatchTransform(p, train=False)(batch)
    for i in range(len(batch)):
        ref = TF.center_crop(TF.resize(batch[i].float(), [24], antialias=True), [20, 20])
        torch.testing.assert_close(got[i], normalise(ref)[0], atol=1e-4, rtol=0)
    assert got.shape == (6, 3, 20, 20)


def test_pil_and_batch_paths_agree_at_the_stored_size(batch):
    p = DataParams(test_resize=32, test_size=32)
    x = torch.nn.functional.pad(batch, (0, 4))  # 32 x 32
    img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    torch.testing.assert_close(pil_transform(p, train=False)(img), BatchTransform(p, train=False)(x)[0],
                               atol=1e-5, rtol=0)
    out = pil_transform(DataParams(train_size=24), train=True)(img)
    assert out.shape == (3, 24, 24) and math.isfinite(out.sum().item())


def test_bad_sizes_and_input():
    with pytest.raises(ValueError, match=r"data.test_size \(40\) must be <= data.test_resize \(32\)"):
        BatchTransform(DataParams(test_resize=32, test_size=40), train=False)
    with pytest.raises(ValueError, match="expected a uint8 batch B x 3 x H x W, got torch.float32"):
        BatchTransform(DataParams(), train=False)(torch.zeros(2, 3, 32, 32))
