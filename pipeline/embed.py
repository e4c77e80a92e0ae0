"""python -m pipeline.embed --model MODEL --images FOLDER|CSV --out DIR [--index exact|hnsw|ivfpq] [--nproc N]

Embeds an image collection with a trained model and writes an embedded collection (pipeline/store.py): the
embeddings in shards, the image paths, the labels when the layout has them (class folders, or a CSV `label`
column), a faiss index, and a manifest with the model's identity and the index's parameters, for
`python -m pipeline.search`.

The collection is embedded in chunks of --chunk-size images, each written atomically as it finishes: a killed run,
started again with the same arguments, resumes after the last finished chunk. `--nproc N` runs N processes
through torchrun, as training does (one per GPU, or gloo processes on the CPU), each embedding a contiguous part
of the chunks; the result is the same as one process's, to the bit on the CPU. On several nodes, start torchrun
yourself with `--nproc` equal to its --nproc-per-node and --out on a file system every node sees.

IMAGES may also be a prepared dataset (data/prepared/<name>, written by the download stage): `--split` of it is
embedded through the dataset's own storage (the embedded set's image array, or a real dataset's prepared
images), with the dataset's class ids as labels.

MODEL is the train_xbm stage's model.pt (its input size comes from the params file's data.test_resize and
data.test_size, the values it was trained with), or a model the evaluate stage logged to MLflow:
`models:/<model_id>` or `runs:/<run_id>/model` (it carries its own input size).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.cli import add_params_arguments, load_cli_params
from pipeline.store import CHUNK_ROWS, INDEX_KINDS, PQ_CODE_BYTES, ChunkWriter, check_code_bytes, items_digest
from pipeline.tracking import configure_logging
from pipeline.collection import read_collection
from xbmcore.distributed import Dist, init_process_group, launched_by_torchrun
from pipeline.embedding_store import Embedder

log = logging.getLogger(__name__)
URI_SCHEMES = ("models:/", "runs:/")
# A rank that has finished its chunks waits for the slowest one: hours on a large collection, past the process
# group's 10-minute timeout, which is there to catch a hang.
FINISH_TIMEOUT = timedelta(hours=48)


def index_kind(value: str) -> str:
    """--index's type: the kinds of pipeline/store.py, and a clear word for the name that went."""
    if value == "ivf":
        raise argparse.ArgumentTypeError(
            "'ivf' is gone: it built an HNSW graph, which is now --index hnsw; for inverted lists of compressed "
            "codes re-ranked exactly, use --index ivfpq (choose from exact, hnsw, ivfpq)")
    return value


def load_embedder(spec: str, params=None, root: Path | None = None, device: str = "cpu") -> Embedder:
    """The model named by `spec`: a model.pt path (sizes from `params.data`) or an MLflow URI (see the module
    docstring). A missing file, an unknown scheme or a model that is not one of ours is a ValueError."""
    if ":" in spec and not Path(spec).exists():  # scheme:rest
        if not spec.startswith(URI_SCHEMES):
            raise ValueError(f"--model {spec}: unknown URI scheme {spec.split(':', 1)[0]!r}; expected a model.pt "
                             f"path, models:/<model_id> or runs:/<run_id>/<name>")
        return _load_mlflow(spec, params, root, device)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model {spec}: no such file (expected the train_xbm stage's model.pt, e.g. "
                         f"artifacts/train_xbm/model.pt, or an MLflow URI models:/... or runs:/...)")
    from xbmcore.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if "model" not in state or "model_params" not in state:
        raise ValueError(f"{path}: not a trained model (expected the keys model and model_params of "
                         f"artifacts/train_xbm/model.pt, got {sorted(state)})")
    if params is None:
        raise ValueError(f"{path}: a model.pt needs the params file for its input size (data.test_resize, "
                         f"data.test_size)")
    from xbmcore.data.transforms import interpolation, normalisation

    d = params.data
    mean, std = normalisation(d)
    state = {**state, "test_resize": d.test_resize, "test_size": d.test_size, "interpolation": interpolation(d),
             "mean": mean, "std": std}
    return Embedder.from_state(state, source=str(path.resolve()), device=device, max_pixels=params.data.max_pixels)


