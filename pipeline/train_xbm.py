"""python -m pipeline.train_xbm [--params params.yaml] [-S key=value ...]: the XBM phase, or with
memory.enabled: false the same schedule without memory (the baseline).

A DVC stage (dvc.yaml); the work is pipeline.stages.run_train_xbm.
With train.nproc > 1 it starts itself again under torchrun, one process per rank (docs/distributed.md).
"""
import sys

from pipeline.stages import main

if __name__ == "__main__":
    sys.exit(main("train_xbm"))
