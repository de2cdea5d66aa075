"""KV cache block allocation: fixed-size blocks handed to sequences on demand and freed on finish/abort/preempt."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Bookkeeping only (CPU): which of the `num_blocks` cache blocks are free. Block ids index the KV tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add so that a sequence holding `block_table` can store `num_tokens` tokens."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` until it holds `num_tokens` tokens; call can_grow first."""
        extra = self.blocks_needed(block_table, num_tokens)
        if extra > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {extra} blocks, {len(self._free)} free")
        block_table.extend(self._free.popleft() for _ in range(extra))

    def free(self, block_table: list[int]) -> None:
        self._free.extend(block_table)
        block_table.clear()
