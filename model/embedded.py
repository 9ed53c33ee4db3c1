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
    folder = cache_dir() / "embedded-llama-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_file

    from engine.model_config import PRESETS
    from model.dummy_weights import DummyReader

    cfg = PRESETS[EMBEDDED]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    reader = DummyReader(cfg, EMBEDDED_SEED)
    save_file({name: reader.get(name).contiguous() for name in reader.shapes}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:           # another process won the race; its folder is complete
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_source(source: str) -> str:
    """'embedded' (or empty) -> the embedded folder; a Hugging Face repo id in the local cache
    -> its snapshot folder; presets and folders pass through."""
    if source in ("", EMBEDDED):
        return str(embedded_model_dir())
    from engine.model_config import PRESETS
    from model.hub import looks_like_repo_id, resolve_cached_repo
    if source not in PRESETS and looks_like_repo_id(source):
        return resolve_cached_repo(source)
    return source
