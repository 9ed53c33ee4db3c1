"""`--model org/name`: a Hugging Face repo id already in the local cache, resolved offline
through huggingface_hub (HF_HOME / HF_HUB_CACHE as the user set them). Nothing is downloaded."""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import ModelLoadError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def resolve_cached_repo(repo_id: str, revision: str | None = None) -> str:
    """The snapshot folder of `repo_id` in the local HF cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ModelLoadError(f"{repo_id!r} looks like a Hugging Face repo id; install huggingface_hub "
                             "to load it from the local cache") from None
    try:
        # Read at call time: huggingface_hub fixes its default cache when first imported.
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE
        raise ModelLoadError(
            f"{repo_id!r} is not a preset, not a folder, and not in the local Hugging Face cache "
            f"({cache_dir or HF_HUB_CACHE}); download it first (`huggingface-cli download {repo_id}`) or pass its folder") from None
    except Exception as e:  # noqa: BLE001 - an invalid id or a broken cache entry
        raise ModelLoadError(f"cannot resolve {repo_id!r} in the local Hugging Face cache: {e}") from None
    if not (Path(folder) / "config.json").is_file():
        raise ModelLoadError(f"{repo_id!r} in the local Hugging Face cache ({folder}) has no config.json")
    return folder
