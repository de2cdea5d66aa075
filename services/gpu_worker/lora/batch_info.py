"""`LoRABatchInfo`: which contiguous token ranges of the flat batch use which resident adapter slot."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoRABatchInfo:
    # (slot, start, end): tokens [start, end) of the flat batch use the adapter in `slot`; one range per adapter,
    # base-only tokens appear in none. Ranges never overlap.
    segments: list[tuple[int, int, int]]
    # the LoRA backend's per-step kernel metadata, built once per step by its `prepare` (None for torch)
    kernel_meta: Any = None
