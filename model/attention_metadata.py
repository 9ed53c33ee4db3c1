"""What one forward pass needs to know about the batch's sequences and their KV blocks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """kind="prefill": tokens of several sequences packed end to end (cu_seqlens), each after a
    prefix of prefix_lens tokens already cached. kind="decode": one token per sequence, which
    attends to context_lens tokens (itself included). kind="mixed" (chunked prefill): the first
    `num_prefill_tokens` rows are prefill chunks described as for "prefill" (block_tables,
    cu_seqlens, prefix_lens), the rest are decode tokens described by `decode_block_tables`
    and context_lens; the linear layers, norms, RoPE and KV write run once over all rows, only
    the attention is launched twice (one launch per kind)."""

    kind: str
    slot_mapping: torch.Tensor            # [T] int64: cache slot of each new token
    block_tables: torch.Tensor            # [B, max_blocks] int32 (mixed: the prefill sequences')
    cu_seqlens: torch.Tensor | None = None    # prefill: [B+1] int32
    prefix_lens: torch.Tensor | None = None   # prefill: [B] int32
    max_prefix_len: int = 0
    context_lens: torch.Tensor | None = None  # decode: [B] int32
    last_token_index: torch.Tensor | None = None  # prefill: [B] row of each sequence's last token
    num_prefill_tokens: int = 0               # mixed: rows [0, n) are prefill, [n, T) decode
    decode_block_tables: torch.Tensor | None = None  # mixed: [B_decode, max_blocks] int32

    def __post_init__(self):
        if self.kind not in ("prefill", "decode", "mixed"):
            raise ValueError(f"AttentionMetadata.kind must be prefill, decode or mixed, got {self.kind!r}")
        if self.kind == "mixed" and (self.decode_block_tables is None or self.context_lens is None
                                     or self.cu_seqlens is None):
            raise ValueError("mixed AttentionMetadata needs cu_seqlens, context_lens and decode_block_tables")


def _aligned_concat(fields) -> tuple[np.ndarray, dict]:
    """One int32 array holding `fields` [(name, int array)], each starting on a 16-byte
    boundary (Triton specialises pointer arguments on their alignment, so fields at arbitrary
    offsets would compile new kernel variants mid-serving), and {name: (offset, length)}."""
    layout, off, parts = {}, 0, []
    for name, arr in fields:
        layout[name] = (off, len(arr))
        pad = -len(arr) % 4
        parts += [np.asarray(arr, np.int64), np.zeros(pad, np.int64)]
        off += len(arr) + pad
    return np.concatenate(parts).astype(np.int32), layout


def _tables(rows, width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int64)
    for i, t in enumerate(rows):
        out[i, :len(t)] = t
    return out


def pack_mixed(chunks, seqs, block_size: int) -> tuple[np.ndarray, dict]:
    """The metadata of a mixed step as one int32 array (one host-to-device copy) and its layout:
    prefill `chunks` [(token ids, start, block table, wants logits)] first, then decode `seqs`
    [(token id, position, block table)]. Fields: ids, positions, slots (all rows), cu_seqlens,
    prefix_lens and block_tables of the chunks, context_lens and decode_block_tables of the
    seqs, want (the rows whose logits are sampled: chunks that want them, then every decode
    row); layout["width"] is both tables' width."""
    lens = np.fromiter((len(c[0]) for c in chunks), np.int64, len(chunks))
    num_p, num_tokens = len(chunks), int(lens.sum())
    starts = np.fromiter((c[1] for c in chunks), np.int64, num_p)
    width = max([len(c[2]) for c in chunks] + [len(s[2]) for s in seqs] + [1])
    ptables = _tables([c[2] for c in chunks], width)
    dtables = _tables([s[2] for s in seqs], width)
    cu = np.zeros(num_p + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    seq = np.repeat(np.arange(num_p), lens)
    ppos = np.arange(num_tokens) - cu[:-1][seq] + starts[seq]
    dpos = np.fromiter((s[1] for s in seqs), np.int64, len(seqs))
    pslots = ptables[seq, ppos // block_size] * block_size + ppos % block_size
    dslots = dtables[np.arange(len(seqs)), dpos // block_size] * block_size + dpos % block_size
    ids = np.concatenate([np.fromiter((t for c in chunks for t in c[0]), np.int64, num_tokens),
                          np.fromiter((s[0] for s in seqs), np.int64, len(seqs))])
    want = np.concatenate([(cu[1:] - 1)[np.fromiter((bool(c[3]) for c in chunks), bool, num_p)],
                           num_tokens + np.arange(len(seqs))])
    packed, layout = _aligned_concat([
        ("ids", ids), ("positions", np.concatenate([ppos, dpos])), ("slots", np.concatenate([pslots, dslots])),
        ("cu_seqlens", cu), ("prefix_lens", starts), ("block_tables", ptables.ravel()),
        ("context_lens", dpos + 1), ("decode_block_tables", dtables.ravel()), ("want", want)])
    layout["width"] = width
    layout["num_prefill_tokens"] = num_tokens
    layout["max_prefix_len"] = int(starts.max()) if num_p else 0
    return packed, layout


def mixed_metadata(buf: torch.Tensor, layout: dict) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(token ids, positions, AttentionMetadata, want rows) as views of `buf`, the device copy
    of pack_mixed's array."""
    def field(name):
        off, n = layout[name]
        return buf[off:off + n]
    w = layout["width"]
    meta = AttentionMetadata(
        kind="mixed", slot_mapping=field("slots"), block_tables=field("block_tables").view(-1, w),
        cu_seqlens=field("cu_seqlens"), prefix_lens=field("prefix_lens"),
        max_prefix_len=layout["max_prefix_len"], context_lens=field("context_lens"),
        num_prefill_tokens=layout["num_prefill_tokens"],
        decode_block_tables=field("decode_block_tables").view(-1, w))
    return field("ids"), field("positions"), meta, field("want")
