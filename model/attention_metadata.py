"""What one forward pass needs to know about the batch's sequences and their KV blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """kind="prefill": tokens of several sequences packed end to end (cu_seqlens), each after a
    prefix of prefix_lens tokens already cached. kind="decode": one token per sequence, which
    attends to context_lens tokens (itself included)."""

    kind: str
    slot_mapping: torch.Tensor            # [T] int64: cache slot of each new token
    block_tables: torch.Tensor            # [B, max_blocks] int32
    cu_seqlens: torch.Tensor | None = None    # prefill: [B+1] int32
    prefix_lens: torch.Tensor | None = None   # prefill: [B] int32
    max_prefix_len: int = 0
    context_lens: torch.Tensor | None = None  # decode: [B] int32
    last_token_index: torch.Tensor | None = None  # prefill: [B] row of each sequence's last token
