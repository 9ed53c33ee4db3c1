"""Shapes of the models in the validation table that are not presets (HF config.json fields)."""
from __future__ import annotations

from engine.model_config import PRESETS, ModelConfig, from_hf_config

_OPT = {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "dtype": "float16"}
HF_CONFIGS = {
    "opt-13b": {**_OPT, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                "ffn_dim": 20480},
    "opt-66b": {**_OPT, "hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72,
                "ffn_dim": 36864},
}


def validation_model(name: str) -> ModelConfig:
    """A preset, or one of HF_CONFIGS parsed as `disagg place` would parse its config.json."""
    if name in PRESETS:
        return PRESETS[name]
    return from_hf_config(HF_CONFIGS[name], name)
