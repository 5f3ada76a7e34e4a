"""Stages of an experiment cached in its output folder under a digest of the settings that built them: unchanged
settings reuse a stage, changed ones rebuild it, an interrupted stage is built again from scratch. A stage's
settings hold the keys of the stages it reads, so a rebuild carries on to everything after it."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def digest(settings: Any) -> str:
    """A stage's cache key: its settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_stage(
    out: Path, name: str, label: str, settings: dict[str, Any], outputs: list[Path], build: Callable[[], None]
) -> bool:
    """Run `build` unless `out/stages/<name>.json` records that `outputs` were built from these settings; True when
    it ran. Before a build, whatever an earlier one left is removed; the record is written last."""
    record = out / "stages" / f"{name}.json"
    key = digest(settings)
    if record.exists() and json.loads(record.read_text())["key"] == key and all(p.exists() for p in outputs):
        print(f"[demo] {label}: cached ({outputs[0]})")
        return False
    record.unlink(missing_ok=True)
    for path in outputs:
        _remove(path)
    started = time.perf_counter()
    print(f"[demo] {label} ...")
    build()
    print(f"[demo] {label}: done in {time.perf_counter() - started:.0f}s")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "settings": settings}, indent=1))
    return True
