"""python -m pipeline.evaluate [--params params.yaml] [-S key=value ...]: Recall@K, MAP@R, R-precision and NMI
of the trained model on the test split; draws the retrieval figure (plots/retrieval.png: fixed test queries and
their top 5), logs it and the model to MLflow and closes the run.

A DVC stage (dvc.yaml); the work is pipeline.stages.run_evaluate.
"""
import sys

if __name__ == "__main__":
    from pipeline.cli import enter_portable

    enter_portable()  # before torch loads
    from pipeline.stages import main

    sys.exit(main("evaluate"))
