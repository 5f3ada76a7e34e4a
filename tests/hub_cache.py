"""Build a Hugging Face Hub cache by hand, in the layout `huggingface_hub` writes, so that tests load models and
data sets by Hub id with `HF_HUB_OFFLINE=1` through the real loading code:

    HF_HOME/hub/{models|datasets}--org--name/
        blobs/<sha256 of the content>         the files themselves
        refs/<revision>                       the commit hash a branch or tag points at
        snapshots/<commit>/<path>  ->  ../../blobs/<sha256>   (relative symbolic links)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_repo(
    hf_home: Path, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40, ref: str = "main"
) -> Path:
    """Write `files` ({path in repo: content}) as commit `commit` of `repo_id`, with `ref` pointing at it; return the
    snapshot folder."""
    root = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for rel, content in files.items():
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, as `put_repo` takes them."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
