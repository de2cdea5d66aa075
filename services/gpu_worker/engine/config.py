"""The engine's configuration: one dataclass, checked in `__post_init__`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1): on the CPU, slowly, for tests."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line."""


@dataclass
class EngineConfig:
    model: str | None = None  # local HF directory or .gguf file; None = the embedded default (SmolLM2-135M-Instruct)
    served_model_name: str | None = None  # the base model's name in requests; default derived from the model path
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_dir: str | None = None  # where converted models are cached (default ~/.cache/caraserve)
    max_lora_rank: int = 256  # adapters of higher rank are refused at load
    max_loras: int = 8  # resident adapter slots (LRU; an adapter in use is never evicted)
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget of one step: prefill chunks and decodes share it
    block_size: int = 16  # tokens per KV cache block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # KV cache budget when num_kv_blocks is None
    max_model_len: int | None = None  # context limit; None = the model's max_position_embeddings (capped by KV)
    # auto | torch | triton: multi-LoRA kernels (auto: triton on CUDA when triton imports, else the torch reference;
    # triton on the CPU only under TRITON_INTERPRET=1, the Triton interpreter: slow, for tests)
    lora_backend: str = "auto"
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    # auto | torch | triton: attention over the paged KV cache (auto: triton on CUDA, else the torch SDPA path;
    # triton on the CPU only under TRITON_INTERPRET=1, the Triton interpreter: slow, for tests)
    attention_backend: str = "auto"
    # off | auto | always: CPU-assisted prefill (services/cpu_prefill). auto (the paper's mechanism, on a GPU): a cold
    # adapter loads to its device slot by layer groups while its prefill runs at once, the LoRA deltas of the layers
    # not yet landed computed by the workers (no GPU: as off). always: every prefill LoRA delta of an adapter is
    # computed by cpu_prefill worker processes from the host adapter cache (shared memory, `host_cache_gb`):
    # `cpu_workers` spawned by the engine, plus `caraserve serve cpu_prefill` processes joining through
    # <data_dir>/run/cpu_prefill/ (0: only those; until one joins, prefills take the device path)
    cpu_assist: str = "auto"
    # auto | off: replay decode-only steps as CUDA graphs (decode_graphs.py). auto: on CUDA with both backends triton;
    # off: every step launched op by op
    cuda_graphs: str = "auto"
    cpu_workers: int = 2
    host_cache_gb: float = 4.0
    # cpu_assist auto: layers per group of a cold adapter's pipelined load (an event per group; a layer's device
    # kernels are used once its group has landed). 1: every layer as soon as it lands, which is never later than a
    # coarser grouping (the copies run in the same order); the paper's artifact used 8 (32 layers in 4 groups)
    load_group_layers: int = 1
    # cpu_assist auto: who enqueues a pipelined load's copies. thread: a thread of the load's own, while the engine's
    # thread launches the step (the host work of a 7B adapter's copies is milliseconds); inline: the engine's thread,
    # all of them when the load starts, before the step's forward pass (bench/cold_start.py measures both)
    load_enqueue: str = "thread"

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ConfigError(f"max_lora_rank must be between 1 and 1024, got {self.max_lora_rank}")
        for name in ("max_loras", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads (--threads) must be >= 1, got {self.num_threads}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.cpu_assist not in ("off", "auto", "always"):
            raise ConfigError(f"cpu_assist must be off, auto or always, got {self.cpu_assist!r}")
        if self.cuda_graphs not in ("auto", "off"):
            raise ConfigError(f"cuda_graphs must be auto or off, got {self.cuda_graphs!r}")
        if self.cpu_workers < 0:
            raise ConfigError(f"cpu_workers must be >= 0, got {self.cpu_workers}")
        if self.host_cache_gb <= 0:
            raise ConfigError(f"host_cache_gb must be > 0, got {self.host_cache_gb}")
        if self.load_group_layers < 1:
            raise ConfigError(f"load_group_layers must be >= 1, got {self.load_group_layers}")
        if self.load_enqueue not in ("thread", "inline"):
            raise ConfigError(f"load_enqueue must be thread or inline, got {self.load_enqueue!r}")
        for name in ("attention_backend", "lora_backend"):
            value = getattr(self, name)
            if value not in ("auto", "torch", "triton"):
                raise ConfigError(f"{name} must be auto, torch or triton, got {value!r}")
            if value == "triton" and self.torch_device().type != "cuda" and not triton_interpreting():
                raise ConfigError(f"{name} 'triton' needs a CUDA device (or TRITON_INTERPRET=1: the interpreter)")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but CUDA is not available")
        return device

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def resolved_lora_backend(self) -> str:
        """'torch' or 'triton': the multi-LoRA backend the engine runs ('auto' resolved on the device)."""
        if self.lora_backend == "auto":
            if self.torch_device().type != "cuda":
                return "torch"
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch"
            return "triton"
        return self.lora_backend

    def resolved_cuda_graphs(self) -> bool:
        """Whether decode-only steps replay as CUDA graphs ('auto' resolved)."""
        return (self.cuda_graphs == "auto" and self.torch_device().type == "cuda"
                and self.resolved_lora_backend() == "triton" and self.resolved_attention_backend() == "triton")

    def resolved_attention_backend(self) -> str:
        """'torch' or 'triton': the attention backend the engine runs ('auto' resolved on the device)."""
        if self.attention_backend == "auto":
            return "triton" if self.torch_device().type == "cuda" else "torch"
        return self.attention_backend
