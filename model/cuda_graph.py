"""CUDA graphs for decode: one graph per batch size of a ladder, captured once at startup.

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


class DecodeInputs:
    """The packed int32 inputs of decode graphs: a host buffer (pinned on CUDA) and its device
    twin, laid out per graph size as the module docstring draws. Usable on CPU (tests)."""

    def __init__(self, max_batch_size: int, width: int, block_size: int, device):
        self.width, self.block_size = width, block_size
        self.device = torch.device(device)
        numel = self.numel(max_batch_size)
        pinned = self.device.type == "cuda"
        self.host = torch.zeros(numel, dtype=torch.int32, pin_memory=pinned)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(numel, dtype=torch.int32, device=self.device)
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

    def upload(self, b: int) -> None:
        """One copy of the used prefix, asynchronous from pinned memory on CUDA."""
        n = self.numel(b)
        self.dev[:n].copy_(self.host[:n], non_blocking=True)


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch_size` over contexts up to
    `max_model_len` tokens. Check `fits(seqs)`, then `run(seqs)` replays; larger batches or
    longer contexts are the caller's to run eagerly."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_model_len: int = 0):
        if kv_cache.device.type != "cuda":
            raise ValueError("DecodeGraphs needs a CUDA KV cache")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.device = kv_cache.device
        self.max_model_len = max_model_len or model.cos_sin.shape[0]
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.inputs = DecodeInputs(self.max_batch_size, -(-self.max_model_len // block_size),
                                   block_size, self.device)
        # The pinned buffer is rewritten only once the copy that read it last has run.
        self.copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first: smaller graphs then fit in the memory the pool already holds.
        for b in reversed(self.sizes):
            self.inputs.fill([], b)
            self.inputs.upload(b)
            ids, pos, meta = self.inputs.views(b)
            # An eager run first compiles the Triton variants this size needs (split counts differ
            # by batch size), which must not happen during capture.
            self.model(ids, pos, self.kv_cache, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(ids, pos, self.kv_cache, meta)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` rows, or None."""
        return next((s for s in self.sizes if s >= batch), None)

    def fits(self, seqs) -> bool:
        return (self.size_for(len(seqs)) is not None
                and all(len(t) <= self.inputs.width and p < self.max_model_len for _, p, t in seqs))

    def run(self, seqs) -> torch.Tensor:
        """Replay the graph for `seqs` [(token id, position, block table)]; the hidden states of
        the real rows, [len(seqs), hidden], valid until the next replay."""
        b = self.size_for(len(seqs))
        if not self.copied.query():     # complete as a rule: the last step's tokens were read
            self.copied.synchronize()
        self.inputs.fill(seqs, b)
        self.inputs.upload(b)
        self.copied.record()
        self.graphs[b].replay()
        self.num_replays += 1
        return self.outputs[b][:len(seqs)]


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
