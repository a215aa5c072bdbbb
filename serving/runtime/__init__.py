"""The model runtime under every protocol: the model cache, micro-batching, the shared
encoder, the predict lookups memo and inference-only model rewrites."""
