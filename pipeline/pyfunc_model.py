"""The logged MLflow model: an mlflow.pyfunc model that embeds images.

    mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [png_bytes, ...]}))   # -> n x D float32
    mlflow models serve -m <uri> --env-manager local       # POST /invocations, base64 images -> embeddings

Input: a DataFrame with an `image` column (encoded image bytes, or base64 strings as JSON carries them), or a
list of either. Output: the L2-normalised embeddings, n x D float32, equal to the library's (xbmcore.embedding_store.
Embedder: the same weights and the same test transform). The model folder carries its weights (embedder.pt: a
plain dict read with the safe unpickler) and the code it needs (xbmcore and this module), so it loads in any
environment with torch, torchvision, pillow and pydantic.
"""
from __future__ import annotations

import base64
import binascii
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT = "embedder"
COLUMN = "image"
REPO = Path(__file__).resolve().parents[1]


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{COLUMN}[{row}]: expected base64-encoded image bytes ({err})") from err
    raise ValueError(f"{COLUMN}[{row}]: expected image bytes or a base64 string, got {type(value).__name__}")


class ImageEmbedder(mlflow.pyfunc.PythonModel):
    """Encoded images in, embeddings out."""

    def load_context(self, context) -> None:
        import torch

        from xbmcore.embedding_store import Embedder

        state = torch.load(context.artifacts[ARTIFACT], map_location="cpu", weights_only=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.embedder = Embedder.from_state(state, source=state.get("source", ""), device=device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if COLUMN not in model_input.columns:
                raise ValueError(f"input: expected a column {COLUMN!r}, got {list(model_input.columns)}")
            values = model_input[COLUMN].tolist()
        elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
            values = list(model_input)
        else:
            raise ValueError(f"input: expected a DataFrame with an {COLUMN!r} column or a list of images, "
                             f"got {type(model_input).__name__}")
        images = [_as_bytes(v, i) for i, v in enumerate(values)]
        try:
            return self.embedder.embed_images(images)
        except Exception as err:  # PIL's UnidentifiedImageError and friends: say which row
            bad = next((i for i, b in enumerate(images) if not _decodes(b)), None)
            raise ValueError(f"{COLUMN}[{bad}]: cannot decode the image ({type(err).__name__}: {err})") from err


def _decodes(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def log_embedding_model(embedder, name: str = "model", pip_requirements: list[str] | None = None,
                        input_example: Any = None):
    """Log `embedder` (xbmcore.embedding_store.Embedder) as a pyfunc model under `name` in the active run;
    returns MLflow's ModelInfo."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([ColSpec("binary", COLUMN)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedder.card.embedding_dim))]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "embedder.pt"
        torch.save({**embedder.state(), "source": embedder.card.source}, weights)
        # The code the model imports, under the package names it imports them by: code/xbmcore, code/pipeline.
        shutil.copytree(REPO / "xbmcore", tmp / "xbmcore", ignore=shutil.ignore_patterns("__pycache__"))
        (tmp / "pipeline").mkdir()
        (tmp / "pipeline" / "__init__.py").write_text("")
        shutil.copy2(Path(__file__), tmp / "pipeline" / "pyfunc_model.py")
        return mlflow.pyfunc.log_model(name=name, python_model=ImageEmbedder(), artifacts={ARTIFACT: str(weights)},
                                       code_paths=[str(tmp / "xbmcore"), str(tmp / "pipeline")],
                                       signature=signature, pip_requirements=pip_requirements,
                                       input_example=input_example)
