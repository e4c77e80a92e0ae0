"""python -m pipeline.memory_init [--params params.yaml] [-S key=value ...]: fill the memory with the warmed-up
model's embeddings of a random memory.ratio of the train set.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_memory_init.
With train.nproc > 1 it starts itself again under torchrun, one process per rank (docs/distributed.md).
"""
import sys

if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # before torch loads
    from pipeline.stages import main

    sys.exit(main("memory_init"))
