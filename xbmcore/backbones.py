"""Your own backbone: any classification model of timm or torchvision, from a local weights file.

`model.backbone: timm:<name>` builds ``timm.create_model(name, num_classes=0)``: the model's own pooling gives a
vector of features (`num_features` wide; a ViT's class token, a CNN's average pool), which the embedding head
projects. `torchvision:<name>` builds ``torchvision.models.get_model(name, weights=None)`` and replaces its last
linear classifier (fc, classifier[-1], heads.head, head) by the identity. Nothing is downloaded: the weights come
from `model.pretrained`, a local safetensors or torch file (`xbmcore.models.load_pretrained`).

Each weights file was trained at one input: a size, a resize filter, a normalisation. `input_config` reads it
from the model's configuration (timm's `pretrained_cfg`, which timm carries offline for every name and tag;
torchvision's weights enum for the name), a ``config.json`` beside the weights file (timm's hub layout, whose
``pretrained_cfg`` overrides the first) and `model.input_size` (which overrides both). `resolve_input` writes it
into the `data` keys that say ``auto``: the crops, the test view and the decoded cache then follow the model.
"""
from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xbmcore.config import BACKBONES, ModelParams, Params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageClassification preset (Resize(256), CenterCrop(224)) and timm's default crop fraction.
CROP_PCT = 0.875


@dataclass(frozen=True)
class InputConfig:
    """What a network's weights were trained with: the input it expects.

    Attributes:
        size: the side of the (square) input, in pixels.
        interpolation: the resize filter, ``"bilinear"`` or ``"bicubic"``.
        mean: the per-channel mean of the normalisation (RGB, in [0, 1]).
        std: the per-channel standard deviation of the normalisation.
        crop_pct: the test view's centre crop as a fraction of the resized side (test_resize = size / crop_pct).
        source: where the values come from (for messages and the docs).
    """

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    source: str

    @property
    def test_resize(self) -> int:
        """The shorter side the test view resizes to before its centre crop: ``floor(size / crop_pct)``, as timm."""
        return max(self.size, int(math.floor(self.size / self.crop_pct)))


def parse_backbone(backbone: str) -> tuple[str, str]:
    """Split a `model.backbone` into its library and name.

    Args:
        backbone: ``smallcnn``, ``resnet18``, ``resnet50``, ``timm:<name>`` or ``torchvision:<name>``.

    Returns:
        ``("builtin", backbone)``, ``("timm", name)`` or ``("torchvision", name)``.
    """
    if backbone in BACKBONES:
        return "builtin", backbone
    library, _, name = backbone.partition(":")
    return library, name.strip()


def _near(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close:  # a prefix or part of a name ("vit_small") finds its family
        close = [k for k in known if name.lower() in k][:5]
    return f"; near matches: {', '.join(close)}" if close else ""


def _timm():
    try:
        import timm
    except ImportError as err:  # a dependency of the project, but a library user may lack it
        raise ValueError("model.backbone timm:...: the timm package is not installed (pip install timm)") from err
    return timm


def check_timm_name(name: str) -> None:
    """Refuse a name timm does not know, listing the near matches.

    Args:
        name: a timm model name, with or without a weights tag (``vit_small_patch16_224.augreg_in21k``).

    Raises:
        ValueError: an unknown architecture or tag.
    """
    timm = _timm()
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"model.backbone: timm has no model {arch!r}{_near(arch, timm.list_models())}")
    try:
        known = not tag or timm.models.get_pretrained_cfg(name) is not None
    except RuntimeError:  # "Invalid pretrained tag"
        known = False
    if not known:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"model.backbone: timm's {arch} has no weights tag {tag!r}{_near(tag, tags)}")


def check_torchvision_name(name: str) -> None:
    """Refuse a name torchvision does not know, or one of its models that is not a classifier.

    Args:
        name: a torchvision model name (``convnext_tiny``).

    Raises:
        ValueError: an unknown name, or a detection, segmentation, video or optical-flow model.
    """
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)
    if name in classifiers:
        return
    if name in torchvision.models.list_models():
        raise ValueError(f"model.backbone: torchvision's {name} is not an image classifier (a detection, "
                         f"segmentation, video or optical-flow model): its features are not one vector per image; "
                         f"use a classification model{_near(name, classifiers)}")
    raise ValueError(f"model.backbone: torchvision has no model {name!r}{_near(name, classifiers)}")


