"""A Hub dataset id (`org/name`) -> the local files of one split, through huggingface-hub's cache.

Offline (HF_HUB_OFFLINE=1) only the cache is read: a dataset fetched before, by anita or by
`huggingface-cli download --repo-type dataset org/name`, loads with no network; one that is not
there is an error naming the command that downloads it. Online, the repository's file list and
README are read first, then only the files of the requested split are downloaded. A repository
with a loading script and no data files of its own is read from the Hub's parquet conversion
(revision `refs/convert/parquet`), as the dataset viewer serves it.

The cache is huggingface-hub's (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub),
read from the environment at call time.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from anita.errors import AnitaError
from anita.sources.layout import is_data_file, select_files

PARQUET_REVISION = "refs/convert/parquet"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def hub_cache() -> Path:
    """huggingface-hub's cache directory, as its own constants define it, from the current environment."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def download_command(repo_id: str) -> str:
    return f"huggingface-cli download --repo-type dataset {repo_id}"


def dataset_files(repo_id: str, split: str, config: str | None) -> list[Path]:
    """The local paths of `split` of `config` of Hub dataset `repo_id` (downloaded unless offline)."""
    if is_offline():
        return cached_files(repo_id, split, config)
    return downloaded_files(repo_id, split, config)


def cached_files(repo_id: str, split: str, config: str | None) -> list[Path]:
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=hub_cache(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise AnitaError(f"{repo_id}: dataset not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE is "
                         f"set; download it first: {download_command(repo_id)}") from None
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    readme = (root / "README.md").read_text(encoding="utf-8") if (root / "README.md").is_file() else None
    return [root / p for p in select_files(paths, readme, split, config, repo_id)]


def downloaded_files(repo_id: str, split: str, config: str | None) -> list[Path]:
    api, revision = HfApi(), None
    try:
        paths = api.list_repo_files(repo_id, repo_type="dataset")
        if not any(is_data_file(p) for p in paths) and any(p.endswith(".py") for p in paths):
            revision = PARQUET_REVISION  # a script-based dataset: the Hub's parquet conversion
            paths = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
        readme = None
        if "README.md" in paths and revision is None:
            readme = Path(hf_hub_download(repo_id, "README.md", repo_type="dataset", cache_dir=hub_cache())).read_text(
                encoding="utf-8")
        wanted = select_files(paths, readme, split, config, repo_id)
        root = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=hub_cache(),
                                      allow_patterns=wanted + ["README.md"]))
    except AnitaError:
        raise
    except Exception as e:  # not found, gated, network down: huggingface-hub raises many kinds
        raise AnitaError(f"{repo_id}: the Hub could not provide this dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); if it is gated, log in with "
                         "`huggingface-cli login`") from None
    return [root / p for p in wanted]
