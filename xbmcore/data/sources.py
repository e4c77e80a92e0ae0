"""Where each real dataset comes from, and how its published layout is found or fetched under data.root.

A dataset is present when its folder (data.root/<folder>, or data.root itself) holds its marker file. Otherwise
its files are looked for in data.root/<into>/ (placed there by hand, e.g. downloaded from a mirror), then fetched
from the public address when there is one and data.download is true, verified, and unpacked. Checksums are the
md5 sums published with the archives (and repeated by torchvision-style loaders); where none is known the check
falls back to the layout: the marker and annotation files must exist and parse.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from xbmcore.config import DATASETS, DataParams
from xbmcore.data import layouts
from xbmcore.data.download import extract, fetch, verify_file
from xbmcore.data.index import Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Remote:
    """One file of a dataset's release.

    Attributes:
        filename: the file's name.
        url: its public address, or None.
        md5: its published md5 sum, or None.
        into: the sub-folder of data.root that receives the file and what it unpacks to.
        archive: whether to unpack it.
    """

    filename: str
    url: str | None
    md5: str | None
    into: str = ""  # sub-folder of data.root that receives the file and what it unpacks to
    archive: bool = True


@dataclass(frozen=True)
class Source:
    """A published dataset: where it comes from and how its layout is recognised and parsed.

    Attributes:
        name: data.name.
        title: the dataset's title, for messages.
        folder: the dataset's own top folder under data.root.
        marker: a file inside `folder` that proves the layout is there.
        parse: ``parse(folder, data params) -> (index, annotation files)``.
        homepage: the dataset's page.
        remotes: the files to fetch (none where it must be obtained by hand).
        by_hand: how to get it where there is no public address (``{root}`` is replaced by data.root).
        image_root: the folder the index's paths are relative to, from the dataset's folder.
    """

    name: str
    title: str
    folder: str  # the dataset's own top folder under data.root
    marker: str  # a file inside `folder` that proves the layout is there
    parse: Callable[[Path, DataParams], tuple[Index, list[Path]]]
    homepage: str
    remotes: tuple[Remote, ...] = ()
    by_hand: str = ""  # how to get it where there is no public address (or the address is dead)
    image_root: Callable[[Path], Path] = field(default=lambda folder: folder)


SOURCES: dict[str, Source] = {
    "sop": Source(
        "sop", "Stanford Online Products", "Stanford_Online_Products", "Ebay_train.txt", layouts.parse_sop,
        "https://cvgl.stanford.edu/projects/lifted_struct/",
        remotes=(Remote("Stanford_Online_Products.zip",
                        "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                        "7f73d41a2f44250d4779881525aea32e"),),
    ),
    "cub": Source(
        "cub", "CUB-200-2011", "CUB_200_2011", "images.txt", layouts.parse_cub,
        "https://www.vision.caltech.edu/datasets/cub_200_2011/",
        remotes=(Remote("CUB_200_2011.tgz", "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                        "97eceeb196236b17998738112f37df78"),),
    ),
    "cars": Source(
        # Marker: the first image, so that an annotation file alone does not pass for the dataset.
        "cars", "Cars196 (Stanford Cars)", "cars196", "car_ims/000001.jpg", layouts.parse_cars,
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        # The original host has been offline for years; the addresses stay so that a revived host or a mirror
        # with the same files works, and the md5 sums identify the right files whatever their origin.
        remotes=(Remote("car_ims.tgz", "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
                        "d5c8f0aa497503f355e17dc7886c3f14", into="cars196"),
                 Remote("cars_annos.mat", "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
                        "b407c6086d669747186bd1d764ff9dbc", into="cars196", archive=False)),
        by_hand="The original address (ai.stanford.edu/~jkrause/car196/) is offline. Get car_ims.tgz (md5 "
                "d5c8f0aa497503f355e17dc7886c3f14) and cars_annos.mat (md5 b407c6086d669747186bd1d764ff9dbc) from a "
                "mirror and put both files in {root}/cars196/ (they are verified and unpacked), or unpack them "
                "yourself so that {root}/cars196/car_ims/000001.jpg and {root}/cars196/cars_annos.mat exist.",
    ),
    "inshop": Source(
        "inshop", "DeepFashion In-shop Clothes Retrieval", "InShop", "Eval/list_eval_partition.txt",
        layouts.parse_inshop, "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        by_hand="In-Shop must be downloaded by hand: follow the link on "
                "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (a Google Drive folder), take "
                "Img/img.zip and Eval/list_eval_partition.txt, and arrange them so that "
                "{root}/InShop/Eval/list_eval_partition.txt and {root}/InShop/img/WOMEN/... exist (unzip img.zip "
                "inside {root}/InShop/).",
        image_root=layouts.inshop_image_root,
    ),
    "vehicleid": Source(
        "vehicleid", "PKU VehicleID", "VehicleID_V1.0", "train_test_split/train_list.txt", layouts.parse_vehicleid,
        "https://www.pkuml.org/resources/pku-vehicleid.html",
        by_hand="VehicleID is released on request: fill in the agreement linked from "
                "https://www.pkuml.org/resources/pku-vehicleid.html and e-mail it as described there. Unpack the "
                "archive you receive so that {root}/VehicleID_V1.0/image/*.jpg and "
                "{root}/VehicleID_V1.0/train_test_split/train_list.txt (and test_list_800/1600/2400.txt) exist.",
    ),
}


def get_source(name: str) -> Source:
    """The published dataset of that name.

    Args:
        name: one of `SOURCES`' keys (sop, cub, cars, inshop, vehicleid).

    Returns:
        Its Source.

    Raises:
        ValueError: an unknown name.
    """
    if name not in SOURCES:
        raise ValueError(f"data.name: unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return SOURCES[name]


def locate(src: Source, root: Path) -> Path | None:
    """The folder holding the published layout: root/<folder>, or root itself when it is that folder.

    Args:
        src: the dataset.
        root: data.root.

    Returns:
        The folder, or None when the marker file is in neither.
    """
    for folder in (root / src.folder, root):
        if (folder / src.marker).is_file():
            return folder
    return None


def _where(src: Source, root: Path) -> str:
    return (src.by_hand or "").format(root=root)


def ensure_raw(src: Source, root: Path, download: bool, progress: bool = True) -> Path:
    """Find the dataset's layout under `root`, fetching and unpacking it first where it must and can.

    Args:
        src: the dataset.
        root: data.root.
        download: fetch missing files from their public address.
        progress: show download progress.

    Returns:
        The dataset's folder.

    Raises:
        FileNotFoundError: not there and not downloadable (the message says how to get it).
        ConnectionError: a download that failed.
        ValueError: a file that fails its checksum, or an archive without the published layout.
    """
    folder = locate(src, root)
    if folder is not None:
        return folder
    files = [root / r.into / r.filename for r in src.remotes]
    have = all(f.exists() for f in files)
    if not src.remotes or (not have and not download):
        hint = _where(src, root) or (
            f"Set data.download: true to fetch it from {src.remotes[0].url}, or download it yourself and put "
            f"{', '.join(r.filename for r in src.remotes)} in {root}/ (verified, then unpacked).")
        raise FileNotFoundError(
            f"{src.title}: not found under {root} (looked for {root / src.folder / src.marker}). {hint}")
    for r, dest in zip(src.remotes, files):
        try:
            if dest.exists():
                log.info("%s: verifying %s", src.title, dest)
                verify_file(dest, md5=r.md5)
            else:
                log.info("%s: downloading %s", src.title, r.url)
                fetch(r.url, dest, md5=r.md5, progress=progress)
        except ConnectionError as err:
            raise ConnectionError(f"{src.title}: {err}. {_where(src, root)}".strip()) from err
        except ValueError as err:
            raise ValueError(f"{src.title}: {err}") from None
        if r.archive:
            log.info("%s: unpacking %s", src.title, dest)
            extract(dest, root / r.into)
    folder = locate(src, root)
    if folder is None:
        raise ValueError(
            f"{src.title}: unpacked {', '.join(r.filename for r in src.remotes)} into {root}, but "
            f"{root / src.folder / src.marker} is still missing: the archive does not have the published layout")
    return folder
