"""A block allocator that only counts, for simulations of many thousand requests.

`CountingBlockManager` has the interface and the answers of `engine.block_manager.BlockManager`
with prefix caching off (what the batching policies call: can_allocate, allocate,
allocate_blocks, can_append, append, free, blocks_for, num_free_blocks), but costs O(1) per
call instead of O(blocks): a table is a list of placeholder ids whose length is what matters.
The policies cannot tell the difference (a test drives both with the same calls); the engine's
own BlockManager stays available to the simulator (`exact_blocks=True`), which prefix caching
needs.
"""
from __future__ import annotations

from engine.block_manager import BlockError

_PLACEHOLDER = -1


class CountingBlockManager:
    """Free-block counter with BlockManager's interface (no prefix caching, no block identity)."""

    enable_prefix_caching = False
    num_prefix_hit_tokens = 0

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._num_free = num_blocks
        self.num_prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, token_ids: list[int], reserve_blocks: int = 0) -> bool:
        return -(-len(token_ids) // self.block_size) + reserve_blocks <= self._num_free

    def allocate(self, token_ids: list[int]) -> tuple[list[int], int]:
        n = -(-len(token_ids) // self.block_size)
        if n > self._num_free:
            raise BlockError(f"not enough free blocks for {len(token_ids)} tokens")
        self._num_free -= n
        self.num_prefix_query_tokens += len(token_ids)
        return [_PLACEHOLDER] * n, 0

    def commit(self, table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Nothing to share: this twin does no prefix caching."""

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        if num_blocks > self._num_free:
            raise BlockError(f"asked for {num_blocks} blocks, {self._num_free} free")
        self._num_free -= num_blocks
        return [_PLACEHOLDER] * num_blocks

    def take_blocks(self, num_blocks: int) -> None:
        """Take blocks without a table: the simulator's lazy decode batch takes a run's blocks
        in bulk and adds the placeholders to the tables later (same count either way)."""
        if num_blocks > self._num_free:
            raise BlockError(f"asked for {num_blocks} blocks, {self._num_free} free")
        self._num_free -= num_blocks

    def can_append(self, table: list[int], num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) <= len(table) or self._num_free > 0

    def append(self, table: list[int], num_tokens: int) -> None:
        need = -(-num_tokens // self.block_size) - len(table)
        if need > 0:
            if need > self._num_free:
                raise BlockError("no free KV blocks")
            self._num_free -= need
            table.extend([_PLACEHOLDER] * need)

    def free(self, table: list[int]) -> None:
        self._num_free += len(table)
        if self._num_free > self.num_blocks:
            raise BlockError(f"freed more blocks than the {self.num_blocks} that exist")
        table.clear()
