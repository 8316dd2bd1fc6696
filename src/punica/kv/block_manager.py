"""Fixed-size KV blocks handed out to sequences. Pure Python: no torch, unit-tested on CPU."""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Owns block ids 0..num_blocks-1. A sequence's block table is a list it holds; this class only grows
    and frees such lists, so `num_free + num_used == num_blocks` always."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` must gain to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(table, num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` tokens; all or nothing."""
        need = self.extra_blocks(table, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        table.extend(self._free.pop() for _ in range(need))

    def free(self, table: list[int]) -> None:
        """Return every block of `table` and empty it."""
        self._free.extend(reversed(table))
        table.clear()
