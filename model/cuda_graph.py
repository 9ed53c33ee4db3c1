"""CUDA graphs for decode (one graph per batch size of a ladder) and for short prefills (one
per token count of a ladder), captured once at startup.

A decode step at llama-3-8b shape launches ~500 kernels; run eagerly, Python and the Triton
launchers spend longer on each than the GPU does, so the GPU idles. A graph replays them all
with one launch. Inputs reach a graph through static device buffers that one host-to-device
copy from a pinned host buffer fills per step; nothing inside the step waits for the GPU.

The int32 input buffer of the graph of batch size b (block-table width W) is laid out as

    [token ids (b) | positions (b) | slots (b) | context lens (b) | block tables (b x W)]

so each size uses a contiguous prefix of one buffer and one copy moves exactly that prefix.
Rows past the real batch are padding: slot -1 (the KV write skips it), context length 1 over
block 0 (the attention reads one cached row and nothing uses the result), token 0 at position 0.

Only the decoder stack is captured; logits are computed eagerly on the real rows after the
replay (one GEMM), so the graphs keep only [b, hidden] outputs rather than [b, vocab] ones.

Prefill graphs (`PrefillGraphs`) serve batches of up to `max_seqs` new sequences (no cached
prefix) whose tokens add up to at most `max_tokens`: run eagerly, a forward pass costs ~28 ms of
Python and kernel launches at llama-3-8b shape whatever its length, while the GPU needs 6 ms for
128 tokens. The graph of T tokens is captured with S = max_seqs + 1 sequences; a batch of B
sequences and n <= T tokens fills it as

    [token ids (T) | positions (T) | slots (T) | cu_seqlens (S + 1) | logit rows (max_seqs)]

where sequence B (a padding sequence) holds tokens n..T-1 (token 0 at position 0, slot -1: the
KV write skips them and nothing reads their attention output) and sequences B+1..S-1 are empty.
The logit rows (each real sequence's last token) sit after the graph's inputs, copied with them.
"""
from __future__ import annotations

import numpy as np
import torch

from model.attention_metadata import AttentionMetadata
from model.llama import LlamaModel

DEFAULT_MAX_BATCH_SIZE = 256


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond, ending at max_batch_size: padding
    a decode batch costs little (the step reads the weights once whatever the batch), but each
    size costs a capture at startup and its own activations."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    ladder = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max_batch_size + 1, 16))
    sizes = [s for s in ladder if s < max_batch_size]
    return sizes + [max_batch_size]


