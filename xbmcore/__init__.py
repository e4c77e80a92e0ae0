"""xbmcore: Cross-Batch Memory training of retrieval embeddings (memory, losses, sampler, models, data,
evaluation, trainer). faiss is loaded through xbmcore.blas.load_faiss, which picks its BLAS core first."""
