"""Embedding networks: a backbone, global pooling, a linear head to D dims, L2 normalisation.

f(x) = normalize(W . pool(backbone(x))), so the inner product of two embeddings is their cosine similarity, which
is what the losses, the memory and the faiss index all assume.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from xbmcore.backbones import (build_timm, build_torchvision, input_config, parse_backbone, read_state_dict,
                                timm_classifier_prefixes, timm_filter)
from xbmcore.config import ModelParams
from xbmcore.pretrain import SKIPPED

# torchvision builder and weights enum per backbone; the feature width is read off the built network.
_RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}


# GroupNorm's groups per layer (Wu & He 2018 use 32 on ResNets of 64-2048 channels; smallcnn starts at 32).
GROUPS = 8


def _conv_bn_relu(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    layer = nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(GROUPS, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True))


class SmallCNN(nn.Sequential):
    """Four conv-BN-ReLU blocks (32-64-128-256 channels) with 2x2 max-pooling between them: 32 -> 4 px. `norm`
    "group" puts GroupNorm where BatchNorm is (for batches too small for batch statistics).

    About 15 M multiply-adds per 32 px image (blocks 2-4 4.7 M each; a ResNet-18 needs ~37 M at 32 px, 1.8 G at
    224 px): about 1,500 images/s forward + backward (batch 64, Adam) on 2 CPU cores, so a run of a thousand
    steps takes about a minute of compute.

    Args:
        widths: the output channels of each block; the network downsamples by 2 between blocks.
        norm: ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm of `GROUPS` groups, independent of the batch).

    Attributes:
        out_channels (int): C, the last block's channels: the width of the pooled features.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), norm: str = "batch"):
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(_conv_bn_relu(c_in, w, norm))
            c_in = w
        super().__init__(*layers)
        self.out_channels = c_in


class AvgMaxPool(nn.Module):
    """Sum of global average and global max pooling (common in metric learning, e.g. Proxy-Anchor): B x C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool feature maps to vectors.

        Args:
            x: B x C x H x W feature maps (any memory format).

        Returns:
            B x C: the global average plus the global maximum of each channel.
        """
        # flatten (not view): the input may be channels_last, i.e. non-contiguous in NCHW order.
        return (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)


