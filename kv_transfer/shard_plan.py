"""Which rank owns which part of the KV cache, and what moves between two layouts.

A rank of an instance with tensor parallelism `tp` and pipeline parallelism `pp` owns a
rectangle: a layer range (its pipeline stage) times a KV-head range (its tensor-parallel
shard). Rank numbering: rank = stage * tp + tp_rank. The transfer plan between a prefill
layout and a decode layout is the set of rectangle intersections, so any TP/PP on one side
feeds any TP/PP on the other with one rule.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    num_layers: int
    num_kv_heads: int

    def __post_init__(self):
        if self.num_kv_heads % self.tp:
            raise ValueError(f"tp={self.tp} must divide num_kv_heads={self.num_kv_heads}")
        if self.pp > self.num_layers:
            raise ValueError(f"pp={self.pp} exceeds num_layers={self.num_layers}")

    @property
    def num_ranks(self) -> int:
        return self.tp * self.pp

    def layer_range(self, stage: int) -> tuple[int, int]:
        """Layers of a pipeline stage: as even as possible, earlier stages take the remainder."""
        base, extra = divmod(self.num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return start, start + base + (1 if stage < extra else 0)

    def head_range(self, tp_rank: int) -> tuple[int, int]:
        n = self.num_kv_heads // self.tp
        return tp_rank * n, (tp_rank + 1) * n

    def rect(self, rank: int) -> "Rect":
        stage, tp_rank = divmod(rank, self.tp)
        return Rect(self.layer_range(stage), self.head_range(tp_rank))


@dataclass(frozen=True)
class Rect:
    layers: tuple[int, int]
    heads: tuple[int, int]

    def intersect(self, other: "Rect") -> "Rect | None":
        l0, l1 = max(self.layers[0], other.layers[0]), min(self.layers[1], other.layers[1])
        h0, h1 = max(self.heads[0], other.heads[0]), min(self.heads[1], other.heads[1])
        if l0 >= l1 or h0 >= h1:
            return None
        return Rect((l0, l1), (h0, h1))

    def local(self, owner: "Rect") -> "Rect":
        """This rectangle in the coordinates of the owner's local cache."""
        return Rect((self.layers[0] - owner.layers[0], self.layers[1] - owner.layers[0]),
                    (self.heads[0] - owner.heads[0], self.heads[1] - owner.heads[0]))

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]


@dataclass(frozen=True)
class Piece:
    """One rectangle that src_rank of the prefill instance sends to dst_rank of the decode
    instance, in global coordinates."""
    src_rank: int
    dst_rank: int
    rect: Rect


def transfer_plan(src: Layout, dst: Layout) -> list[Piece]:
    if (src.num_layers, src.num_kv_heads) != (dst.num_layers, dst.num_kv_heads):
        raise ValueError("prefill and decode layouts describe different models")
    pieces = []
    for s in range(src.num_ranks):
        for d in range(dst.num_ranks):
            r = src.rect(s).intersect(dst.rect(d))
            if r is not None:
                pieces.append(Piece(s, d, r))
    return pieces


def split_layers(rect: Rect, num_groups: int) -> list[Rect]:
    """Split a rectangle into up to `num_groups` layer groups (layer-wise transfer)."""
    n = rect.num_layers
    g = max(1, min(num_groups, n))
    base, extra = divmod(n, g)
    out, start = [], rect.layers[0]
    for i in range(g):
        end = start + base + (1 if i < extra else 0)
        out.append(Rect((start, end), rect.heads))
        start = end
    return out
