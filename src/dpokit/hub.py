"""Models and data sets named by Hugging Face Hub id, through `huggingface_hub` and `datasets` and their cache.

A local path always wins: an id is only looked up when no file or folder of that name exists. Downloads go to the
Hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`) in the layout `huggingface_hub`
writes (`models--org--name/{blobs,refs,snapshots}`), so a second run, or a machine without network given that
cache and `HF_HUB_OFFLINE=1`, reads the same files. `HF_TOKEN` authorises gated and private repositories.

The environment is read when a name is resolved, not when a library is imported, so a process (or a test) that sets
`HF_HOME` or `HF_HUB_OFFLINE` after start-up is still obeyed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
LOCAL_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".tsv", ".txt", ".csv", ".gguf", ".yaml", ".yml", ".pt")
"""A missing name ending like a file is a missing local file, never a Hub id."""
MODEL_FILES = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
"""What loading a causal LM and its tokenizer needs; other formats (ONNX, GGUF, TF, Flax) are not downloaded."""


class HubError(UserError, OSError):
    """A name that is neither a local path nor obtainable from the Hub (or its cache)."""


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline(datasets: bool = False) -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`; for data sets also `HF_DATASETS_OFFLINE`), read now."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE") or (datasets and _true("HF_DATASETS_OFFLINE"))


def hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_HOME") or "~/.cache/huggingface"))


def hub_cache() -> Path:
    """Where `huggingface_hub` keeps downloaded repositories."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expanduser(explicit)) if explicit else hf_home() / "hub"


def datasets_cache() -> Path:
    """Where `datasets` keeps the Arrow tables it builds from downloaded files."""
    explicit = os.environ.get("HF_DATASETS_CACHE")
    return Path(os.path.expanduser(explicit)) if explicit else hf_home() / "datasets"


def is_hub_id(name: str) -> bool:
    """`org/name` or `name`, and not a local path: no such file, no path syntax, no file suffix."""
    return (
        bool(REPO_ID.match(name)) and not name.endswith(LOCAL_SUFFIXES) and ".." not in name and not Path(name).exists()
    )


def _where(kind: str, name: str, revision: str | None) -> str:
    at = f" at revision '{revision}'" if revision else ""
    return f"{kind} '{name}'{at}"


def _not_found(kind: str, name: str, revision: str | None, datasets: bool, cause: BaseException) -> HubError:
    mode = (
        "offline mode is on (HF_HUB_OFFLINE=1), so only the cache was searched: run once with network access, "
        "or copy the files into that cache"
        if offline(datasets)
        else f"offline mode is off, and the Hub answered: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
    )
    return HubError(
        f"{_where(kind, name, revision)} is not a local path (no such file or folder under {Path.cwd()}) and was not "
        f"found as a Hub id in the cache {hub_cache()}; {mode}. Give a local path, check the id (and HF_TOKEN for "
        "gated or private repositories)"
    )


def snapshot(name: str, repo_type: str, revision: str | None, allow: list[str] | None) -> Path:
    """A local snapshot folder of a Hub repository: downloaded into the cache, or (offline) found there."""
    from huggingface_hub import snapshot_download

    datasets = repo_type == "dataset"
    try:
        folder = snapshot_download(
            name,
            repo_type=repo_type,
            revision=revision,
            cache_dir=hub_cache(),
            allow_patterns=allow,
            local_files_only=offline(datasets),
        )
    except Exception as e:  # every failure (not found, no network, gated, offline miss) means "not obtainable"
        raise _not_found("model" if repo_type == "model" else "data set", name, revision, datasets, e) from e
    return Path(folder)


def resolve_model(path: str, revision: str | None = None, gguf_file: str | None = None) -> str:
    """A local folder for `model.path`: the path itself when it exists, else the Hub snapshot of that id."""
    if Path(path).exists():
        return path
    if not is_hub_id(path):
        raise HubError(
            f"model path '{path}' does not exist; give a Hugging Face model folder, a .gguf file, or a Hub id "
            "such as Qwen/Qwen2.5-0.5B-Instruct"
        )
    allow = [*MODEL_FILES, gguf_file] if gguf_file else MODEL_FILES
    return str(snapshot(path, "model", revision, allow))


@dataclass(frozen=True)
class HubDataset:
    """One split of a Hub data set: `datasets.load_dataset(id, name=subset, data_dir=..., split=...)`."""

    id: str
    split: str
    subset: str | None = None
    data_dir: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        """How data reports name it: `id[split]` (rows read `id[split]:row`)."""
        return f"{self.id}[{self.split}]"


def iter_hub_rows(source: HubDataset) -> Iterator[tuple[str, Any]]:
    """(`id[split]:row`, row) for every row of a Hub data set split, rows numbered from 1."""
    import datasets

    from dpokit.data.report import DataError

    allow = [f"{source.data_dir.strip('/')}/**", "README.md", "*.json"] if source.data_dir else None
    folder = snapshot(source.id, "dataset", source.revision, allow)
    try:
        table = datasets.load_dataset(
            str(folder),
            name=source.subset,
            data_dir=source.data_dir,
            split=source.split,
            cache_dir=str(datasets_cache()),
        )
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(
            f"{source}: the data set '{source.id}' (subset {source.subset!r}, data_dir {source.data_dir!r}) "
            f"in {folder} cannot be read as asked: {str(e).splitlines()[0][:300]}. Check data.subset, "
            "data.data_dir and data.train_split / data.eval_split"
        ) from e
    for i, row in enumerate(table):
        yield f"{source}:{i + 1}", row
