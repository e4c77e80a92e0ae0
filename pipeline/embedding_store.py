"""A trained embedding network as the application uses it: `Embedder` (the network, its test transform, files or
images in, embeddings out) and its `ModelCard` (what a query must match to search an embedded collection).

The embedded collection on disk (shards, items, faiss index, manifest) is the application's: pipeline/store.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.collection import embed_files
from xbmcore.config import DataParams, ModelParams
from xbmcore.data.decode import DEFAULT_MAX_PIXELS, decode_rgb
from xbmcore.data.transforms import MEAN, STD, pil_transform
from xbmcore.models import build_model


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes, in state_dict order): the same network
    whatever file or MLflow model it was read from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ModelCard:
    """What a query must match to search an index: the same weights, input size and embedding dimension."""

    digest: str
    embedding_dim: int
    test_resize: int  # shorter side before the centre crop
    test_size: int  # centre crop: the network's input size
    source: str = ""  # where it was loaded from (model.pt path or MLflow URI), to load it again

    def check_compatible(self, other: "ModelCard", where: str) -> None:
        """Refuse a model that cannot query an index built with `self`, naming both."""
        for name in ("embedding_dim", "test_size", "test_resize"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise ValueError(f"{where}: built with {name} {a} (model {self.source}), the model "
                                 f"{other.source} has {name} {b}; embed the images again with that model")
        if self.digest != other.digest:
            raise ValueError(f"{where}: built by another model (weights sha256 {self.digest[:12]}..., "
                             f"{self.source}) than {other.source} (sha256 {other.digest[:12]}...); its similarities "
                             f"would be meaningless: query with the model that built it, or embed again")


class Embedder:
    """A trained embedding network with its test transform (resize, centre crop, normalise) and its ModelCard.

    Files and encoded images are decoded within `max_pixels` (xbmcore.data.decode), straight to the test resize.
    """

    def __init__(self, model: torch.nn.Module, model_params: dict[str, Any], test_resize: int, test_size: int,
                 source: str = "", device: str | torch.device = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                 interpolation: str = "bilinear", mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD):
        self.model_params = dict(model_params)
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # The test view the model was trained with: its sizes, filter and normalisation (a timm model's own).
        self.view = {"interpolation": interpolation, "mean": tuple(mean), "std": tuple(std)}
        self.transform = pil_transform(DataParams(test_resize=test_resize, test_size=test_size, **self.view),
                                       train=False)
        self.card = ModelCard(model_digest(model), int(model.embedding_dim), test_resize, test_size, source)

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "", device: str | torch.device = "cpu",
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> "Embedder":
        """From `state()`'s dict, or a train_xbm model.pt (model, model_params) plus test_resize and test_size (and
        interpolation, mean, std where they are not the built-in backbones' bilinear and ImageNet statistics)."""
        p = ModelParams(**state["model_params"]).model_copy(update={"pretrained": "none"})  # weights follow
        model = build_model(p, load_weights=False)
        model.load_state_dict(state["model"])
        view = {k: state[k] for k in ("interpolation", "mean", "std") if k in state}
        return cls(model, state["model_params"], int(state["test_resize"]), int(state["test_size"]), source, device,
                   max_pixels, **view)

    def state(self) -> dict[str, Any]:
        """Everything `from_state` needs (tensors, numbers and strings: torch.load(weights_only=True) reads it)."""
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "model_params": self.model_params, "test_resize": self.card.test_resize,
                "test_size": self.card.test_size, "interpolation": self.view["interpolation"],
                "mean": list(self.view["mean"]), "std": list(self.view["std"])}

    def decode(self, source) -> Any:
        """A file or encoded image as the PIL image the transform takes: RGB at the test resize, within max_pixels."""
        return decode_rgb(source, self.card.test_resize, self.max_pixels)

    def embed_files(self, paths: list[Path], **kwargs) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """collection.embed_files with this model, transform and pixel budget."""
        load = partial(decode_rgb, size=self.card.test_resize, max_pixels=self.max_pixels)
        return embed_files(self.model, paths, self.transform, device=self.device, load=load, **kwargs)

    def embed_images(self, images: Iterable, batch_size: int = 64, names: list[str] | None = None) -> np.ndarray:
        """PIL images (any mode) or encoded image bytes -> n x D float32.

        Streams: each image is decoded (within max_pixels) and transformed straight into the batch tensor, so a
        batch never holds more than one decoded image. An image that cannot be decoded raises ValueError naming
        it (names[i], else its position)."""
        size = self.card.test_size
        batch = torch.empty(batch_size, 3, size, size)  # B x 3 x S x S, refilled for every batch
        out, n = [], 0
        with torch.inference_mode():
            for i, im in enumerate(images):
                try:
                    rgb = self.decode(im) if isinstance(im, (bytes, bytearray, memoryview)) else im.convert("RGB")
                except Exception as err:  # Pillow raises many types for a damaged or foreign file
                    name = names[i] if names else f"image {i}"
                    raise ValueError(f"{name}: cannot decode the image ({type(err).__name__}: {err})") from err
                batch[n] = self.transform(rgb)
                n += 1
                if n == batch_size:
                    out.append(self.model(batch.to(self.device)).float().cpu().numpy())
                    n = 0
            if n:
                out.append(self.model(batch[:n].to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.card.embedding_dim), np.float32)
