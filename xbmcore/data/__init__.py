"""Datasets: the embedded synthetic benchmark, the real DML datasets and one's own images (folder, csv), prepared
into one normalised index (and, for real images, a decoded-image cache).

    prepare_dataset(p, project_root) -> Path     generate / download / parse into data/prepared/<name>
    open_splits(prepared_dir, p) -> Splits      train (augmented), val, test, query, gallery ImageDatasets
    to_device(batch, device)                    a loader batch as network input on the device (batch.py)
"""
from xbmcore.data.dataset import ImageDataset
from xbmcore.data.prepare import Splits, open_splits, prepare_dataset
from xbmcore.data.sources import SOURCES, get_source

__all__ = ["ImageDataset", "SOURCES", "Splits", "get_source", "open_splits", "prepare_dataset"]
