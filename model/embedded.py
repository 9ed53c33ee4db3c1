"""The embedded default model: a small Llama with random weights and the byte-level tokenizer,
written deterministically into a cache folder on first use (no network, no download)."""
from __future__ import annotations

import json
import os
from pathlib import Path

EMBEDDED = "embedded"
EMBEDDED_SEED = 1234


def cache_dir() -> Path:
    root = os.environ.get("DISAGG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "disagg-serve")
    return Path(root)


def embedded_model_dir() -> Path:
    """The embedded model's folder, created on first use. Written to a temporary folder and
    renamed, so concurrent first uses (several actors) never see half a checkpoint."""
    folder = cache_dir() / "embedded-llama-v1"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    from engine.model_config import PRESETS
    from model.loader import init_dummy_weights
    from model.llama import LlamaModel

    cfg = PRESETS[EMBEDDED]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model = LlamaModel(cfg)
    init_dummy_weights(model, EMBEDDED_SEED)
    save_file(_to_hf_names(model, cfg), str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:           # another process won the race; its folder is complete
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _to_hf_names(model, cfg) -> dict:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        qkv = sd[o + "self_attn.qkv_proj.weight"]
        out[p + "self_attn.q_proj.weight"] = qkv[:q].clone()
        out[p + "self_attn.k_proj.weight"] = qkv[q:q + kv].clone()
        out[p + "self_attn.v_proj.weight"] = qkv[q + kv:].clone()
        out[p + "self_attn.o_proj.weight"] = sd[o + "self_attn.o_proj.weight"]
        gu = sd[o + "mlp.gate_up_proj.weight"]
        out[p + "mlp.gate_proj.weight"] = gu[:inter].clone()
        out[p + "mlp.up_proj.weight"] = gu[inter:].clone()
        out[p + "mlp.down_proj.weight"] = sd[o + "mlp.down_proj.weight"]
        out[p + "input_layernorm.weight"] = sd[o + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[o + "post_attention_layernorm.weight"]
    return out


def resolve_model_source(source: str) -> str:
    """'embedded' (or empty) -> the embedded folder; other names pass through."""
    if source in ("", EMBEDDED):
        return str(embedded_model_dir())
    return source