def _load_mlflow(uri: str, params, root: Path | None, device: str) -> Embedder:
    import mlflow

    from pipeline.pyfunc_model import ImageEmbedder

    if params is not None and root is not None:  # MLFLOW_TRACKING_URI, else the project's store
        from pipeline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(params, root))
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as err:  # MLflow raises its own exception types for a missing run, model or artifact
        raise ValueError(f"--model {uri}: cannot load it from {mlflow.get_tracking_uri()} "
                         f"({type(err).__name__}: {err})") from err
    inner = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    if not isinstance(inner, ImageEmbedder):
        raise ValueError(f"--model {uri}: not an image-embedding model of this project (loaded a "
                         f"{type(inner or model).__name__}); models logged by the evaluate stage are")
    emb = inner.embedder
    emb.card.source = uri
    emb.device = torch.device(device)
    emb.model.to(emb.device)
    return emb


@dataclass
class Source:
    """What to embed: the items in order, and how to embed rows [a, b) of them."""

    names: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    root: Path
    embed: Callable[[int, int], tuple[np.ndarray, list[int], list[tuple[str, str]]]]  # emb, rows skipped, why


def files_source(embedder: Embedder, images: Path, batch_size: int, workers: int, strict: bool,
                 progress: bool | None) -> Source:
    coll = read_collection(images)
    paths = coll.paths

    def embed(a: int, b: int):
        try:
            emb, kept, skipped = embedder.embed_files(paths[a:b], batch_size=batch_size, num_workers=workers,
                                                      strict=strict, names=coll.names[a:b], progress=progress)
        except ValueError as err:  # every image of this chunk failed (and was named in a warning)
            if strict or not str(err).startswith("none of the"):
                raise
            return np.zeros((0, embedder.card.embedding_dim), np.float32), list(range(b - a)), \
                [(coll.names[i], "cannot decode the image") for i in range(a, b)]
        return emb, sorted(set(range(b - a)) - set(kept.tolist())), skipped

    return Source(coll.names, coll.labels, coll.classes, coll.root.resolve(), embed)


def prepared_source(embedder: Embedder, folder: Path, params, split: str, batch_size: int, workers: int) -> Source:
    """One split of a prepared dataset, in index order, with its class ids as labels."""
    from xbmcore.data import open_splits
    from xbmcore.data.index import ARRAY_FILE, read_index, read_meta
    from xbmcore.evaluate import compute_embeddings

    meta = read_meta(folder)
    card = embedder.card
    p = params.data.model_copy(update={"name": meta["dataset"], "test_resize": card.test_resize,
                                       "test_size": card.test_size, **embedder.view})
    ds = getattr(open_splits(folder, p), split, None)
    if ds is None:
        raise ValueError(f"--split {split}: {folder} has no such split")
    index = read_index(folder, meta["storage"] == "array")
    items = index.items[index.splits == split]
    if len(items) != len(ds):
        raise ValueError(f"{folder}: the {split} split has {len(ds)} images but the index lists {len(items)}")

    def embed(a: int, b: int):
        sub = torch.utils.data.Subset(ds, range(a, b))
        emb, _ = compute_embeddings(embedder.model, sub, batch_size, embedder.device, workers)
        return emb, [], []

    if meta["storage"] == "array":  # rows of the image array
        names, root = [f"{ARRAY_FILE}:{int(i)}" for i in items], folder.resolve()
    else:
        names, root = [str(i) for i in items], (folder / meta["image_root"]).resolve()
    return Source(names, np.asarray(ds.class_ids, dtype=np.int64), None, root, embed)


