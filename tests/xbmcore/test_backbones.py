"""Your own backbone: timm and torchvision models from a local weights file (xbmcore.backbones), on tiny models:
timm's test_vit (0.3 M parameters) and test_resnet at 32 px, torchvision's resnet18 at 32 px."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from xbmcore.backbones import build_timm, input_config, resolve_input  # noqa: E402
from xbmcore.config import DataParams, ModelParams, Params, TrainParams, validate_params  # noqa: E402
from xbmcore.data.transforms import MEAN, STD, BatchTransform, pil_transform  # noqa: E402
from xbmcore.events import NullSink  # noqa: E402
from xbmcore.models import build_model  # noqa: E402
from xbmcore.optim import build_optimizer  # noqa: E402
from xbmcore.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)
VIT = "timm:test_vit"


def vit(**kw) -> ModelParams:
    return ModelParams(backbone=VIT, input_size=32, embedding_dim=8, **kw)


def timm_checkpoint(name: str, path, seed: int = 0, **kw) -> nn.Module:
    """A timm model with random weights and a 10-class classifier, saved as timm saves it (safetensors)."""
    torch.manual_seed(seed)
    src = timm.create_model(name, num_classes=10, **kw).eval()
    save_file(src.state_dict(), str(path))
    return src


def test_a_timm_safetensors_file_loads_back_to_equal_outputs(tmp_path):
    src = timm_checkpoint("test_vit", tmp_path / "vit.safetensors", img_size=32)
    model = build_model(vit(pretrained=str(tmp_path / "vit.safetensors"))).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)  # the features its classifier reads
        assert torch.equal(model.backbone(x), want)
        assert model.feat_dim == want.shape[1] and model(x).shape == (3, 8)
        # The whole trained model saved (the pretrain stage's form) and built again: the same embeddings.
        torch.save(model.state_dict(), tmp_path / "model.pt")
        again = build_model(vit(pretrained=str(tmp_path / "model.pt"))).eval()
        assert torch.equal(again(x), model(x))
        # A timm resnet (its classifier is fc) from a safetensors file too.
        src = timm_checkpoint("test_resnet", tmp_path / "resnet.safetensors")
        net = build_model(ModelParams(backbone="timm:test_resnet", input_size=32,
                                      pretrained=str(tmp_path / "resnet.safetensors"))).eval()
        assert torch.equal(net.backbone(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_a_torchvision_checkpoint_loads_without_its_classifier(tmp_path):
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_model(ModelParams(backbone="torchvision:resnet18", input_size=32,
                                    pretrained=str(tmp_path / "r18.pth"))).eval()
    src.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), src(x))
    assert model.feat_dim == 512


def test_unknown_names_list_near_matches():
    with pytest.raises(ValueError, match=r"timm has no model 'vit_smal_patch16_224'; near matches: "
                                         r"vit_small_patch16_224"):
        build_model(ModelParams(backbone="timm:vit_smal_patch16_224"))
    with pytest.raises(ValueError, match=r"torchvision has no model 'resnet'; near matches: .*resnet18"):
        build_model(ModelParams(backbone="torchvision:resnet"))
    with pytest.raises(ValueError, match=r"expected smallcnn, resnet18, resnet50, timm:<name> or torchvision:<name>"):
        ModelParams(backbone="vit_small_patch16_224")
    with pytest.raises(ValueError, match="a local weights file"):
        build_model(ModelParams(backbone=VIT, pretrained="imagenet"))


def test_a_file_of_another_architecture_names_the_keys_and_shapes(tmp_path):
    timm_checkpoint("test_resnet", tmp_path / "resnet.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the backbone \(VisionTransformer\): missing "
                                         r"blocks\.0\.attn\.proj\.bias, .*unexpected bn1\.bias, .* and \d+ more"):
        build_model(vit(pretrained=str(tmp_path / "resnet.safetensors")))
    timm_checkpoint("test_vit", tmp_path / "wide.safetensors", img_size=32, embed_dim=96)  # the shapes differ
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 96\), expected \(1, 1, \d+\)"):
        build_model(vit(pretrained=str(tmp_path / "wide.safetensors")))
    # A file of another input size is timm's to adapt: its position embedding is resampled, as timm loads it.
    timm_checkpoint("test_vit", tmp_path / "vit64.safetensors", img_size=64)
    assert build_model(vit(pretrained=str(tmp_path / "vit64.safetensors"))).feat_dim > 0


def test_features_that_are_not_a_vector_are_refused():
    with pytest.raises(ValueError, match=r"gives a tensor of shape \(1, \d+, 1, 1\) per batch, not one feature "
                                         r"vector per image"):
        build_timm("test_resnet", None, 32, global_pool="")
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn is not an image classifier"):
        build_model(ModelParams(backbone="torchvision:fasterrcnn_resnet50_fpn"))


def test_the_input_follows_the_weights_config_unless_params_set_it(tmp_path):
    cfg = input_config(ModelParams(backbone="timm:vit_small_patch16_224.augreg_in21k_ft_in1k"))
    assert (cfg.size, cfg.interpolation, cfg.mean, cfg.std, cfg.test_resize) == \
        (224, "bicubic", (0.5,) * 3, (0.5,) * 3, 248)
    tv = input_config(ModelParams(backbone="torchvision:convnext_tiny"))
    assert (tv.size, tv.test_resize, tv.mean) == (224, 236, MEAN)
    auto = {k: "auto" for k in ("train_size", "test_resize", "test_size", "cache_size")}
    p = resolve_input(validate_params({"model": {"backbone": "timm:vit_small_patch16_224"}, "data": auto}))
    d = p.data
    assert (d.train_size, d.test_size, d.test_resize, d.cache_size, d.interpolation) == (224, 224, 248, 248, "bicubic")
    # A config.json beside the weights file (timm's hub layout) overrides timm's, model.input_size and data.* both.
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_vit", "pretrained_cfg": {
        "input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3],
        "crop_pct": 1.0}}))
    raw = {"model": {"backbone": VIT, "pretrained": "vit.safetensors"}, "data": {**auto, "std": [0.2, 0.2, 0.2]}}
    d = resolve_input(validate_params(raw), root=tmp_path).data
    assert (d.train_size, d.test_resize, d.interpolation, d.mean, d.std) == (64, 64, "bilinear", (0.4,) * 3, (0.2,) * 3)
    raw["model"]["input_size"] = 48
    assert resolve_input(validate_params(raw), root=tmp_path).data.test_size == 48
    # The defaults are today's: smallcnn's 32 px, bilinear, ImageNet's statistics.
    d = resolve_input(Params()).data
    assert (d.train_size, d.test_resize, d.test_size, d.cache_size, d.interpolation, d.mean, d.std) == \
        (32, 32, 32, 256, "bilinear", MEAN, STD)


def test_the_transforms_use_the_models_filter_and_normalisation():
    p = DataParams(train_size=16, test_resize=18, test_size=16, interpolation="bicubic", mean=(0.5,) * 3,
                   std=(0.25,) * 3)
    white = torch.full((2, 3, 24, 20), 255, dtype=torch.uint8)
    for train in (True, False):
        out = BatchTransform(p, train)(white)
        assert out.shape == (2, 3, 16, 16)
        torch.testing.assert_close(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25
    from PIL import Image

    img = Image.fromarray(np.full((24, 20, 3), 255, np.uint8))
    torch.testing.assert_close(pil_transform(p, False)(img), torch.full((3, 16, 16), 2.0))
    with pytest.raises(ValueError, match="resolve_input"):
        BatchTransform(DataParams(train_size="auto"), True)


def test_separate_lrs_for_head_and_backbone():
    model = build_model(vit())
    one = build_optimizer(TrainParams(), model)
    assert len(one.param_groups) == 1
    opt = build_optimizer(TrainParams(warmup_lr=1e-3, backbone_lr_scale=0.1), model)
    head, back = opt.param_groups
    assert {id(p) for p in back["params"]} == {id(p) for p in model.backbone.parameters()}
    assert head["lr"] == 1e-3 and back["lr"] == pytest.approx(1e-4)


class Images(torch.utils.data.Dataset):
    """C classes of 3 x 32 x 32 images: a random pattern per class plus noise."""

    def __init__(self, num_classes: int, per_class: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(num_classes, 3, 32, 32, generator=g)
        self.labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
        self.x = protos[self.labels] + 0.5 * torch.randn(len(self.labels), 3, 32, 32, generator=g)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i]), i


class Splits:
    def __init__(self):
        self.train, self.val, self.test = Images(6, 4, 1), Images(3, 4, 2), Images(3, 4, 3)
        self.query = self.gallery = None


def test_a_timm_model_trains_a_frozen_warmup_and_xbm_steps_and_resumes(tmp_path):
    params = validate_params({
        "model": {"backbone": VIT, "input_size": 32, "embedding_dim": 8},
        "data": {"train_size": 32, "test_resize": 32, "test_size": 32},
        "train": dict(batch_size=8, images_per_class=2, warmup_steps=3, xbm_steps=3, device="cpu", eval_every=0,
                      lr=1e-3, warmup_lr=1e-3, backbone_lr_scale=0.1, freeze_backbone_warmup=True,
                      checkpoint_every=100),
        "memory": {"ratio": 0.5}})
    params = resolve_input(params)
    torch.manual_seed(0)
    trainer = Trainer(params, build_model(params.model), Splits(), NullSink())
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_phase("warmup", 3)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in start.items() if k.startswith("backbone."))
    assert not torch.equal(after["head.weight"], start["head.weight"])
    state = trainer.state_dict()
    # A new trainer (memory_init, train_xbm) from the warm-up's state: the backbone trains at a tenth of the lr.
    torch.manual_seed(0)
    xbm = Trainer(params, build_model(params.model, load_weights=False), Splits(), NullSink())
    xbm.load_state_dict(state)
    memory = xbm.init_memory()
    xbm.train_phase("xbm", 3, memory)
    assert [g["lr"] for g in xbm.optimizer.param_groups] == pytest.approx([1e-3, 1e-4])
    moved = xbm.model.state_dict()
    assert not torch.equal(moved["backbone.cls_token"], after["backbone.cls_token"])
    assert all(np.isfinite(v) for v in xbm.history["loss"]) and len(xbm.history["loss"]) == 6
    assert all(p.requires_grad for p in xbm.model.parameters())
