"""python -m pipeline.pretrain [--params params.yaml] [-S key=value ...]: the pretrain stage: the model trained as
a normalised-softmax classifier on the dataset's pretrain split (classes no other split holds), the start that
`model.pretrained: artifacts/pretrain/model.pt` gives the warm-up.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_pretrain.
"""
import sys

if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # before torch loads
    from pipeline.stages import main

    sys.exit(main("pretrain"))
