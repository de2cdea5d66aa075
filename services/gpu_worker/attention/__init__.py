"""Attention over the engine's paged KV cache: Triton kernels (the GPU path) and their torch reference twins.

`triton_paged_attention` imports triton; import it only when the triton attention backend is chosen (on CUDA, or
on the CPU under TRITON_INTERPRET=1, which must be set before triton is first imported).
"""