def _without_nproc(argv: list[str]) -> list[str]:
    """argv for the ranks: torchrun's own parser would take --nproc for an abbreviation of its --nproc-per-node
    (and refuse it as ambiguous); the ranks read their number from torchrun instead."""
    out, args = [], iter(argv)
    for a in args:
        if a == "--nproc":
            next(args, None)  # its value
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _wait_for_every_rank(d: Dist) -> None:
    """A barrier on a gloo group of its own, whose timeout outlasts the slowest rank's chunks."""
    if d.active:
        import torch.distributed as dist

        dist.barrier(group=dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m pipeline.embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model.pt, models:/<model_id> or runs:/<run_id>/model")
    ap.add_argument("--images", required=True, type=Path, help="<root>/<class>/<image>, <root>/<image>, a CSV "
                                                              "with the header path,label, or data/prepared/<name>")
    ap.add_argument("--out", required=True, type=Path,
                    help="output folder: finished chunks of the same model, images and settings are kept (resume)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="stored embeddings: float16 halves the size and rounds each component to 11 significant "
                         "bits (relative error <= 4.9e-4)")
    ap.add_argument("--index", type=index_kind, choices=INDEX_KINDS, default="exact",
                    help="exact: every item scored, no index (fine to ~1M items); hnsw: a graph over the full "
                         "vectors, in RAM (~0.8 GB per million 128-d items); ivfpq: compressed codes in RAM (~40 B "
                         "per item), the best candidates re-ranked from the stored vectors: past what RAM holds for "
                         "hnsw. Figures: docs/performance.md, bench.search (default: %(default)s)")
    ap.add_argument("--code-bytes", type=int, default=PQ_CODE_BYTES,
                    help="ivfpq: bytes of code per item, a divisor of the embedding dimension: more is a closer "
                         "approximation and a larger index (default: %(default)s)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes on this node (torchrun): one per GPU, or CPU processes (default: 1, or what "
                         "torchrun started)")
    ap.add_argument("--chunk-size", type=int, default=CHUNK_ROWS,
                    help="images per chunk, the unit written at once and resumed from (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes that decode and resize images while the network runs; 0 decodes in this "
                         "process (default: %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU when torch sees one (default: %(default)s)")
    ap.add_argument("--split", choices=("train", "val", "test", "query", "gallery"), default="test",
                    help="a prepared dataset's split to embed (default: %(default)s, the classes never trained on)")
    ap.add_argument("--strict", action="store_true", help="an image that cannot be decoded is an error "
                                                          "(default: named, skipped and counted)")
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    for flag, value in (("--nproc", args.nproc), ("--chunk-size", args.chunk_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            ap.error(f"{flag}: expected >= 1, got {value}")
    if (args.nproc or 1) > 1 and not launched_by_torchrun():
        from pipeline.stages import _torchrun  # the training stages' launcher

        return _torchrun("embed", _without_nproc(argv), args.nproc)
    configure_logging()
    if (loaded := load_cli_params(args)) is None:
        return 2
    params, root = loaded
    from xbmcore.device import resolve_device, set_cpu_threads

    device = resolve_device(args.device)
    if device.type == "cpu" and not launched_by_torchrun():
        set_cpu_threads(params.eval.num_threads)  # a fixed count, as the evaluate stage: the same bytes with more cores
    if launched_by_torchrun():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc or 1))
        if per_node != (args.nproc or per_node):
            print(f"embed failed: --nproc is {args.nproc}, but torchrun started {per_node} processes per node: "
                  f"make them agree", file=sys.stderr)
            return 2
        init_process_group(device)
    d = Dist()
    if not d.is_main:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one rank speaks
    try:
        embedder = load_embedder(args.model, params, root, str(device))
        if args.index == "ivfpq":
            check_code_bytes(args.code_bytes, embedder.card.embedding_dim)
        if (args.images / "meta.json").is_file() and (args.images / "index.csv").is_file():
            src = prepared_source(embedder, args.images, params, args.split, args.batch_size, args.workers)
        else:
            src = files_source(embedder, args.images, args.batch_size, args.workers, args.strict,
                               None if d.is_main else False)
        writer = ChunkWriter(args.out, {"count": len(src.names), "chunk_rows": args.chunk_size, "dtype": args.dtype,
                                        "batch_size": args.batch_size, "model": embedder.card.digest,
                                        "items": items_digest(src.names, src.labels)})
        # Rank 0 checks the folder and lists the chunks left; each rank takes a contiguous part of that list.
        todo = d.broadcast(writer.start() if d.is_main else None)
        for c in todo[d.shard(len(todo))]:
            a, b = writer.bounds(c)
            emb, skipped_rows, skipped = src.embed(a, b)
            writer.write(c, emb, skipped_rows, skipped)
            log.info("chunk %d of %d written (images %d to %d)", c + 1, writer.n_chunks, a, b)
        _wait_for_every_rank(d)
        if not d.is_main:
            return 0
        meta = writer.finish(src.names, src.labels, src.classes, embedder.card, str(src.root), args.index,
                             args.code_bytes)
    except ValueError as err:
        print(f"embed failed: {err}", file=sys.stderr)
        return 1
    msg = (f"embedded {meta['count']} of {len(src.names)} images into {args.out} ({meta['dim']}-d, {args.dtype}, "
           f"{len(meta['shards'])} shards, {args.index} index)")
    if meta["skipped"]:
        msg += f"; {len(meta['skipped'])} skipped (cannot decode), listed in meta.json"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # train.portable: torch is loaded already, so this starts the process again with it
    sys.exit(main())
