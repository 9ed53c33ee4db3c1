"""Model shapes: parsed from an HF config.json or named presets. Torch-free, so the planner
can size any decoder (Llama, Qwen2, Mistral, OPT, GPT-2 field names) even where the runtime
cannot run it yet."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import ModelLoadError

RUNNABLE_ARCHS = ("llama", "qwen2", "mistral")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelConfig:
    arch: str                       # llama | qwen2 | mistral | opt | gpt2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False    # Qwen2: q/k/v projections carry a bias
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sliding_window: int | None = None
    name: str = ""
    gated_mlp: bool = True          # SwiGLU (3 matrices) for Llama-family; 2 for OPT/GPT-2
    extra: dict = field(default_factory=dict, compare=False)
    # Every end-of-sequence id (config.json's list and generation_config.json's), eos_token_id first.
    eos_token_ids: tuple[int, ...] = ()
    # Sampling defaults from generation_config.json (temperature, top_p, top_k, min_p,
    # repetition_penalty) when it sets do_sample; applied to fields a request leaves unset.
    generation_defaults: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.eos_token_ids and self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_ids", (self.eos_token_id,))

    @property
    def runnable(self) -> bool:
        return self.arch in RUNNABLE_ARCHS

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = (3 if self.gated_mlp else 2) * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h

    def dtype_bytes(self, dtype: str | None = None) -> int:
        return DTYPE_BYTES[dtype or self.dtype]

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.num_params * self.dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes(dtype)

    def flops_per_token(self) -> int:
        """Matmul FLOPs per token, excluding attention scores (2 per weight parameter)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * self.q_size + 2 * h * self.kv_size + self.q_size * h + (3 if self.gated_mlp else 2) * h * i
        return 2 * (self.num_layers * per_layer + self.vocab_size * h)

    def attention_flops(self, q_len: int, kv_len: int, causal: bool = True) -> float:
        """QK^T and PV FLOPs for q_len queries over kv_len keys (causal halves the square part)."""
        pairs = q_len * kv_len - (q_len * (q_len - 1) / 2 if causal else 0)
        return 4.0 * pairs * self.num_heads * self.head_dim * self.num_layers

    def to_hf_dict(self) -> dict:
        """config.json fields for a Llama-family model (used to write tiny checkpoints)."""
        arch_cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        if self.arch not in arch_cls:
            raise ModelLoadError(f"cannot write a runnable config for architecture {self.arch!r}")
        d = {
            "architectures": [arch_cls[self.arch]], "model_type": self.arch,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": self.dtype,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.arch == "qwen2":
            d["use_sliding_window"] = False
        if self.arch == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def _first(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def from_hf_config(d: dict, name: str = "") -> ModelConfig:
    """Parse HF config.json fields. Llama/Qwen2/Mistral are runnable; OPT and GPT-2 shapes can be
    planned (their attention is multi-head, MLP not gated)."""
    if not isinstance(d, dict):
        raise ModelLoadError("config.json must hold a JSON object")
    model_type = str(d.get("model_type", "")).lower()
    archs = [a.lower() for a in d.get("architectures") or []]
    arch = model_type or (archs[0].replace("forcausallm", "").replace("lmheadmodel", "") if archs else "")
    if arch in ("llama", "qwen2", "mistral"):
        gated = True
    elif arch in ("opt", "gpt2"):
        gated = False
    else:
        raise ModelLoadError(
            f"unsupported model_type {model_type or archs!r}: supported are llama, qwen2, mistral "
            "(runnable) and opt, gpt2 (planning only)")
    try:
        hidden = int(_first(d, "hidden_size", "n_embd", "d_model"))
        layers = int(_first(d, "num_hidden_layers", "n_layer", "num_layers"))
        heads = int(_first(d, "num_attention_heads", "n_head"))
        vocab = int(d["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json lacks a required shape field ({e})") from None
    kv_heads = int(_first(d, "num_key_value_heads", default=heads))
    inter = int(_first(d, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
    head_dim = int(_first(d, "head_dim", default=hidden // heads))
    eos_ids = _id_list(d.get("eos_token_id"))
    eos = eos_ids[0] if eos_ids else None
    dtype = str(_first(d, "dtype", "torch_dtype", default="bfloat16")).replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        dtype = "bfloat16"
    # transformers >= 5 writes `rope_parameters` (rope_theta inside); older ones `rope_scaling`.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or None
    rope_theta = float(_first(d, "rope_theta", default=(rope or {}).get("rope_theta", 10000.0)))
    if rope is not None:
        rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
    sliding = d.get("sliding_window") if (arch == "mistral" or d.get("use_sliding_window")) else None
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(_first(d, "max_position_embeddings", "n_positions", default=2048)),
        rope_theta=rope_theta, rope_scaling=rope,
        rms_norm_eps=float(_first(d, "rms_norm_eps", "layer_norm_epsilon", default=1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", arch in ("opt", "gpt2"))),
        attention_bias=bool(d.get("attention_bias", arch == "qwen2")), dtype=dtype,
        bos_token_id=d.get("bos_token_id"), eos_token_id=eos, sliding_window=sliding,
        name=name, gated_mlp=gated, eos_token_ids=tuple(eos_ids))


def _id_list(v) -> list[int]:
    if v is None:
        return []
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if isinstance(x, int) and not isinstance(x, bool)]


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def with_generation_config(cfg: ModelConfig, g: dict) -> ModelConfig:
    """Merge generation_config.json: its EOS ids join config.json's (transformers stops on any
    of them), and its sampling values become the defaults (as vLLM's generation_config='auto')."""
    if not isinstance(g, dict):
        raise ModelLoadError("generation_config.json must hold a JSON object")
    ids = list(cfg.eos_token_ids)
    for t in _id_list(g.get("eos_token_id")):
        if t not in ids:
            ids.append(t)
    defaults = {k: g[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(g.get(k), (int, float))}
    if not g.get("do_sample", bool(defaults)):
        defaults = {k: v for k, v in defaults.items() if k == "repetition_penalty"}
    return replace(cfg, eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else (ids[0] if ids else None),
                   eos_token_ids=tuple(ids), generation_defaults=defaults)


def _llama3_scaling():
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072, 500000.0,
                              _llama3_scaling(), 1e-5, False, False, "bfloat16", 128000, 128001, name="llama-3-8b"),
    "llama-3-70b": ModelConfig("llama", 128256, 8192, 28672, 80, 64, 8, 128, 131072, 500000.0,
                               _llama3_scaling(), 1e-5, False, False, "bfloat16", 128000, 128001, name="llama-3-70b"),
    "llama-2-7b": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32, 128, 4096, 10000.0,
                              None, 1e-5, False, False, "bfloat16", 1, 2, name="llama-2-7b"),
    "llama-2-13b": ModelConfig("llama", 32000, 5120, 13824, 40, 40, 40, 128, 4096, 10000.0,
                               None, 1e-5, False, False, "bfloat16", 1, 2, name="llama-2-13b"),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 32768, 1000000.0,
                              None, 1e-6, False, True, "bfloat16", 151643, 151645, name="qwen2.5-7b"),
    "mistral-7b": ModelConfig("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 32768, 1000000.0,
                              None, 1e-5, False, False, "bfloat16", 1, 2, name="mistral-7b"),
    # Tiny shapes for tests and the embedded default (byte-level vocabulary: 256 bytes + 3 specials).
    # The embedded default: made on first use with random weights and a byte-level tokenizer.
    "embedded": ModelConfig("llama", 259, 256, 768, 4, 8, 4, 32, 4096, 10000.0, None, 1e-5,
                            False, False, "float32", 256, 257, name="embedded"),
    "tiny-llama": ModelConfig("llama", 259, 64, 128, 2, 4, 2, 16, 2048, 10000.0, None, 1e-5,
                              False, False, "float32", 256, 257, name="tiny-llama"),
    "tiny-qwen2": ModelConfig("qwen2", 259, 64, 128, 2, 4, 2, 16, 2048, 10000.0, None, 1e-6,
                              True, True, "float32", 256, 257, name="tiny-qwen2"),
    "tiny-mistral": ModelConfig("mistral", 259, 64, 128, 2, 4, 2, 16, 2048, 10000.0, None, 1e-5,
                                False, False, "float32", 256, 257, name="tiny-mistral"),
}


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset name, a model folder holding config.json, or a path to a config.json."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ModelLoadError(
            f"{name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model "
            "folder or config.json that exists")
    cfg = from_hf_config(_read_json(p), name=p.parent.name)
    gen = p.parent / "generation_config.json"
    if gen.is_file():
        cfg = with_generation_config(cfg, _read_json(gen))
    return cfg


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{p}: not valid JSON ({e})") from None


def with_overrides(cfg: ModelConfig, **kw) -> ModelConfig:
    return replace(cfg, **kw)
