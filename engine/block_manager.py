"""Paged KV block allocator with reference counts and prefix sharing.

A block holds `block_size` consecutive tokens of one sequence. A full block of a prompt gets a
hash chained over every token before it, so two prompts with an equal prefix map their leading
blocks to the same physical blocks (ref_count > 1). A freed block keeps its hash and content
until it is handed out again, so a later request can still hit it (least recently freed first).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.errors import DisaggError


class BlockError(DisaggError):
    """Misuse of the block manager (double free, unknown block)."""


def chain_hash(prev_hash: int, token_ids) -> int:
    # Python's hash of a tuple of ints is not salted per process, so hashes agree across actors.
    return hash((prev_hash, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0

    # Queries ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, token_ids: list[int]) -> list[int]:
        """Block ids of leading full blocks already cached. The block holding the last token is
        never matched, so at least one token is computed and produces logits."""
        if not self.enable_prefix_caching:
            return []
        hits, h = [], 0
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            chunk = token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(h, chunk)
            bid = self._by_hash.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(chunk):
                break
            hits.append(bid)
        return hits

    def can_allocate(self, token_ids: list[int], reserve_blocks: int = 0) -> bool:
        hits = self._prefix_hits(token_ids)
        hits_in_free = sum(1 for b in hits if b in self._free)
        need = self.blocks_for(len(token_ids)) - len(hits) + hits_in_free
        return need + reserve_blocks <= len(self._free)

    # Allocation -------------------------------------------------------------------------
    def _take_free(self) -> int:
        if not self._free:
            raise BlockError("no free KV blocks")
        bid, _ = self._free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None and self._by_hash.get(blk.hash) == bid:
            del self._by_hash[blk.hash]
        blk.hash, blk.token_ids, blk.ref_count = None, (), 1
        return bid

    def _ref(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_count == 0:
            del self._free[bid]
        blk.ref_count += 1

    def allocate(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Blocks for a prompt (or prompt + tokens so far). Returns (block_ids, num_cached_tokens)."""
        if not self.can_allocate(token_ids):
            raise BlockError(f"not enough free blocks for {len(token_ids)} tokens")
        hits = self._prefix_hits(token_ids)
        for bid in hits:
            self._ref(bid)
        table = list(hits)
        table += [self._take_free() for _ in range(self.blocks_for(len(token_ids)) - len(hits))]
        num_cached = len(hits) * self.block_size
        self.num_prefix_hit_tokens += num_cached
        self.num_prefix_query_tokens += len(token_ids)
        return table, num_cached

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Plain blocks with no prefix matching (decode-side reservations for incoming KV)."""
        if num_blocks > len(self._free):
            raise BlockError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        return [self._take_free() for _ in range(num_blocks)]

    def commit(self, table: list[int], token_ids: list[int], num_computed: int) -> None:
        """The KV of the first `num_computed` tokens is now in the cache: their full blocks may
        serve later prompts. Only computed blocks are shared: a block allocated to a request that
        is cancelled before its prefill holds nothing and must never be a hit."""
        if self.enable_prefix_caching:
            self._register_full_blocks(table, token_ids[:num_computed], start_block=0)

    def _register_full_blocks(self, table: list[int], token_ids: list[int], start_block: int) -> None:
        bs = self.block_size
        h = 0
        for i in range(len(token_ids) // bs):
            chunk = token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(h, chunk)
            if i < start_block:
                continue
            blk = self.blocks[table[i]]
            if blk.hash is None and h not in self._by_hash:
                blk.hash, blk.token_ids = h, tuple(chunk)
                self._by_hash[h] = blk.block_id

    def can_append(self, table: list[int], num_tokens: int) -> bool:
        """True if a table that must hold `num_tokens` tokens needs no block or one is free."""
        return self.blocks_for(num_tokens) <= len(table) or len(self._free) > 0

    def append(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` in place so it holds `num_tokens` tokens."""
        while self.blocks_for(num_tokens) > len(table):
            table.append(self._take_free())

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block; blocks at zero go back to the free list (the last
        block of a sequence first, so shared prefix blocks stay cached longest)."""
        for bid in table:
            if not 0 <= bid < self.num_blocks:
                raise BlockError(f"unknown block id {bid}")
            if self.blocks[bid].ref_count <= 0:
                raise BlockError(f"block {bid} freed twice")
        for bid in reversed(table):
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[bid] = None
        table.clear()

    def fork(self, table: list[int], num_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
        """A child sequence sharing the parent's KV. Full blocks are shared by reference; a partly
        filled last block is copied (returned as (src, dst) pairs for the cache to copy)."""
        full = num_tokens // self.block_size
        if self.blocks_for(num_tokens) > len(table):
            raise BlockError(f"table of {len(table)} blocks cannot hold {num_tokens} tokens")
        child, copies = [], []
        for i, bid in enumerate(table[:self.blocks_for(num_tokens)]):
            if i < full:
                self._ref(bid)
                child.append(bid)
            else:
                dst = self._take_free()
                copies.append((bid, dst))
                child.append(dst)
        return child, copies

    def check_invariants(self, live_tables: list[list[int]]) -> None:
        """Ref counts equal the number of live tables holding each block; free list is exact."""
        counts = [0] * self.num_blocks
        for t in live_tables:
            for bid in t:
                counts[bid] += 1
        for blk in self.blocks:
            if blk.ref_count != counts[blk.block_id]:
                raise BlockError(f"block {blk.block_id}: ref_count {blk.ref_count}, held {counts[blk.block_id]}")
            if (blk.ref_count == 0) != (blk.block_id in self._free):
                raise BlockError(f"block {blk.block_id}: free-list membership wrong")
        for h, bid in self._by_hash.items():
            if self.blocks[bid].hash != h:
                raise BlockError(f"hash index points at block {bid} with another hash")