class EmbeddingNet(nn.Module):
    """backbone -> AvgMaxPool -> Linear(C, D) -> L2 normalisation. forward: B x 3 x H x W -> B x D.

    A backbone that pools itself (a timm or torchvision model, B x 3 x H x W -> B x C) comes with
    ``pool=nn.Identity()``.

    Args:
        backbone: a module mapping B x 3 x H x W images to B x C x h x w feature maps (or B x C features).
        feat_dim: C, the backbone's output channels.
        embedding_dim: D, the embedding's dimension.
        freeze_bn: keep the backbone's BatchNorm layers in eval mode with frozen affine parameters (their running
            statistics, e.g. ImageNet's, are kept): for pretrained backbones and small batches.
        pool: the global pooling of the backbone's output (None: AvgMaxPool).

    Attributes:
        backbone (nn.Module): the feature extractor.
        pool (nn.Module): the global pooling (AvgMaxPool, or the identity for a backbone that pools itself).
        head (nn.Linear): the C -> D projection.
        feat_dim (int): C.
        embedding_dim (int): D.
        freeze_bn (bool): whether the backbone's BatchNorm is frozen.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, embedding_dim: int, freeze_bn: bool = False,
                 pool: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.pool = AvgMaxPool() if pool is None else pool
        self.head = nn.Linear(feat_dim, embedding_dim)
        self.feat_dim = feat_dim
        self.embedding_dim = embedding_dim
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self._backbone_bns():
                m.requires_grad_(False)
            self.train(self.training)

    def _backbone_bns(self):
        return (m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def train(self, mode: bool = True) -> "EmbeddingNet":
        """Set training mode, as ``nn.Module.train``; a frozen backbone BatchNorm stays in eval mode.

        Args:
            mode: True for training mode, False for eval mode.

        Returns:
            The network itself.
        """
        # Frozen BN keeps its (pretrained) running statistics: eval mode even while the rest trains.
        super().train(mode)
        if self.freeze_bn:
            for m in self._backbone_bns():
                m.eval()
        return self

    def forward(self, x: torch.Tensor, with_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """B x D unit-norm embeddings; with_features: also the pooled backbone features they come from (B x C), for
        a memory that stores features (memory.store).

        Args:
            x: B x 3 x H x W normalised images (``xbmcore.data`` makes them).
            with_features: also return the pooled backbone features.

        Returns:
            B x D embeddings, or ``(embeddings, features)`` with `with_features`.
        """
        f = self.pool(self.backbone(x))
        emb = F.normalize(self.head(f), dim=1)
        return (emb, f) if with_features else emb

    def embed_features(self, f: torch.Tensor) -> torch.Tensor:
        """The head's unit-norm embeddings of pooled backbone features: N x C -> N x D.

        Args:
            f: N x C pooled backbone features (``forward(x, with_features=True)[1]``); cast to the head's dtype.

        Returns:
            N x D unit-norm embeddings: what `forward` returns for the images those features come from.
        """
        return F.normalize(self.head(f.to(self.head.weight.dtype)), dim=1)


def _load_imagenet(net: nn.Module, backbone: str, weights: torchvision.models.WeightsEnum) -> None:
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except Exception as err:  # network, HTTP, hash or unpickling errors all end the same way for the user
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        file = os.path.basename(weights.url)
        raise RuntimeError(
            f"model.pretrained=imagenet: the ImageNet weights for {backbone} ({weights}) could not be downloaded "
            f"from {weights.url} ({type(err).__name__}: {err}). torchvision caches them in {cache} (the hub dir; "
            f"set TORCH_HOME to move it). To go on, place {file} in {cache}, or set model.pretrained: none."
        ) from err
    net.load_state_dict(state)


def load_pretrained(net: EmbeddingNet, path: str | Path, classifier: tuple[str, ...] = ("fc.",),
                    adapt: Callable[[dict, nn.Module], dict] | None = None) -> None:
    """Load a local weights file into `net`: a state dict of the whole model (keys backbone.*, head.*: the pretrain
    stage's output), or of its backbone alone, such as a torchvision or timm checkpoint (its classifier, keys under
    `classifier`, is left out, as with imagenet). A dict that wraps it under "model" or "state_dict", and DDP's
    "module." prefix, are accepted. Any other missing or unexpected key, or a shape that differs, is an error that
    names it.

    Args:
        net: the network to load into (in place).
        path: a safetensors file, or a file written by ``torch.save`` holding tensors only (read with
            ``weights_only=True``).
        classifier: the key prefixes of a backbone checkpoint's classifier, which the backbone lacks.
        adapt: a backbone checkpoint's adaptation to the backbone (timm's checkpoint filter), or None.

    Raises:
        ValueError: not a file, not readable as torch weights, the pretrain stage's "skipped" marker, no state
            dict, or keys and shapes that do not fit the model or its backbone.
    """
    path = Path(path)
    where = f"model.pretrained: {path}"
    if not path.is_file():
        raise ValueError(f"{where} is not a file (expected none, imagenet or the path of a weights file)")
    try:
        state = read_state_dict(path)
    except Exception as err:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ValueError(f"{where} could not be read as torch weights or safetensors ({type(err).__name__}: "
                         f"{err})") from err
    if isinstance(state, dict) and isinstance(state.get(SKIPPED), str):
        raise ValueError(f"{where} holds no weights: {state[SKIPPED]}")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} holds no state dict (expected a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # The whole model has backbone.* keys (and head.*, ours); a backbone file may have head.* (a timm ViT's classifier).
    whole = ("backbone.",) if classifier != ("fc.",) else ("backbone.", "head.")
    if any(k.startswith(whole) for k in state):
        target, what = net, "the model"
    else:
        target, what = net.backbone, "the backbone"
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
        if adapt is not None:
            state = adapt(state, net.backbone)
    own = target.state_dict()

    def names(keys: list[str]) -> str:  # a whole other architecture would list hundreds
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    problems = [f"missing {names(missing)}" if missing else "",
                f"unexpected {names(unexpected)}" if unexpected else "",
                names([f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                       for k, v in own.items() if k in state and state[k].shape != v.shape])]
    problems = [x for x in problems if x]
    if problems:
        raise ValueError(f"{where} does not fit {what} ({type(target).__name__}): {'; '.join(problems)}")
    target.load_state_dict(state)


def build_model(p: ModelParams, load_weights: bool = True) -> EmbeddingNet:
    """Build the embedding network described by the `model` section of params.yaml, with its pretrained weights
    unless `load_weights` is False (a caller that loads trained weights next needs neither the download nor the
    file).

    Args:
        p: the `model` section: `backbone` (smallcnn, resnet18, resnet50, timm:<name>, torchvision:<name>),
            `embedding_dim`, `pretrained` (none, imagenet or a weights file), `input_size`, `freeze_bn`, `norm`
            (smallcnn's BatchNorm or GroupNorm).
        load_weights: load the pretrained weights `p.pretrained` names (downloading ImageNet's if needed).

    Returns:
        The EmbeddingNet, in training mode, on the CPU.

    Raises:
        ValueError: an unknown backbone (timm and torchvision names: with their near matches), ImageNet weights
            for smallcnn or a timm or torchvision model (a local file instead), norm "group" for a ResNet, a model
            whose features are not a vector, or a weights file that does not fit (see `load_pretrained`).
        RuntimeError: the ImageNet weights could not be downloaded (the message says where to put them).
    """
    local = p.pretrained not in ("none", "imagenet")
    library, name = parse_backbone(p.backbone)
    if library != "builtin":
        return _build_library_model(p, library, name, load_weights)
    if p.backbone == "smallcnn":
        if p.pretrained == "imagenet":
            raise ValueError("model.pretrained: smallcnn has no ImageNet weights; expected none or the path of a "
                             "weights file (the pretrain stage's, say), got 'imagenet'")
        backbone: nn.Module = SmallCNN(norm=p.norm)
        feat_dim = backbone.out_channels
    elif p.backbone in _RESNETS:
        if p.norm != "batch":
            raise ValueError(f"model.norm: {p.norm!r} is for smallcnn; the torchvision ResNets keep their "
                             f"BatchNorm (use model.freeze_bn with pretrained weights and small batches)")
        builder, weights = _RESNETS[p.backbone]
        net = builder(weights=None)
        if p.pretrained == "imagenet" and load_weights:
            _load_imagenet(net, p.backbone, weights)
        feat_dim = net.fc.in_features
        # Everything up to the last stage; our pooling and head replace avgpool and fc.
        backbone = nn.Sequential(
            OrderedDict((name, m) for name, m in net.named_children() if name not in ("avgpool", "fc"))
        )
    else:
        raise ValueError(f"model.backbone: expected one of smallcnn, {', '.join(_RESNETS)}, got {p.backbone!r}")
    if p.freeze_bn and p.pretrained == "none":
        warnings.warn(
            "model.freeze_bn with pretrained: none keeps BatchNorm at its initial statistics (mean 0, var 1); "
            "freezing is meant for pretrained backbones",
            stacklevel=2,
        )
    model = EmbeddingNet(backbone, feat_dim, p.embedding_dim, freeze_bn=p.freeze_bn)
    if local and load_weights:
        load_pretrained(model, p.pretrained)
    return model


def _build_library_model(p: ModelParams, library: str, name: str, load_weights: bool) -> EmbeddingNet:
    """A timm or torchvision classification model, its classifier replaced by the embedding head."""
    if p.pretrained == "imagenet":
        raise ValueError(f"model.pretrained: imagenet downloads torchvision's ResNet weights; for {p.backbone} give "
                         f"the path of a local weights file (safetensors or torch; docs/backbones.md says how to "
                         f"get one), or none")
    if p.norm != "batch":
        raise ValueError(f"model.norm: {p.norm!r} is for smallcnn; {p.backbone} keeps its own normalisation layers")
    size = input_config(p).size
    adapt = None
    if library == "timm":
        backbone, feat_dim = build_timm(name, p.input_size, size)
        classifier, adapt = tuple(timm_classifier_prefixes(backbone)), timm_filter
    else:
        backbone, feat_dim, prefixes = build_torchvision(name, size)
        classifier = tuple(prefixes)
    if p.freeze_bn and p.pretrained == "none":
        warnings.warn("model.freeze_bn with pretrained: none keeps BatchNorm at its initial statistics; freezing is "
                      "meant for pretrained backbones", stacklevel=3)
    model = EmbeddingNet(backbone, feat_dim, p.embedding_dim, freeze_bn=p.freeze_bn, pool=nn.Identity())
    if p.pretrained != "none" and load_weights:
        load_pretrained(model, p.pretrained, classifier=classifier or ("fc.",), adapt=adapt)
    return model
