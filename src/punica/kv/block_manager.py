"""Fixed-size KV blocks handed out to sequences, and the prefix cache over them. Pure Python: no torch,
unit-tested on CPU."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def block_keys(namespace: Hashable, token_ids: Sequence[int], block_size: int,
               keys: list[tuple] | None = None, num_blocks: int | None = None) -> list[tuple]:
    """The prefix-cache key of each full block of `token_ids` (of the first `num_blocks`): (the hash of the key
    before it, `namespace`, the block's tokens). A block's KV depends on every token before it, and on the
    adapter that computed it (its namespace), so equal keys mean equal KV; the dict that maps keys to blocks
    compares tokens, so a hash collision of the chain could only pair blocks whose own tokens are also equal.
    `keys`: those of the first blocks, extended in place (and returned)."""
    keys = [] if keys is None else keys
    parent = hash(keys[-1]) if keys else None
    full = len(token_ids) // block_size if num_blocks is None else min(len(token_ids) // block_size, num_blocks)
    for start in range(len(keys) * block_size, full * block_size, block_size):
        key = (parent, namespace, tuple(token_ids[start:start + block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


class BlockManager:
    """Owns block ids 0..num_blocks-1. A sequence's block table is a list it holds; this class grows and
    frees such lists, so `num_free + num_used == num_blocks` always.

    With `caching`, full blocks are registered under their `block_keys` once computed, and a sequence whose
    tokens start with registered blocks shares them (`take_cached`) instead of computing them again. Blocks
    count references; a cached block nobody references stays cached (and counts as free) until a block is
    needed and none is free without a cache entry: then the least recently used one is evicted."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._block_of: dict[tuple, int] = {}  # cache key -> block
        self._key_of: dict[int, tuple] = {}  # block -> cache key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: least recently used first
        self.queried_tokens = 0  # prompt tokens looked up in the cache, and found (Prometheus counters)
        self.hit_tokens = 0
        self.evicted_blocks = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` must gain to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` tokens; all or nothing."""
        need = self.extra_blocks(table, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"need {need} KV blocks, {self.num_free} free")
        for _ in range(need):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)

    def free(self, table: list[int]) -> None:
        """Drop `table`'s reference to each of its blocks and empty it; cached blocks stay cached."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None  # the most recently used at the end
            else:
                self._free.append(block)
        table.clear()

    def cached_prefix(self, keys: list[tuple]) -> tuple[int, int]:
        """(how many of `keys`, from the first, are cached; how many of those blocks nobody references):
        what `take_cached` would share, and how many free blocks sharing them uses up."""
        hits = idle = 0
        for key in keys if self.caching else ():
            block = self._block_of.get(key)
            if block is None:
                break
            hits += 1
            idle += block in self._evictable
        return hits, idle

    def take_cached(self, table: list[int], keys: list[tuple], hits: int) -> int:
        """Append the cached blocks of keys[:hits] (`cached_prefix`'s count, nothing changed since) to the empty
        `table`, referenced; returns how many tokens they hold. All of `keys` count as looked up."""
        assert not table, "a cached prefix starts a block table"
        for key in keys[:hits]:
            block = self._block_of[key]
            self._evictable.pop(block, None)
            self._refs[block] += 1
            table.append(block)
        self.queried_tokens += len(keys) * self.block_size
        self.hit_tokens += hits * self.block_size
        return hits * self.block_size

    def register(self, table: list[int], keys: list[tuple], first: int = 0) -> None:
        """Cache blocks first.. of `table` under keys first.. (their KV is computed, or will be before any
        later step reads it); keys already cached under another block keep that one."""
        if not self.caching:
            return
        for key, block in zip(keys[first:], table[first:len(keys)]):
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.evicted_blocks += 1
        return block
