"""Tiny random HF checkpoints, built and saved with transformers (offline) for the tests."""
from __future__ import annotations

import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def make_checkpoint(arch: str, folder, seed: int = 0, max_shard_size=None, **overrides):
    """Save a random `arch` model (llama | llama3 | qwen2 | mistral) to `folder`; returns the HF model."""
    import transformers as tf
    torch.manual_seed(seed)
    kw = dict(TINY, **overrides)
    if arch == "llama":
        cfg = tf.LlamaConfig(**kw)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "llama3":
        cfg = tf.LlamaConfig(**kw, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**kw, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**kw, sliding_window=None)
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Larger-than-default weights so logits are well separated and greedy choices are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
            if arch == "qwen2" and name.endswith("bias"):
                p.normal_(0, 0.5)
    model.eval()
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), safe_serialization=True, **save_kw)
    return model
