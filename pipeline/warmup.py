"""python -m pipeline.warmup [--params params.yaml] [-S key=value ...]: the warm-up phase: training without memory,
from scratch or from its last checkpoint.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_warmup.
"""
import sys

from pipeline.stages import main

if __name__ == "__main__":
    sys.exit(main("warmup"))
