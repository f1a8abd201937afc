"""A model directory from a local path or a Hugging Face Hub repo id (huggingface-hub's cache).

huggingface-hub honours HF_HUB_OFFLINE=1 (then only the local cache is used) and HF_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError

from anita.errors import AnitaError

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]  # what a model directory needs


def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub repo id, fetched into (or found in) the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise AnitaError(f"{name}: no such model directory")
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise AnitaError(f"{name}: no such model directory, and not a valid Hub repo id") from None
    except Exception as e:  # offline, not cached, gated, network down: all mean "can't get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise AnitaError(f"{name}: no such model directory, and the Hub could not provide it{hint}: "
                         f"{type(e).__name__}") from None
