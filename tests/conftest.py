"""Shared fixtures: real data paths and a tiny model + tokenizer that the tests build themselves (no downloads)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from pathlib import Path

import pytest

# The shared data folder: $DPOKIT_DATA_DIR (as `dpokit demo` reads it), else ../shared/data next to this checkout.
SHARED = Path(os.environ.get("DPOKIT_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
HH = {
    name: SHARED / "hh-rlhf" / name / "test.jsonl.gz"
    for name in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
}
ULTRAFEEDBACK_TRAIN = SHARED / "ultrafeedback-sample" / "train_clean.jsonl"
ULTRAFEEDBACK_EVAL = SHARED / "ultrafeedback-sample" / "eval_clean.jsonl"
IMDB = SHARED / "imdb-text2vec" / "movie_review.jsonl.gz"
VADER = SHARED / "vader-movie-snippets" / "movieReviewSnippets_GroundTruth.txt"


def hh_rows(n: int, subset: str = "helpful-base") -> list[dict]:
    with gzip.open(HH[subset], "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a 400-token BPE tokenizer trained on 300 HH rows."""
    from dpokit.model import init_model

    texts = [t for row in hh_rows(300) for t in (row["chosen"], row["rejected"])]
    return init_model(texts, tmp_path_factory.mktemp("tiny"), vocab_size=400, hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from dpokit.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture
def hh_file(tmp_path: Path) -> Path:
    """48 real HH rows, the 2nd row duplicated with chosen == rejected to exercise the quirk counter."""
    rows = hh_rows(48)
    rows.append({"chosen": rows[1]["chosen"], "rejected": rows[1]["chosen"]})
    return write_jsonl(tmp_path / "hh.jsonl", rows)


def tiny_run(model: Path, data: Path, out: Path) -> list[str]:
    """The overrides every training test starts from: the tiny model, short sequences, 8 pairs a step."""
    return [
        f"model.path={model}",
        f"data.train_path={data}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"train.output_dir={out}",
        "train.batch_size=8",
        "train.lr=1e-2",
        "loss.beta=0.5",
    ]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def base_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run with checkpoints at steps 1 and 2 (tests/bad_input's BASE_RUN): copy, never change."""
    from dpokit.config import load_config
    from dpokit.train import train
    from tests.bad_input import BASE_RUN, RUN_ARGS

    root = tmp_path_factory.mktemp("base")
    data = write_jsonl(root / "data.jsonl", hh_rows(12))
    names = {"model": str(tiny_model), "data": str(data), "out": str(root / "run")}
    train(load_config(None, [a.format(**names) for a in (*RUN_ARGS, *BASE_RUN)]))
    return root / "run"


class _CurrentStderr:
    """Whatever `sys.stderr` is when written to (pytest swaps it for every test that captures output)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(scope="session", autouse=True)
def _transformers_logs_to_the_current_stderr() -> None:
    """transformers' log handler keeps the stream that was stderr when it was made: a test that captured output,
    long closed when a later test logs, which then shows logging's own "--- Logging error ---" traceback."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers")  # makes the handler
    for handler in logging.getLogger("transformers").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.stream = _CurrentStderr()
