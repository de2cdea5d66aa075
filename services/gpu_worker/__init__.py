"""gpu_worker: the inference engine (model, paged KV cache, continuous batching, multi-LoRA) and its frontends."""
