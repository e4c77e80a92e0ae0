"""python -m pipeline.warmup [--params params.yaml] [-S key=value ...]: the warm-up phase: training without memory,
from scratch or from its last checkpoint.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_warmup.
With train.nproc > 1 it starts itself again under torchrun, one process per rank (docs/distributed.md).
"""
import sys

from pipeline.stages import main

if __name__ == "__main__":
    sys.exit(main("warmup"))
