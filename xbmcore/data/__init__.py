"""Datasets: the embedded synthetic benchmark and the real DML datasets, prepared into one normalised index.

    prepare_dataset(p, project_root) -> Path     generate / download / parse into data/prepared/<name>
    open_splits(prepared_dir, p) -> Splits      train (augmented), val, test, query, gallery ImageDatasets
"""
from xbmcore.data.dataset import ImageDataset
from xbmcore.data.prepare import Splits, open_splits, prepare_dataset
from xbmcore.data.sources import SOURCES, get_source

__all__ = ["ImageDataset", "SOURCES", "Splits", "get_source", "open_splits", "prepare_dataset"]
