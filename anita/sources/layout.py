"""Which files of a Hub-layout dataset hold one split of one config (subset).

A dataset repository on the Hugging Face Hub (or a local directory laid out like one) says where its
data is in two ways, the same two `datasets.load_dataset` reads (huggingface.co/docs/hub/
datasets-manual-configuration, datasets-file-names-and-splits):

1. The YAML header of README.md: `configs: [{config_name, data_files, default}]`, where data_files is
   a glob, a list of globs (split "train"), or a list of `{split, path}` (path: a glob or a list).
   HuggingFaceH4/ultrachat_200k and ultrafeedback_binarized are laid out this way.
2. Otherwise, file names: a file belongs to split S when S (or a synonym: validation = valid, dev,
   val; test = testing, eval, evaluation) is a directory name or a word of its name, delimited by
   `-._ ` or a digit (`data/train-00000-of-00003.parquet`, `train.jsonl`, `test/0.csv`). When no
   file names any split, every file is "train". A config is then a top-level directory (as in the
   Hub's parquet conversion, `{config}/{split}/0000.parquet`).

Paths are POSIX paths relative to the repository root; the result is sorted, so shard order is fixed.
"""

from __future__ import annotations

import re

import yaml

from anita.errors import AnitaError
from anita.sources.files import SUFFIXES

SYNONYMS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
            "test": ("test", "testing", "eval", "evaluation")}


def readme_configs(readme: str | None, where: str) -> list[dict]:
    """The `configs` list of a README's YAML header ([] when there is none)."""
    if not readme or not readme.startswith("---"):
        return []
    header = readme.split("\n---", 1)[0][3:]
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError as e:
        raise AnitaError(f"{where}/README.md: its YAML header is not valid ({str(e).splitlines()[0]})") from None
    configs = meta.get("configs", []) if isinstance(meta, dict) else []
    if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
        raise AnitaError(f"{where}/README.md: 'configs' must be a list of {{config_name, data_files}} entries")
    return configs


def glob_regex(pattern: str) -> re.Pattern:
    """A Hub data_files glob (`**` any directories, `*` and `?` within one name) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(out + r"\Z")


def split_patterns(data_files) -> dict[str, list[str]]:
    """A config's data_files -> {split: [globs]}."""
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, list) and all(isinstance(p, str) for p in data_files):
        return {"train": list(data_files)}
    if isinstance(data_files, dict):
        data_files = [{"split": k, "path": v} for k, v in data_files.items()]
    splits = {}
    for entry in data_files or []:
        path = entry.get("path", []) if isinstance(entry, dict) else []
        splits.setdefault(str(entry.get("split", "train")), []).extend([path] if isinstance(path, str) else path)
    return splits


def choose_config(configs: list[dict], config: str | None, where: str) -> dict:
    names = [str(c["config_name"]) for c in configs]
    if config is not None:
        if config not in names:
            raise AnitaError(f"{where}: no config {config!r}; it has {', '.join(names)} (--data-config)")
        return configs[names.index(config)]
    default = [c for c in configs if c.get("default")] or [c for c in configs if c["config_name"] == "default"]
    if default or len(configs) == 1:
        return (default or configs)[0]
    raise AnitaError(f"{where}: has several configs ({', '.join(names)}); choose one with --data-config")


def is_data_file(path: str) -> bool:
    return path.lower().endswith(tuple(SUFFIXES)) and not path.split("/")[-1].startswith(".")


def names_split(path: str, split: str) -> bool:
    """Whether `path` names `split` (or a synonym) as a directory or a delimited word of its file name."""
    words = "|".join(re.escape(w) for w in SYNONYMS.get(split, (split,)))
    return re.search(rf"(?:^|[/\-._ 0-9])(?:{words})(?:[/\-._ 0-9]|$)", path) is not None


def select_files(paths: list[str], readme: str | None, split: str, config: str | None, where: str) -> list[str]:
    """The files (relative paths) that hold `split` of `config`; AnitaError naming what exists otherwise."""
    configs = readme_configs(readme, where)
    if configs:
        chosen = choose_config(configs, config, where)
        splits = split_patterns(chosen.get("data_files"))
        if split not in splits:
            raise AnitaError(f"{where}: config {chosen['config_name']!r} has no split {split!r}; it has "
                             f"{', '.join(splits) or 'none'} (--data-split)")
        regexes = [glob_regex(p.removeprefix("./")) for p in splits[split]]
        files = sorted(p for p in paths if any(r.match(p) for r in regexes))
        if not files:
            raise AnitaError(f"{where}: no file matches {', '.join(splits[split])} (split {split!r} of config "
                             f"{chosen['config_name']!r})")
        return files
    data = sorted(p for p in paths if is_data_file(p))
    if config is not None:
        data = [p[len(config) + 1:] for p in data if p.startswith(config + "/")]
        if not data:
            raise AnitaError(f"{where}: no config {config!r} (no README configs and no {config}/ directory)")
    files = [p for p in data if names_split(p, split)]
    if not files and split == "train" and not any(names_split(p, s) for p in data for s in SYNONYMS):
        files = data  # no file names a split: all of them are "train"
    if not files:
        found = sorted({s for p in data for s in SYNONYMS if names_split(p, s)})
        raise AnitaError(f"{where}: no data file for split {split!r}" +
                         (f"; it has {', '.join(found)} (--data-split)" if found else f" among {len(data)} data files"))
    return [f"{config}/{p}" if config is not None else p for p in files]
