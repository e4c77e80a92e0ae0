"""The logged image embedder's model-from-code file: MLflow runs it to build the model, so loading the model
unpickles no code (pipeline/pyfunc_model.py logs it, with that module and xbmcore as its code paths)."""
import mlflow

from pipeline.pyfunc_model import ImageEmbedder

mlflow.models.set_model(ImageEmbedder())
