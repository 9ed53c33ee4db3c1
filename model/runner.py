"""Runs one step of the model for a batch described as plain data.

Rank 0 of an instance turns the scheduler's Batch into a StepInput (picklable lists), its
tensor-parallel peers receive the same StepInput, and every rank runs `execute`. Only rank 0
computes logits.

On CPU every step runs eagerly from tensors built from the lists (the oracle path). On CUDA,
decode steps replay CUDA graphs (model/cuda_graph.py) fed by one pinned host-to-device copy;
prefills of new sequences up to `max_prefill_graph_tokens` tokens in all replay prefill graphs
(an eager pass costs ~28 ms of launches at llama-3-8b shape, longer than the GPU needs below ~1k
tokens), with `layer_hook` called once, for the last layer, after the replay; longer prefills
and those over a cached prefix run eagerly (long enough to hide launch costs, and the hook then
runs between layers, so layer-wise KV transfer overlaps them) from one packed copy of their
metadata. `enforce_eager=True`, or DISAGG_ENFORCE_EAGER=1 in the environment, turns graphs off
for debugging.

On CUDA, before capture, kernels.gemv.tune_skinny times cuBLAS against a GEMV-shaped Triton
kernel for each decode matmul shape at 1-8 rows on this model's weights and keeps the faster
(DISAGG_SKINNY_GEMV=0: cuBLAS only, no tuning). Decode steps of <= 8 rows then take the fused
kernels (model/fused_decode.py: norm, RoPE, KV write, SiLU and the residual add folded into four
GEMVs per layer; configs tuned the same way, each mode checked once against its reference),
unless DISAGG_FUSED_DECODE=0 (model/fused_plan.py: setup lists the other switches).

A step with both prefill chunks and decode tokens (chunked prefill) runs as one forward pass
over all their rows (`mixed`): the weights are read once, and only the attention is launched
twice. It is used whenever the prefill part would run eagerly anyway (a later chunk, a cached
prefix, or too long for the prefill graphs); a step whose prefill fits a prefill graph replays
that graph and the decode graph instead, which costs less host time than one eager pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from engine.batching import Batch
from model.attention_metadata import AttentionMetadata, mixed_metadata, pack_mixed
from model.cuda_graph import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_PREFILL_GRAPH_TOKENS, DecodeGraphs,
                              PrefillGraphs, pack_prefill)
from model.llama import LlamaModel


@dataclass
class StepInput:
    """prefill: (token ids of the chunk, start position, block table, wants logits);
    decode: (token id, position, block table)."""
    prefill: list[tuple[list[int], int, list[int], bool]] = field(default_factory=list)
    decode: list[tuple[int, int, list[int]]] = field(default_factory=list)
    # Async scheduling: for each decode row, the index of its input token among the previous
    # step's sampled tokens, still on the device (-1: the token id above is real). None: all real.
    decode_src: list[int] | None = None

    @classmethod
    def from_batch(cls, batch: Batch) -> "StepInput":
        pre = [(c.request.all_token_ids[c.start:c.start + c.num_tokens], c.start, list(c.request.block_ids), c.is_last)
               for c in batch.prefill]
        dec = [(r.last_token_id, r.num_tokens - 1, list(r.block_ids)) for r in batch.decode]
        return cls(pre, dec)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


def _pad_tables(tables: list[list[int]]) -> list[list[int]]:
    width = max((len(t) for t in tables), default=1) or 1
    return [t + [0] * (width - len(t)) for t in tables]


def _skinny_gemv_from_env() -> bool:
    """DISAGG_SKINNY_GEMV=0 keeps cuBLAS for every decode matmul (no tuning at startup)."""
    return os.environ.get("DISAGG_SKINNY_GEMV", "1").lower() not in ("0", "false", "no")


def _eager_from_env() -> bool:
    return os.environ.get("DISAGG_ENFORCE_EAGER", "").lower() in ("1", "true", "yes")


class ModelRunner:
    """Runs StepInputs on one rank's model shard and KV cache.

    max_batch_size: the largest decode batch captured as a CUDA graph (larger ones run eagerly);
    max_model_len: the longest context a graph serves (default: the model's rotary table, capped
    by the cache); max_prefill_graph_tokens: the largest prefill captured (0: none);
    enforce_eager: no graphs (None: DISAGG_ENFORCE_EAGER); mixed_batches: run a step's prefill
    and decode parts as one forward pass (False: two passes, for comparison). Graphs are used
    on CUDA with tensor parallelism 1 only: capturing NCCL collectives is not verified on our
    hosts."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_model_len: int = 0,
                 max_prefill_graph_tokens: int = DEFAULT_PREFILL_GRAPH_TOKENS,
                 enforce_eager: bool | None = None, mixed_batches: bool = True):
        self.model = model
        self.mixed_batches = mixed_batches
        self.num_mixed_steps = 0
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.is_driver = model.tp.rank == 0
        self.enforce_eager = _eager_from_env() if enforce_eager is None else enforce_eager
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.gemv_report: list[dict] = []
        if self.device.type == "cuda" and _skinny_gemv_from_env():
            from kernels.gemv import tune_skinny
            self.gemv_report = tune_skinny(model.skinny_layers())
        self.fused_report = self._setup_fused_decode() if self.device.type == "cuda" else []
        if self.device.type == "cuda" and not self.enforce_eager and model.tp.size == 1:
            cache_tokens = kv_cache.shape[2] * block_size
            max_len = min(max_model_len or model.cos_sin.shape[0], model.cos_sin.shape[0], cache_tokens)
            pool = torch.cuda.graph_pool_handle()
            self.graphs = DecodeGraphs(model, kv_cache, block_size, max_batch_size, max_len, pool=pool)
            if max_prefill_graph_tokens > 0:
                self.prefill_graphs = PrefillGraphs(model, kv_cache, block_size,
                                                    min(max_prefill_graph_tokens, max_len), pool=pool)
        if self.device.type == "cuda":
            self.warmup()

    def _setup_fused_decode(self) -> list[dict]:
        """Decode steps of <= 8 rows take the fused kernels (model/fused_decode.py), tuned and
        checked on this model first, unless DISAGG_FUSED_DECODE=0 or the model does not fit
        them (model/fused_plan.py: setup, and the other switches)."""
        from model.fused_plan import setup
        self.model.fused_decode, report = setup(self.model)
        return report

    def warmup(self) -> None:
        """Compile every kernel variant serving uses (prefill with and without a cached prefix,
        eager decode, KV pack/unpack) before the first request: Triton compiles on first use, a
        second or more each, which would otherwise land in some request's TTFT. Writes only to
        blocks 0-2, which the scheduler has not handed out yet."""
        from kernels.kv_pack import pack_kv, unpack_kv
        bs = self.block_size
        if self.kv_cache.shape[2] < 3:
            return
        graphs, self.prefill_graphs = self.prefill_graphs, None     # the eager variants first
        try:
            self.prefill([([1] * (bs + 1), 0, [0, 1], True), ([2] * 3, 0, [2], True)])
        finally:
            self.prefill_graphs = graphs
        self.prefill([([1] * (bs + 1), 0, [0, 1], True), ([2] * 3, 0, [2], True)])
        self.prefill([([3] * 2, bs, [0, 1], True)])
        self.decode([(4, bs + 2, [0, 1])])
        self.mixed([([3] * 2, bs, [0, 1], True)], [(5, 2, [2])])
        ids = torch.tensor([0, 1], device=self.device)
        layers, heads = (0, self.kv_cache.shape[0]), (0, self.kv_cache.shape[4])
        unpack_kv(pack_kv(self.kv_cache, ids, layers, heads), self.kv_cache, ids, layers, heads)
        self._warm_long_prefill_attention()
        torch.cuda.synchronize(self.device)

    def _warm_long_prefill_attention(self) -> None:
        """Prefills of >= 2k tokens take another attention kernel where it measured faster
        (kernels/prefill_attention_v2.py, DEFAULT_V2_BY_TOKENS): compile it now too, alone and
        after a cached prefix, one and two sequences, on scratch tensors (the cache only read)."""
        from kernels.prefill_attention import prefill_attention
        from kernels.prefill_attention_v2 import DEFAULT_V2_BY_TOKENS
        kv = self.kv_cache
        bs, hk, d = kv.shape[3], kv.shape[4], kv.shape[5]
        starts = [t for t, name in DEFAULT_V2_BY_TOKENS.get(d, []) if name]
        if not starts:
            return
        attn = self.model.layers[0].self_attn
        tables = torch.zeros(2, 1, dtype=torch.int32, device=self.device)
        for t in starts:  # each rule's kernel
            q = torch.randn(t, attn.num_heads, d, device=self.device, dtype=kv.dtype)
            k = torch.randn(t, hk, d, device=self.device, dtype=kv.dtype)
            v = torch.randn_like(k)
            for cu in ([0, t], [0, t // 2, t]):
                cu_t = torch.tensor(cu, dtype=torch.int32, device=self.device)
                prefill_attention(q, k, v, cu_t, attn.scale)
                prefix = torch.full((len(cu) - 1,), bs, dtype=torch.int32, device=self.device)
                prefill_attention(q, k, v, cu_t, attn.scale, kv[0, 0], kv[0, 1], tables[:len(cu) - 1],
                                  prefix)

    def _slots(self, table: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    def _tensor(self, data, dtype):
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def prefill(self, chunks, layer_hook=None) -> torch.Tensor | None:
        if self.device.type == "cuda":
            return self._prefill_cuda(chunks, layer_hook)
        ids, pos, slots, cu, prefix, last = [], [], [], [0], [], []
        for tokens, start, table, _ in chunks:
            ids += tokens
            pos += range(start, start + len(tokens))
            slots += self._slots(table, start, len(tokens))
            cu.append(cu[-1] + len(tokens))
            prefix.append(start)
            last.append(cu[-1] - 1)
        meta = AttentionMetadata(
            kind="prefill", slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(_pad_tables([c[2] for c in chunks]), torch.int32),
            cu_seqlens=self._tensor(cu, torch.int32), prefix_lens=self._tensor(prefix, torch.int32),
            max_prefix_len=max(prefix))
        hidden = self.model(self._tensor(ids, torch.int64), self._tensor(pos, torch.int64),
                            self.kv_cache, meta, layer_hook)
        want = [i for i, c in zip(last, chunks) if c[3]]
        if not self.is_driver or not want:
            return None
        return self.model.compute_logits(hidden[self._tensor(want, torch.int64)])

    def _prefill_cuda(self, chunks, layer_hook=None) -> torch.Tensor | None:
        if self.prefill_graphs is not None and self.prefill_graphs.fits(chunks):
            hidden, want = self.prefill_graphs.run(chunks)
            if layer_hook is not None:      # every layer is queued: the hook's event covers them all
                layer_hook(len(self.model.layers) - 1)
            if not self.is_driver or not len(want):
                return None
            return self.model.compute_logits(hidden.index_select(0, want))
        # Same metadata as the CPU path, built with numpy and moved in one copy (int32: every
        # kernel and the embedding take int32 indices).
        packed, at = pack_prefill(chunks, self.block_size)
        buf = torch.from_numpy(packed).to(self.device, non_blocking=True)

        def field(name):
            off, n = at[name]
            return buf[off:off + n]
        meta = AttentionMetadata(
            kind="prefill", slot_mapping=field("slots"),
            block_tables=field("block_tables").view(len(chunks), at["width"]),
            cu_seqlens=field("cu_seqlens"), prefix_lens=field("prefix_lens"),
            max_prefix_len=max(c[1] for c in chunks))
        hidden = self.model(field("ids"), field("positions"), self.kv_cache, meta, layer_hook)
        if not self.is_driver or not at["want"][1]:
            return None
        return self.model.compute_logits(hidden.index_select(0, field("want")))

    def _feeder(self, src: list[int] | None, feed: torch.Tensor | None, offset: int = 0):
        """A function that writes the previous step's sampled tokens (`feed`, on the device)
        into the decode rows' input ids (async scheduling): no host round trip between steps."""
        if src is None:
            return None
        if feed is None:
            raise ValueError("a decode row takes its token from the previous step, but no tokens were fed")
        rows = [i for i, s in enumerate(src) if s >= 0]
        index = torch.tensor([[offset + i for i in rows], [src[i] for i in rows]], dtype=torch.int64)
        index = index.to(self.device, non_blocking=True)

        def write(ids: torch.Tensor) -> None:
            ids.index_copy_(0, index[0], feed.index_select(0, index[1]).to(ids.dtype))
        return write

    @torch.inference_mode()
    def decode(self, seqs, feed=None) -> torch.Tensor | None:
        """feed: `_feeder`'s function or None."""
        if self.graphs is not None and self.graphs.fits(seqs):
            hidden = self.graphs.run(seqs, feed)
            return self.model.compute_logits(hidden) if self.is_driver else None
        meta = AttentionMetadata(
            kind="decode",
            slot_mapping=self._tensor([self._slots(t, p, 1)[0] for _, p, t in seqs], torch.int64),
            block_tables=self._tensor(_pad_tables([t for _, _, t in seqs]), torch.int32),
            context_lens=self._tensor([p + 1 for _, p, _ in seqs], torch.int32))
        ids = self._tensor([s[0] for s in seqs], torch.int64)
        if feed is not None:
            feed(ids)
        hidden = self.model(ids, self._tensor([s[1] for s in seqs], torch.int64), self.kv_cache, meta)
        return self.model.compute_logits(hidden) if self.is_driver else None

    @torch.inference_mode()
    def mixed(self, chunks, seqs, feed=None) -> torch.Tensor | None:
        """One forward pass over prefill `chunks` and decode `seqs` (StepInput's tuples); logits
        of the chunks that want them, then of every decode row. feed: `_feeder`'s function, its
        rows offset by the prefill tokens."""
        self.num_mixed_steps += 1
        packed, layout = pack_mixed(chunks, seqs, self.block_size)
        buf = torch.from_numpy(packed)
        buf = buf.to(self.device, non_blocking=True) if self.device.type == "cuda" else buf.long()
        ids, positions, meta, want = mixed_metadata(buf, layout)
        if feed is not None:
            feed(ids)
        hidden = self.model(ids, positions, self.kv_cache, meta)
        if not self.is_driver or not len(want):
            return None
        return self.model.compute_logits(hidden.index_select(0, want))

    def _use_mixed(self, step: StepInput, layer_hook) -> bool:
        if not (step.prefill and step.decode) or layer_hook is not None or not self.mixed_batches:
            return False
        return self.prefill_graphs is None or not self.prefill_graphs.fits(step.prefill)

    def execute(self, step: StepInput, layer_hook=None, feed: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [num sampled, vocab] on rank 0 (prefill rows that want logits, then decode
        rows: the order of Batch.sampled); None on other ranks or when nothing is sampled.
        feed: the previous step's sampled tokens on the device, for rows in `step.decode_src`."""
        if self._use_mixed(step, layer_hook):
            offset = sum(len(c[0]) for c in step.prefill)
            return self.mixed(step.prefill, step.decode, self._feeder(step.decode_src, feed, offset))
        parts = []
        if step.prefill:
            parts.append(self.prefill(step.prefill, layer_hook))
        if step.decode:
            parts.append(self.decode(step.decode, self._feeder(step.decode_src, feed)))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)
