"""Load a Llama-family model from an HF folder (config.json + single or sharded safetensors),
or build one with random ("dummy") weights at a preset's shape.

Each tensor-parallel rank reads only its slice of every weight (safetensors get_slice), so a
rank never holds the whole model in memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.model_config import PRESETS, ModelConfig, load_model_config
from model.dummy_weights import DummyReader
from model.llama import LlamaModel, TPContext

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: ModelConfig, dtype: str, device: str) -> torch.dtype:
    """'auto': the checkpoint's dtype on CUDA; float32 on CPU (CPU bf16 matmuls are slow and
    the CPU path is the oracle)."""
    if dtype == "auto":
        return TORCH_DTYPES[cfg.dtype] if device.startswith("cuda") else torch.float32
    return TORCH_DTYPES[dtype]


def read_model_folder(path: str | Path) -> tuple[ModelConfig, dict[str, Path]]:
    """Config and a map tensor name -> safetensors file; clear errors for broken folders."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    cfg = load_model_config(str(folder))        # config.json + generation_config.json
    if not cfg.runnable:
        raise ModelLoadError(f"{folder}: architecture {cfg.arch!r} can be planned but not run "
                             "(runnable: llama, qwen2, mistral)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is malformed ({e})") from None
        files = {name: folder / f for name, f in weight_map.items()}
    else:
        single = folder / "model.safetensors"
        if not single.is_file():
            raise ModelLoadError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        files = {name: single for name in _tensor_names(single)}
    missing = {str(f) for f in files.values() if not f.is_file()}
    if missing:
        raise ModelLoadError(f"{folder}: shard file(s) missing: {', '.join(sorted(missing))}")
    return cfg, files


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear error
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from None


class _ShardReader:
    """Reads row or column slices of named tensors across safetensors shards."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open
        self.files = files
        self._open = {}
        self._safe_open = safe_open

    def _handle(self, name):
        path = self.files.get(name)
        if path is None:
            raise ModelLoadError(f"checkpoint lacks tensor {name}")
        if path not in self._open:
            self._open[path] = self._safe_open(str(path), framework="pt")
        return self._open[path]

    def has(self, name):
        return name in self.files

    def get(self, name, dim=None, rank=0, size=1):
        sl = self._handle(name).get_slice(name)
        shape = sl.get_shape()
        if dim is None or size == 1:
            return sl[:]
        n = shape[dim] // size
        if dim == 0:
            return sl[rank * n:(rank + 1) * n]
        return sl[:, rank * n:(rank + 1) * n]


def load_weights(model: LlamaModel, source) -> None:
    """Copy weights into `model`, each rank taking its slice. `source`: a map tensor name ->
    safetensors file, or a DummyReader."""
    cfg, tp = model.cfg, model.tp
    r = source if isinstance(source, DummyReader) else _ShardReader(source)
    own = model.state_dict()
    missing = set(own)

    def put(name, t):           # one tensor at a time: peak memory stays at one full tensor
        if own[name].shape != t.shape:
            raise ModelLoadError(f"tensor {name}: checkpoint shape {tuple(t.shape)} != model {tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(t)
        missing.discard(name)

    def row(name):     # split output rows across ranks
        return r.get(name, 0, tp.rank, tp.size)

    def col(name):     # split input columns across ranks
        return r.get(name, 1, tp.rank, tp.size)

    put("embed_tokens.weight", r.get("model.embed_tokens.weight"))
    head = "lm_head.weight" if r.has("lm_head.weight") and not cfg.tie_word_embeddings else "model.embed_tokens.weight"
    put("lm_head.weight", r.get(head))
    put("norm.weight", r.get("model.norm.weight"))
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        put(o + "self_attn.qkv_proj.weight", torch.cat([row(a + "q_proj.weight"), row(a + "k_proj.weight"), row(a + "v_proj.weight")]))
        if cfg.attention_bias:
            put(o + "self_attn.qkv_proj.bias", torch.cat([row(a + "q_proj.bias"), row(a + "k_proj.bias"), row(a + "v_proj.bias")]))
        put(o + "self_attn.o_proj.weight", col(a + "o_proj.weight"))
        m = p + "mlp."
        put(o + "mlp.gate_up_proj.weight", torch.cat([row(m + "gate_proj.weight"), row(m + "up_proj.weight")]))
        put(o + "mlp.down_proj.weight", col(m + "down_proj.weight"))
        put(o + "input_layernorm.weight", r.get(p + "input_layernorm.weight"))
        put(o + "post_attention_layernorm.weight", r.get(p + "post_attention_layernorm.weight"))
    if missing:
        raise ModelLoadError(f"no weights for {', '.join(sorted(missing))}")


def init_dummy_weights(model: LlamaModel, seed: int = 0) -> None:
    """Random weights made on the model's device, identical for every TP degree."""
    load_weights(model, DummyReader(model.cfg, seed, next(model.parameters()).device))


def model_context_len(cfg: ModelConfig, requested: int = 0) -> int:
    """The context length to serve: the model's limit, capped by a sliding window (this runtime
    attends to the whole context, so it serves only what fits in the window), and by the request."""
    n = cfg.max_position_embeddings
    if cfg.sliding_window:
        n = min(n, cfg.sliding_window)
    return min(n, requested) if requested else n


def build_model(source: str, device: str = "cpu", dtype: str = "auto", tp: TPContext | None = None,
                dummy_seed: int = 0, max_positions: int = 0) -> LlamaModel:
    """A model ready to run: from a folder (real weights) or a preset name (dummy weights).
    The embedded default ('embedded') is a folder made on first use (model/embedded.py)."""
    from model.embedded import resolve_model_source
    from model.rope import cos_sin_table
    source = resolve_model_source(source)
    tp = tp or TPContext()
    if source in PRESETS:
        cfg, files = PRESETS[source], None
        if not cfg.runnable:
            raise ModelLoadError(f"preset {source!r} cannot run here")
    else:
        cfg, files = read_model_folder(source)
    torch_dtype = resolve_dtype(cfg, dtype, device)
    with torch.device("meta"):
        model = LlamaModel(cfg, tp).to(torch_dtype)
    model = model.to_empty(device=device)
    if files is None:
        init_dummy_weights(model, dummy_seed)
    else:
        load_weights(model, files)
    positions = max_positions or cfg.max_position_embeddings
    model.cos_sin = cos_sin_table(cfg, positions, device=device)
    return model.eval()
