"""CPU-assisted prefill: worker processes computing LoRA deltas from shared memory, and the node host adapter cache."""
