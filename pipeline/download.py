"""DVC stage `download`: generate, fetch or parse the dataset named by data.name into data.prepared/<name>.

Usage: python -m pipeline.download [--params params.yaml] [-S data.name=cub ...]
       python -m pipeline.download -S data.name=folder -S data.root=/path/to/images

Paths in the params are relative to the params file's folder (the project root). A real dataset's images are
decoded once into the prepared folder's cache, which training and evaluation read. A dataset already prepared
with the same parameters (and unchanged images) is verified, not made again. Exit status: 0 done, 2 bad params, 1 any other error (the
message names the file, line or address at fault).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from pipeline.cli import add_params_arguments, load_cli_params
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.data.index import SPLITS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.download", description=__doc__.split("\n")[0])
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (loaded := load_cli_params(args)) is None:
        return 2
    params, root = loaded
    p = params.data
    t0 = time.perf_counter()
    try:
        out = prepare_dataset(p, root, progress=sys.stderr.isatty())
        splits = open_splits(out, p)
    except (ValueError, OSError) as err:  # OSError covers missing files and failed downloads
        print(f"download failed: {err}", file=sys.stderr)
        return 1
    print(f"{p.name}: prepared in {out} ({time.perf_counter() - t0:.1f} s)")
    if splits.meta.get("storage") == "cache":
        print(f"  cache    {splits.meta['num_images']:8d} images {splits.meta['cache_bytes'] / 1e9:7.2f} GB, "
              f"shorter side {splits.meta['cache_size']} px")
    for name in SPLITS:
        ds = getattr(splits, name)
        if ds is not None:
            print(f"  {name:8s} {len(ds):8d} images {ds.num_classes:7d} classes")
    # Attach the pipeline execution's MLflow run and event file, like every stage; the sizes become run tags.
    from pipeline.tracking import StageRun

    with StageRun(params, root, "download") as run:
        run.set_tags({f"data.{name}_images": len(ds) for name in SPLITS
                      if (ds := getattr(splits, name)) is not None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
