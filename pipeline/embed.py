"""python -m pipeline.embed --model MODEL --images FOLDER|CSV --out DIR [--dtype float16] [--index ivf]

Embeds an image collection with a trained model and writes, atomically, the embeddings, the image paths, the
labels when the layout has them (class folders, or a CSV `label` column), a faiss index and the model's
identity (xbmcore/embedding_store.py), for `python -m pipeline.search`.

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
import sys
from pathlib import Path

import torch

from pipeline.cli import add_params_arguments, load_cli_params
from pipeline.tracking import configure_logging
from xbmcore.collection import read_collection
from xbmcore.embedding_store import Embedder, EmbeddingStore

log = logging.getLogger(__name__)
URI_SCHEMES = ("models:/", "runs:/")
INDEX_CHOICES = {"exact": "exact", "ivf": "hnsw"}  # --index ivf: the approximate index, chosen by bench.search


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
    state = {**state, "test_resize": params.data.test_resize, "test_size": params.data.test_size}
    return Embedder.from_state(state, source=str(path.resolve()), device=device)


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


def embed_prepared(embedder: Embedder, folder: Path, params, split: str, batch_size: int, workers: int):
    """(embeddings, names, class ids, root) of one split of a prepared dataset, in index order."""
    from xbmcore.data import open_splits
    from xbmcore.data.index import ARRAY_FILE, read_index, read_meta
    from xbmcore.evaluate import compute_embeddings

    meta = read_meta(folder)
    card = embedder.card
    p = params.data.model_copy(update={"name": meta["dataset"], "test_resize": card.test_resize,
                                       "test_size": card.test_size})
    ds = getattr(open_splits(folder, p), split, None)
    if ds is None:
        raise ValueError(f"--split {split}: {folder} has no such split")
    index = read_index(folder, meta["storage"] == "array")
    items = index.items[index.splits == split]
    if len(items) != len(ds):
        raise ValueError(f"{folder}: the {split} split has {len(ds)} images but the index lists {len(items)}")
    emb, _ = compute_embeddings(embedder.model, ds, batch_size, embedder.device, workers)
    if meta["storage"] == "array":  # rows of the image array
        return emb, [f"{ARRAY_FILE}:{int(i)}" for i in items], ds.class_ids, folder.resolve()
    return emb, [str(i) for i in items], ds.class_ids, (folder / meta["image_root"]).resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model.pt, models:/<model_id> or runs:/<run_id>/model")
    ap.add_argument("--images", required=True, type=Path, help="<root>/<class>/<image>, <root>/<image> or a CSV "
                                                              "with the header path,label")
    ap.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically, file by file)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="stored embeddings: float16 halves the size; similarities change by ~1e-3")
    ap.add_argument("--index", choices=tuple(INDEX_CHOICES), default="exact",
                    help="exact: inner product over all items (exact, fine to ~1M items on a GPU or a few 100k "
                         "on a CPU); ivf: an HNSW graph (approximate: recall@10 >= 0.95 at >= 10x the exact "
                         "queries/s on 1M x 128, see bench.search) for larger collections")
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
    configure_logging()
    if (loaded := load_cli_params(args)) is None:
        return 2
    params, root = loaded
    try:
        from xbmcore.trainer import resolve_device

        device = str(resolve_device(args.device))
        embedder = load_embedder(args.model, params, root, device)
        if (args.images / "meta.json").is_file() and (args.images / "index.csv").is_file():
            emb, names, labels, folder = embed_prepared(embedder, args.images, params, args.split, args.batch_size,
                                                        args.workers)
            total, classes, skipped = len(names), None, []
        else:
            coll = read_collection(args.images)
            emb, kept, skipped = embedder.embed_files(coll.paths, batch_size=args.batch_size,
                                                      num_workers=args.workers, strict=args.strict, names=coll.names)
            names, labels = [coll.names[i] for i in kept], None if coll.labels is None else coll.labels[kept]
            total, classes, folder = len(coll), coll.classes, coll.root.resolve()
    except ValueError as err:
        print(f"embed failed: {err}", file=sys.stderr)
        return 1
    store = EmbeddingStore(emb.astype(args.dtype), names, labels, classes, embedder.card, root=str(folder),
                           index_kind=INDEX_CHOICES[args.index], skipped=[list(s) for s in skipped])
    store.save(args.out)
    msg = f"embedded {len(store)} of {total} images into {args.out} ({emb.shape[1]}-d, {args.dtype}, " \
          f"{args.index} index)"
    if skipped:
        msg += f"; {len(skipped)} skipped (cannot decode), listed in meta.json"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
