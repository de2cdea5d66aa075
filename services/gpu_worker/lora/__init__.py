"""Multi-LoRA: per-step adapter metadata, the resident-slot weight layout and the compute backends."""