class _StagedInputs:
    """An int32 host buffer (pinned on CUDA) and its device twin, sized by the subclass's
    `numel(largest graph size)`; each graph size uses a prefix of both. Usable on CPU (tests)."""

    def _allocate(self, largest: int, device) -> None:
        self.device = torch.device(device)
        # The pinned buffer is rewritten only once the copy that read it last has run.
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None
        numel = self.numel(largest)
        self.host = torch.zeros(numel, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(numel, dtype=torch.int32, device=self.device)

    def upload(self, size: int) -> None:
        """One copy of the prefix graph size `size` uses, asynchronous from pinned memory."""
        n = self.numel(size)
        self.dev[:n].copy_(self.host[:n], non_blocking=True)

    def stage(self, data, size: int):
        """`fill(data, size)` once the last upload has read the host buffer, then upload it;
        returns what fill returns. CUDA only (the graphs' inputs)."""
        if not self.copied.query():     # complete as a rule: the last step's outputs were read
            self.copied.synchronize()
        out = self.fill(data, size)
        self.upload(size)
        self.copied.record()
        return out


class DecodeInputs(_StagedInputs):
    """The packed int32 inputs of decode graphs, laid out per graph size as the module
    docstring draws."""

    def __init__(self, max_batch_size: int, width: int, block_size: int, device):
        self.width, self.block_size = width, block_size
        self._allocate(max_batch_size, device)
        self._rows_size = 0                 # graph size whose layout the rows cache describes
        self._rows: list[list[int]] = []    # block table each row of the host buffer holds

    def numel(self, b: int) -> int:
        return 4 * b + b * self.width

    def views(self, b: int):
        """(token ids, positions, AttentionMetadata) for graph size b: views of the device buffer."""
        d, w = self.dev, self.width
        meta = AttentionMetadata(kind="decode", slot_mapping=d[2 * b:3 * b],
                                 block_tables=d[4 * b:4 * b + b * w].view(b, w),
                                 context_lens=d[3 * b:4 * b])
        return d[0:b], d[b:2 * b], meta

    def fill(self, seqs, b: int) -> None:
        """Write the host buffer for graph size b: the rows of `seqs` [(token id, position, block
        table)], then padding rows."""
        h, n, bs, w = self.host_np, len(seqs), self.block_size, self.width
        h[0:b] = 0
        h[b:2 * b] = 0
        h[2 * b:3 * b] = -1
        h[3 * b:4 * b] = 1
        tables = ()
        if n:
            tok, pos, tables = zip(*seqs)
            h[0:n] = tok
            h[b:b + n] = pos
            h[2 * b:2 * b + n] = [t[p // bs] * bs + p % bs for p, t in zip(pos, tables)]
            h[3 * b:3 * b + n] = [p + 1 for p in pos]
        bt = h[4 * b:4 * b + b * w].reshape(b, w)
        if self._rows_size != b:
            self._rows_size, self._rows = b, [[] for _ in range(b)]
        rows = self._rows
        for i, t in enumerate(tables):
            # A sequence's table only grows between steps: write just the new tail when this row
            # held the same table's prefix last step (list compares run in C; converting a long
            # Python list to numpy is the costly part).
            old = rows[i]
            k = len(old)
            if not (k <= len(t) and t[:k] == old):
                k = 0
            if k < len(t):
                bt[i, k:len(t)] = t[k:]
            rows[i] = list(t)   # a copy: the caller may append to its list later
        bt[n:, 0] = 0
        for i in range(n, b):
            rows[i] = [0]


def _capture_one(model, kv_cache, pool, run_inputs):
    """An eager run first (it compiles the Triton variants these shapes need, which must not
    happen during capture), then the capture; returns (graph, output)."""
    ids, pos, meta = run_inputs
    model(ids, pos, kv_cache, meta)
    torch.cuda.synchronize(kv_cache.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = model(ids, pos, kv_cache, meta)
    return graph, out


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch_size` over contexts up to
    `max_model_len` tokens. Check `fits(seqs)`, then `run(seqs)` replays; larger batches or
    longer contexts are the caller's to run eagerly."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_model_len: int = 0, pool=None):
        if kv_cache.device.type != "cuda":
            raise ValueError("DecodeGraphs needs a CUDA KV cache")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.device = kv_cache.device
        self.max_model_len = max_model_len or model.cos_sin.shape[0]
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.inputs = DecodeInputs(self.max_batch_size, -(-self.max_model_len // block_size),
                                   block_size, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture(pool if pool is not None else torch.cuda.graph_pool_handle())

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        # Largest first: smaller graphs then fit in the memory the pool already holds.
        for b in reversed(self.sizes):
            self.inputs.fill([], b)
            self.inputs.upload(b)
            self.graphs[b], self.outputs[b] = _capture_one(self.model, self.kv_cache, pool,
                                                           self.inputs.views(b))
        torch.cuda.synchronize(self.device)

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` rows, or None."""
        return next((s for s in self.sizes if s >= batch), None)

    def fits(self, seqs) -> bool:
        return (self.size_for(len(seqs)) is not None
                and all(len(t) <= self.inputs.width and p < self.max_model_len for _, p, t in seqs))

    def run(self, seqs, feed=None) -> torch.Tensor:
        """Replay the graph for `seqs` [(token id, position, block table)]; the hidden states of
        the real rows, [len(seqs), hidden], valid until the next replay. `feed(ids)` (async
        scheduling) writes device-side token ids into the staged input before the replay."""
        b = self.size_for(len(seqs))
        self.inputs.stage(seqs, b)
        if feed is not None:
            feed(self.inputs.dev[0:len(seqs)])
        self.graphs[b].replay()
        self.num_replays += 1
        return self.outputs[b][:len(seqs)]


DEFAULT_PREFILL_GRAPH_TOKENS = 1024
DEFAULT_PREFILL_GRAPH_SEQS = 32


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """16, 32, 48, 64, 96, 128, 192, 256, then steps of 128, ending at max_tokens: a prefill
    pays for its padded tokens (its GEMMs grow with them), so the steps stay within ~50% below
    256 tokens (where the GPU time is all weight reads anyway) and ~12-25% above."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ladder = [16, 32, 48, 64, 96, 128, 192, 256] + list(range(384, max_tokens + 1, 128))
    sizes = [s for s in ladder if s < max_tokens]
    return sizes + [max_tokens]


def _aligned(n: int) -> int:
    return n + (-n % 4)             # int32 fields start on 16-byte boundaries


class PrefillInputs(_StagedInputs):
    """The packed int32 inputs of prefill graphs (layout in the module docstring)."""

    def __init__(self, max_tokens: int, max_seqs: int, block_size: int, device):
        self.max_seqs, self.block_size = max_seqs, block_size
        self.num_seqs = max_seqs + 1            # the real ones, then the padding sequence
        self._allocate(max_tokens, device)
        self._placeholder = torch.zeros((1, 1), dtype=torch.int32, device=self.device)

    def _offsets(self, t: int) -> dict[str, int]:
        at, off = {}, 0
        for name, n in (("ids", t), ("positions", t), ("slots", t), ("cu", self.num_seqs + 1),
                        ("want", self.max_seqs)):
            at[name] = off
            off += _aligned(n)
        at["end"] = off
        return at

    def numel(self, t: int) -> int:
        return self._offsets(t)["end"]

    def views(self, t: int):
        """(token ids, positions, AttentionMetadata) for graph size t: views of the device buffer."""
        d, at = self.dev, self._offsets(t)
        meta = AttentionMetadata(kind="prefill", slot_mapping=d[at["slots"]:at["slots"] + t],
                                 block_tables=self._placeholder,
                                 cu_seqlens=d[at["cu"]:at["cu"] + self.num_seqs + 1],
                                 prefix_lens=None, max_prefix_len=0)
        return d[at["ids"]:at["ids"] + t], d[at["positions"]:at["positions"] + t], meta

    def want(self, t: int, n: int) -> torch.Tensor:
        """The device rows of the first n logit rows written by the last `fill` for size t."""
        off = self._offsets(t)["want"]
        return self.dev[off:off + n]

    def fill(self, chunks, t: int) -> int:
        """Write the host buffer for graph size t from `chunks` [(token ids, 0, block table, wants
        logits)]; returns how many logit rows it wrote."""
        at, h, bs = self._offsets(t), self.host_np, self.block_size
        if len(chunks) > self.max_seqs:
            raise ValueError(f"{len(chunks)} sequences > the prefill graphs' {self.max_seqs}")
        lens = np.fromiter((len(c[0]) for c in chunks), np.int64, len(chunks))
        n = int(lens.sum())
        if n > t:
            raise ValueError(f"{n} tokens do not fit the prefill graph of {t}")
        cu = h[at["cu"]:at["cu"] + self.num_seqs + 1]
        cu[0] = 0
        np.cumsum(lens, out=cu[1:len(chunks) + 1])
        cu[len(chunks) + 1:] = t            # the padding sequence ends at t; the rest are empty
        ids, pos, slots = (h[at[k]:at[k] + t] for k in ("ids", "positions", "slots"))
        ids[n:] = 0
        pos[n:] = 0
        slots[n:] = -1
        if n:
            ids[:n] = np.fromiter((x for c in chunks for x in c[0]), np.int64, n)
            seq = np.repeat(np.arange(len(chunks)), lens)
            p = np.arange(n) - cu[:-1][seq]
            pos[:n] = p
            width = max(len(c[2]) for c in chunks)
            tables = np.zeros((len(chunks), width), np.int64)
            for i, c in enumerate(chunks):
                tables[i, :len(c[2])] = c[2]
            slots[:n] = tables[seq, p // bs] * bs + p % bs
        rows = [int(cu[i + 1]) - 1 for i, c in enumerate(chunks) if c[3]]
        h[at["want"]:at["want"] + len(rows)] = rows
        return len(rows)


class PrefillGraphs:
    """Captured prefill forward passes for up to `max_tokens` tokens in up to `max_seqs` new
    sequences (module docstring). Check `fits(chunks)`, then `run(chunks)` replays."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 max_tokens: int = DEFAULT_PREFILL_GRAPH_TOKENS,
                 max_seqs: int = DEFAULT_PREFILL_GRAPH_SEQS, pool=None):
        if kv_cache.device.type != "cuda":
            raise ValueError("PrefillGraphs needs a CUDA KV cache")
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.device = kv_cache.device
        self.sizes = prefill_graph_sizes(max_tokens)
        self.max_tokens, self.max_seqs = self.sizes[-1], max_seqs
        self.max_positions = model.cos_sin.shape[0]
        self.inputs = PrefillInputs(self.max_tokens, max_seqs, block_size, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for t in reversed(self.sizes):
                self.inputs.fill([], t)
                self.inputs.upload(t)
                self.graphs[t], self.outputs[t] = _capture_one(model, kv_cache, pool, self.inputs.views(t))
        torch.cuda.synchronize(self.device)

    def size_for(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def fits(self, chunks) -> bool:
        """New sequences only (a cached prefix or a later chunk needs the eager kernel variant
        that reads the paged prefix), few enough and short enough."""
        if not chunks or len(chunks) > self.max_seqs:
            return False
        n = 0
        for tokens, start, _, _ in chunks:
            if start:
                return False
            n += len(tokens)
        return 0 < n <= self.max_tokens and max(len(c[0]) for c in chunks) <= self.max_positions

    def run(self, chunks) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay; returns (hidden states of the padded batch, device rows of the logit rows),
        valid until the next replay of this size."""
        t = self.size_for(sum(len(c[0]) for c in chunks))
        num_want = self.inputs.stage(chunks, t)
        self.graphs[t].replay()
        self.num_replays += 1
        return self.outputs[t], self.inputs.want(t, num_want)


def pack_prefill(chunks, block_size: int) -> tuple[np.ndarray, dict]:
    """The prefill metadata of `chunks` [(token ids, start, block table, wants logits)] as one
    int32 array (one host-to-device copy) and the (offset, length, width) of each field in it."""
    lens = np.fromiter((len(c[0]) for c in chunks), np.int64, len(chunks))
    num_seqs, num_tokens = len(chunks), int(lens.sum())
    starts = np.fromiter((c[1] for c in chunks), np.int64, num_seqs)
    width = max((len(c[2]) for c in chunks), default=1) or 1
    tables = np.zeros((num_seqs, width), np.int64)
    for i, c in enumerate(chunks):
        tables[i, :len(c[2])] = c[2]
    ids = np.fromiter((t for c in chunks for t in c[0]), np.int64, num_tokens)
    cu = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    seq = np.repeat(np.arange(num_seqs), lens)
    pos = np.arange(num_tokens) - cu[:-1][seq] + starts[seq]
    slots = tables[seq, pos // block_size] * block_size + pos % block_size
    want = (cu[1:] - 1)[np.fromiter((bool(c[3]) for c in chunks), bool, num_seqs)]
    fields = [("ids", ids), ("positions", pos), ("slots", slots), ("cu_seqlens", cu),
              ("prefix_lens", starts), ("block_tables", tables.ravel()), ("want", want)]
    # Each field starts on a 16-byte boundary: Triton specialises pointer arguments on their
    # alignment, so fields at arbitrary offsets would compile new kernel variants mid-serving.
    layout, off, parts = {}, 0, []
    for name, arr in fields:
        layout[name] = (off, len(arr))
        pad = -len(arr) % 4
        parts += [arr, np.zeros(pad, np.int64)]
        off += len(arr) + pad
    layout["width"] = width
    return np.concatenate(parts).astype(np.int32), layout
