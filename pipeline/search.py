"""python -m pipeline.search --index DIR --query IMAGE|FOLDER [-k 10] [--json]
   python -m pipeline.search --index DIR --dedup [--threshold 0.92] [--out duplicates.csv]

Search a collection embedded by `python -m pipeline.embed`: each query image is embedded with the model that
built the index (recorded in it; `--model` names another copy of it, which must have the same weights, input size
and embedding dimension) and its k most similar images are listed with their cosine similarities, as a table or
JSON. `--dedup` writes the groups of near-duplicates: connected components of the pairs whose similarity is above
the threshold, one CSV row per image with its group and the group's size. Both read the index kind and its
parameters from the collection's manifest (pipeline/store.py): exact search streams the memory-mapped shards; an
ivfpq index takes the top --rerank candidates by code and re-ranks them exactly from the shards, for search and
dedup alike.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from pipeline.cli import add_params_arguments, load_cli_params
from pipeline.embed import load_embedder
from pipeline.store import EmbeddingStore
from pipeline.tracking import configure_logging
from pipeline.collection import read_collection
from xbmcore.atomic import atomic_path


def search(store: EmbeddingStore, embedder, query: Path, k: int, ef_search: int | None = None,
           strict: bool = False, nprobe: int | None = None, rerank: int | None = None) -> list[dict]:
    """[{query, results: [{rank, path, similarity, label, class}]}] for every decodable query image."""
    store.model.check_compatible(embedder.card, "the index")
    coll = read_collection(query)
    emb, kept, skipped = embedder.embed_files(coll.paths, strict=strict, names=[str(p) for p in coll.paths],
                                              progress=False)
    sims, ids = store.search(emb, k, embedder.device if store.index_kind == "exact" else "cpu", ef_search, nprobe,
                             rerank)
    root = Path(store.root)
    out = []
    for qi, row_sims, row_ids in zip(kept, sims, ids):
        results = []
        for rank, (s, i) in enumerate(zip(row_sims, row_ids), start=1):
            if i < 0:  # an approximate index may find fewer than k
                break
            label = None if store.labels is None else int(store.labels[i])
            results.append({"rank": rank, "path": str(root / store.names[i]), "similarity": round(float(s), 6),
                            "label": label, "class": None if label is None or not store.classes
                            else store.classes[label]})
        out.append({"query": str(coll.paths[qi]), "results": results})
    for name, msg in skipped:
        out.append({"query": name, "error": f"cannot decode the image ({msg})"})
    return out


def format_table(found: list[dict]) -> str:
    lines = []
    for q in found:
        lines.append(f"query: {q['query']}")
        if "error" in q:
            lines.append(f"  {q['error']}")
        for r in q.get("results", []):
            cls = f"  [{r['class']}]" if r["class"] is not None else ""
            lines.append(f"  {r['rank']:>3}  {r['similarity']:.4f}  {r['path']}{cls}")
    return "\n".join(lines)


def write_duplicates(store: EmbeddingStore, threshold: float, out: Path, rerank: int | None = None
                     ) -> tuple[int, int]:
    """CSV group,count,path,class (largest group first); returns (groups, images in them)."""
    groups = store.duplicate_groups(threshold, rerank)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "count", "path", "class"])
    root = Path(store.root)
    for g, rows in enumerate(groups):
        for i in rows:
            cls = "" if store.labels is None or not store.classes else store.classes[int(store.labels[i])]
            w.writerow([g, len(rows), str(root / store.names[i]), cls])
    with atomic_path(out) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return len(groups), sum(len(g) for g in groups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, type=Path, help="a folder written by python -m pipeline.embed")
    ap.add_argument("--query", type=Path, help="an image, a folder of images or a CSV")
    ap.add_argument("-k", type=int, default=10, help="neighbours per query (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="JSON instead of a table")
    ap.add_argument("--model", help="the model to embed the queries with (default: the one recorded in the index)")
    ap.add_argument("--ef-search", type=int, default=None,
                    help="hnsw index: candidates explored per query (default: the manifest's, 32: 97.7%% of the "
                         "exact top 10 in bench.search at 2M items; more is slower and finds more of them)")
    ap.add_argument("--nprobe", type=int, default=None,
                    help="ivfpq index: inverted lists searched per query (default: the manifest's; more is slower "
                         "and finds more of the true neighbours among the candidates)")
    ap.add_argument("--rerank", type=int, default=None,
                    help="ivfpq index: candidates per query re-ranked by their exact similarity from the stored "
                         "vectors; with --dedup (hnsw, ivfpq): the neighbours of each image looked at for its "
                         "duplicates (default: the manifest's, 100)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--strict", action="store_true", help="a query image that cannot be decoded is an error")
    ap.add_argument("--dedup", action="store_true", help="write the groups of near-duplicates instead")
    ap.add_argument("--threshold", type=float, default=0.92,
                    help="--dedup: cosine similarity above which two images count as duplicates. A starting "
                         "point: raise it to keep only near-identical copies, lower it to group look-alikes; "
                         "inspect a sample of the groups for your model (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="--dedup: the CSV (default: <index>/duplicates.csv)")
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    configure_logging()
    if args.dedup == (args.query is not None):
        ap.error("give either --query or --dedup")
    for flag, value in (("-k", args.k), ("--ef-search", args.ef_search), ("--nprobe", args.nprobe),
                        ("--rerank", args.rerank)):
        if value is not None and value < 1:
            ap.error(f"{flag}: expected >= 1, got {value}")
    try:
        store = EmbeddingStore.load(args.index)
        if args.dedup:
            out = args.out or args.index / "duplicates.csv"
            n_groups, n_images = write_duplicates(store, args.threshold, out, args.rerank)
            print(f"{n_groups} groups of near-duplicates (similarity > {args.threshold}), {n_images} of "
                  f"{len(store)} images, in {out}", file=sys.stderr)
            return 0
        params = root = None
        if Path(args.params).is_file():  # a model.pt's input size, the MLflow store
            if (loaded := load_cli_params(args)) is None:
                return 2
            params, root = loaded
        from xbmcore.device import resolve_device

        embedder = load_embedder(args.model or store.model.source, params, root, str(resolve_device(args.device)))
        found = search(store, embedder, args.query, args.k, args.ef_search, args.strict, args.nprobe, args.rerank)
    except ValueError as err:
        print(f"search failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=1) if args.json else format_table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