def _weights_config(p: ModelParams, root: Path | None) -> tuple[dict[str, Any], str] | None:
    """The `pretrained_cfg` of a config.json beside a local weights file (timm's hub layout), if there is one."""
    if p.pretrained in ("none", "imagenet"):
        return None
    path = Path(p.pretrained)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: not readable as JSON ({err})") from err
    cfg = raw.get("pretrained_cfg", raw) if isinstance(raw, dict) else None
    return (cfg, str(config)) if isinstance(cfg, dict) else None


def input_config(p: ModelParams, root: str | Path | None = None) -> InputConfig:
    """The input the `model` section's network expects, from its weights' configuration.

    timm: the name's `pretrained_cfg` (input_size, interpolation, mean, std, crop_pct); torchvision: the
    name's default weights' preset (crop and resize size, filter); smallcnn 32 px, the ResNets 224 px (bilinear,
    ImageNet's statistics, crop fraction 1 for smallcnn, 0.875 otherwise). A config.json beside a local weights
    file overrides the library's values, and `model.input_size` the size.

    Args:
        p: the `model` section.
        root: the project root, against which a relative `model.pretrained` is read (None: the working folder).

    Returns:
        The InputConfig.

    Raises:
        ValueError: an unknown model name, or an unreadable config.json.
    """
    library, name = parse_backbone(p.backbone)
    size, interp, mean, std, crop, source = 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, CROP_PCT, p.backbone
    if library == "builtin" and name == "smallcnn":
        size, crop = 32, 1.0
    elif library == "timm":
        check_timm_name(name)
        cfg = _timm().models.get_pretrained_cfg(name)
        if cfg is not None:
            c = cfg.to_dict()
            size, interp = int(c.get("input_size", (3, 224, 224))[-1]), c.get("interpolation") or "bicubic"
            mean, std, crop = c.get("mean", mean), c.get("std", std), c.get("crop_pct") or CROP_PCT
            source = f"timm's pretrained_cfg of {name}"
    elif library == "torchvision":
        check_torchvision_name(name)
        import torchvision

        try:
            preset = getattr(torchvision.models.get_model_weights(name).DEFAULT.transforms, "keywords", {})
        except (ValueError, AttributeError):  # a model without published weights: ImageNet's usual input
            preset = {}
        size = int(preset.get("crop_size", 224))
        crop = size / preset["resize_size"] if "resize_size" in preset else CROP_PCT
        interp = getattr(preset.get("interpolation"), "value", "bilinear")
        source = f"torchvision's weights preset of {name}"
    if (found := _weights_config(p, Path(root) if root is not None else None)) is not None:
        c, source = found
        if "input_size" in c:
            size = int(c["input_size"][-1])
        interp = c.get("interpolation") or interp
        mean, std, crop = tuple(c.get("mean", mean)), tuple(c.get("std", std)), c.get("crop_pct") or crop
    if p.input_size is not None:
        size = p.input_size
    if interp not in ("bilinear", "bicubic"):
        interp = "bicubic"  # timm's other filters (random, lanczos) are bicubic's family; only these two here
    return InputConfig(int(size), interp, tuple(float(x) for x in mean), tuple(float(x) for x in std),
                       float(crop), source)


def resolve_input(params: Params, root: str | Path | None = None) -> Params:
    """`params` with every `data` key that says ``auto`` set from the model's input (`input_config`):
    train_size and test_size its size, test_resize its size over its crop fraction, cache_size that resize,
    interpolation, mean and std its own. Keys set to values stay as they are.

    Args:
        params: the params as loaded.
        root: the project root (a relative `model.pretrained`'s config.json is read from there).

    Returns:
        The params (a copy when anything was resolved; the same object when nothing says auto).

    Raises:
        ValueError: an unknown model name, or an unreadable config.json.
    """
    d = params.data
    if not d.unresolved():
        return params
    cfg = input_config(params.model, root)
    update: dict[str, Any] = {}
    for key in ("train_size", "test_size"):
        if getattr(d, key) == "auto":
            update[key] = cfg.size
    if d.test_resize == "auto":
        update["test_resize"] = max(update.get("test_size", d.test_size), cfg.test_resize)
    if d.cache_size == "auto":
        update["cache_size"] = update.get("test_resize", d.test_resize)
    for key in ("interpolation", "mean", "std"):
        if getattr(d, key) == "auto":
            update[key] = getattr(cfg, key)
    data = d.model_validate({**d.model_dump(), **update})
    return params.model_copy(update={"data": data})


# ---- building ----

