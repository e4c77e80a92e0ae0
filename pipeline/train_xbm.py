"""python -m pipeline.train_xbm [--params params.yaml] [-S key=value ...]: the XBM phase, or with
memory.enabled: false the same schedule without memory (the baseline).

A DVC stage (dvc.yaml); the work is pipeline.stages.run_train_xbm.
With train.nproc > 1 it starts itself again under torchrun, one process per rank (docs/distributed.md).
"""
import sys

if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # before torch loads
    from pipeline.stages import main

    sys.exit(main("train_xbm"))
