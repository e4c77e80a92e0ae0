"""The logged MLflow model: an mlflow.pyfunc model that embeds images.

    mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [png_bytes, ...]}))   # -> n x D float32
    mlflow models serve -m <uri> --env-manager local       # POST /invocations, base64 images -> embeddings

Input: a DataFrame with an `image` column (encoded image bytes, or base64 strings as JSON carries them), or a
list of either. Output: the L2-normalised embeddings, n x D float32, equal to the library's (pipeline.embedding_store.
Embedder: the same weights and the same test transform).

Logged as a model from code (pipeline/pyfunc_code.py builds it; no pickled object): the model folder carries its
weights (embedder.pt: a plain dict read with the safe unpickler) and the code it needs (xbmcore and this module),
so it loads in any environment with torch, torchvision, pillow and pydantic.

Limits, from the model's config (logged from params.yaml; MLFLOW_PYFUNC_INFERENCE_CONFIG or load_model's
model_config override them): at most `max_images` images per request, each within `max_pixels`. Anything over
them, and anything that is not an image, is an MlflowException with INVALID_PARAMETER_VALUE, which the server
answers with HTTP 400 naming the row (image[i]) or the cap.
"""
from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

ARTIFACT = "embedder"
COLUMN = "image"
REPO = Path(__file__).resolve().parents[1]
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
MAX_IMAGES = 64  # per request, when the model's config does not say (see params.yaml: serve.max_images)


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{COLUMN}[{row}]: expected base64-encoded image bytes ({err})") from err
    raise ValueError(f"{COLUMN}[{row}]: expected image bytes or a base64 string, got {type(value).__name__}")


def _bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # HTTP 400 from mlflow models serve


class ImageEmbedder(mlflow.pyfunc.PythonModel):
    """Encoded images in, embeddings out."""

    def load_context(self, context) -> None:
        import torch

        from xbmcore.data.decode import DEFAULT_MAX_PIXELS
        from pipeline.embedding_store import Embedder

        config = {"max_images": MAX_IMAGES, "max_pixels": DEFAULT_MAX_PIXELS, **(context.model_config or {})}
        for key in ("max_images", "max_pixels"):
            if not isinstance(config[key], int) or config[key] < 1:
                raise ValueError(f"model_config {key}: expected a positive integer, got {config[key]!r}")
        self.max_images = config["max_images"]
        state = torch.load(context.artifacts[ARTIFACT], map_location="cpu", weights_only=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.embedder = Embedder.from_state(state, source=state.get("source", ""), device=device,
                                            max_pixels=config["max_pixels"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        if isinstance(model_input, pd.DataFrame):
            if COLUMN not in model_input.columns:
                raise _bad_request(f"input: expected a column {COLUMN!r}, got {list(model_input.columns)}")
            values = model_input[COLUMN]
        elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
            values = model_input
        else:
            raise _bad_request(f"input: expected a DataFrame with an {COLUMN!r} column or a list of images, "
                               f"got {type(model_input).__name__}")
        if len(values) > self.max_images:  # before any image is decoded
            raise _bad_request(f"input: {len(values)} images in one request, over the limit of {self.max_images} "
                               f"(max_images); send at most {self.max_images} per request")

        def images() -> Iterator[bytes]:  # one at a time: the embedder decodes each into its batch and drops it
            for i, v in enumerate(values):
                yield _as_bytes(v, i)

        try:
            return self.embedder.embed_images(images(), names=[f"{COLUMN}[{i}]" for i in range(len(values))])
        except ValueError as err:  # a row that is not a readable image within the budget, named
            raise _bad_request(str(err)) from err


def log_embedding_model(embedder, name: str = "model", pip_requirements: list[str] | None = None,
                        max_images: int = MAX_IMAGES):
    """Log `embedder` (pipeline.embedding_store.Embedder) as a pyfunc model from code under `name` in the active
    run, with its limits (embedder.max_pixels, max_images) as the model's config; returns MLflow's ModelInfo."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec
    from PIL import Image

    signature = ModelSignature(inputs=Schema([ColSpec("binary", COLUMN)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedder.card.embedding_dim))]))
    example = io.BytesIO()
    Image.new("RGB", (embedder.card.test_resize,) * 2, (128, 96, 64)).save(example, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "embedder.pt"
        torch.save({**embedder.state(), "source": embedder.card.source}, weights)
        # The code the model imports, under the package names it imports them by: code/xbmcore, code/pipeline.
        shutil.copytree(REPO / "xbmcore", tmp / "xbmcore", ignore=shutil.ignore_patterns("__pycache__"))
        (tmp / "pipeline").mkdir()
        (tmp / "pipeline" / "__init__.py").write_text("")
        # The served model's own modules, beside it: an installed project of another version (or an editable
        # install of another checkout) must not lend it its Embedder.
        for module in ("pyfunc_model.py", "embedding_store.py", "collection.py"):
            shutil.copy2(Path(__file__).with_name(module), tmp / "pipeline" / module)
        return mlflow.pyfunc.log_model(name=name, python_model=str(CODE_FILE), artifacts={ARTIFACT: str(weights)},
                                       code_paths=[str(tmp / "xbmcore"), str(tmp / "pipeline")],
                                       model_config={"max_images": max_images, "max_pixels": embedder.max_pixels},
                                       signature=signature, pip_requirements=pip_requirements,
                                       input_example=pd.DataFrame({COLUMN: [example.getvalue()]}))
