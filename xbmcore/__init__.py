"""xbmcore: Cross-Batch Memory training of retrieval embeddings (memory, losses, sampler, models, data,
evaluation, trainer). Importing it first sets faiss's BLAS core from the CPU's features (xbmcore/blas.py)."""
from xbmcore.blas import select_openblas_core

select_openblas_core()
