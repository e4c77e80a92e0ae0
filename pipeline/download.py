"""DVC stage `download`: generate, fetch or parse the dataset named by data.name into data.prepared/<name>.

Usage: python -m pipeline.download [--params params.yaml]

Paths in the params are relative to the working directory (the project root when DVC runs the stage). A dataset
already prepared with the same parameters is verified, not made again.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from xbmcore.config import load_params
from xbmcore.data import open_splits, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.download", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params(args.params).data
    t0 = time.perf_counter()
    out = prepare_dataset(p, Path.cwd(), progress=sys.stderr.isatty())
    splits = open_splits(out, p)
    print(f"{p.name}: prepared in {out} ({time.perf_counter() - t0:.1f} s)")
    for name in ("train", "val", "test", "query", "gallery"):
        ds = getattr(splits, name)
        if ds is not None:
            print(f"  {name:8s} {len(ds):8d} images {ds.num_classes:7d} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
