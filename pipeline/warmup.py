"""python -m pipeline.warmup [--params params.yaml] [-S key=value ...]: the warm-up phase: training without memory,
from scratch or from its last checkpoint.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_warmup.
With train.nproc > 1 it starts itself again under torchrun, one process per rank (docs/distributed.md).
"""
import sys

if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # before torch loads
    from pipeline.stages import main

    sys.exit(main("warmup"))
