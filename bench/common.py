"""What the training benches share: the project's params file, its prepared dataset, a Trainer that logs nowhere.

A bench trains on the dataset this project has prepared (artifacts of `dvc repro`) when it is there, so a timing
does not include generating it; otherwise it prepares one in a new temporary folder.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")  # the benches' --params default: this project's, wherever they run from


def data_root(p, root: Path | None = None) -> Path:
    """`root` (default: this project) if p's dataset is prepared there, else a new temporary folder."""
    root = ROOT if root is None else Path(root)
    return root if (root / p.data.prepared / p.data.name).is_dir() else Path(tempfile.mkdtemp(prefix="bench_"))


def prepared_splits(p, root: Path | None = None):
    """The splits of p's dataset, prepared in data_root(p, root) (a no-op check when it is there already)."""
    from xbmcore.data import open_splits, prepare_dataset

    return open_splits(prepare_dataset(p.data, data_root(p, root), progress=False), p.data)


def quiet_trainer(p, splits):
    """A Trainer of p's model (random weights, seed 0: a step's speed does not depend on where they start) whose
    events go nowhere."""
    import torch

    from xbmcore.events import NullSink
    from xbmcore.models import build_model
    from xbmcore.trainer import Trainer

    torch.manual_seed(0)
    return Trainer(p, build_model(p.model, load_weights=False), splits, NullSink())