def read_state_dict(path: str | Path) -> Any:
    """The tensors of a weights file: safetensors (by its suffix, or by its header when torch cannot read it),
    else ``torch.load(weights_only=True)``.

    Args:
        path: the file.

    Returns:
        What the file holds: for safetensors a dict of tensors, for torch whatever it pickled (tensors only).

    Raises:
        Exception: what the readers raise on a file that is neither.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a safetensors file under another name
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception:
            pass
        raise


def _vector_features(net: nn.Module, size: int, where: str) -> int:
    """The width C of the features `net` gives one image, refusing anything but B x C."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, size, size))
    except Exception as err:
        raise ValueError(f"{where} does not run on a {size} x {size} image ({type(err).__name__}: {err}); set "
                         f"model.input_size to a size it takes") from err
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where} gives {what} per batch, not one feature vector per image (B x C): the "
                         f"embedding head needs pooled features (a classification model whose classifier is "
                         f"removed; not a model without global pooling, a detector or a segmenter)")
    return int(out.shape[1])


def build_timm(name: str, input_size: int | None, size: int, **kwargs: Any) -> tuple[nn.Module, int]:
    """A timm model without its classifier: images -> B x C pooled features.

    Args:
        name: the timm name (a weights tag allowed).
        input_size: `model.input_size`: a model built for a fixed size (a ViT) is built for it.
        size: the side its features are checked at (the input config's).
        **kwargs: further arguments of ``timm.create_model`` (``global_pool``...).

    Returns:
        ``(network, C)``.

    Raises:
        ValueError: an unknown name, or a model whose features are not a vector.
    """
    check_timm_name(name)
    timm = _timm()
    args = dict(pretrained=False, num_classes=0, **kwargs)
    net = None
    if input_size is not None:
        try:  # ViTs and their kin take the size they are built for; convolutional networks take any
            net = timm.create_model(name, img_size=input_size, **args)
        except TypeError:
            net = None
    if net is None:
        net = timm.create_model(name, **args)
    return net, _vector_features(net, size, f"model.backbone timm:{name}")


def _classifier(net: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last linear layer of the model's classifier (fc, classifier, heads, head), with its dotted path."""
    for attr in ("fc", "classifier", "heads", "head"):
        m = getattr(net, attr, None)
        if isinstance(m, nn.Linear):
            return attr, m
        if isinstance(m, nn.Module):
            linears = [(f"{attr}.{n}", x) for n, x in m.named_modules() if isinstance(x, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, last, module)


def build_torchvision(name: str, size: int) -> tuple[nn.Module, int, list[str]]:
    """A torchvision classification model with its last linear classifier replaced by the identity.

    Args:
        name: the torchvision name.
        size: the side its features are checked at.

    Returns:
        ``(network, C, prefixes)``: prefixes are the state-dict keys' prefixes a torchvision checkpoint has and
        the network no longer does (the classifier, an Inception's auxiliary classifiers).

    Raises:
        ValueError: an unknown name, a model without a linear classifier, or features that are not a vector.
    """
    import torchvision

    check_torchvision_name(name)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    found = _classifier(net)
    if found is None:
        raise ValueError(f"model.backbone torchvision:{name}: no linear classifier (fc, classifier, heads or head) "
                         f"to replace by the embedding head")
    path, _ = found
    _set_module(net, path, nn.Identity())
    prefixes = [path + "."] + [a + "." for a in ("AuxLogits", "aux1", "aux2")]
    return net, _vector_features(net, size, f"model.backbone torchvision:{name}"), prefixes


def timm_classifier_prefixes(net: nn.Module) -> list[str]:
    """The state-dict prefixes of a timm model's classifier (its `pretrained_cfg['classifier']`), which a timm
    checkpoint has and the model built with num_classes=0 does not.

    Args:
        net: the timm model.

    Returns:
        Prefixes such as ``["head."]`` or ``["head.fc."]``.
    """
    names = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [n + "." for n in names]


def timm_filter(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own adaptation of a checkpoint to a model (its module's ``checkpoint_filter_fn``: a ViT's position
    embedding resampled to the size it is built for, original-format keys renamed), where the module has one and
    it succeeds; else the state as it is (the strict check then names what does not fit).

    Args:
        state: the checkpoint's tensors.
        net: the timm model.

    Returns:
        The adapted state dict.
    """
    fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        out = fn(dict(state), net)
    except Exception:  # another architecture's file: left to the strict check's message
        return state
    return out if isinstance(out, dict) else state
