"""From the data section of a config to tokenized train and held-out examples, with one report."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.config import DataConfig
from dpokit.data.formats import Record, Use, load_records
from dpokit.data.report import DataError, DataReport
from dpokit.data.tokenize import TokenizedExample, tokenize_records
from dpokit.hub import HubDataset, is_hub_id


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    train_report: DataReport
    eval_report: DataReport


def stable_bucket(key: str) -> int:
    """0–9999, the same for `key` on every run and machine: splits that must not move call this."""
    return zlib.crc32(key.encode()) % 10_000


def _held_out(source: str, fraction: float) -> bool:
    """A stable, row-level split: every record of a row lands on the same side, and a row's side depends on its file
    name and line (`source` is `path:line`), not on the folder the file is in."""
    path, _, line = source.rpartition(":")
    return stable_bucket(f"{Path(path).name}:{line}") < fraction * 10_000


def data_source(path: str, split: str, config: DataConfig) -> Path | HubDataset:
    """A local file or folder (always first), else a split of the Hub data set of that id."""
    if Path(path).exists() or not is_hub_id(path):
        return Path(path)
    return HubDataset(path, split, config.subset, config.data_dir)


def load_split_records(config: DataConfig, use: Use) -> tuple[list[Record], list[Record], DataReport, DataReport]:
    if not config.train_path:
        raise DataError("no training data given: set data.train_path to a data file, a save_to_disk folder or a Hub id")
    train_report, eval_report = DataReport(), DataReport()
    source = data_source(config.train_path, config.train_split, config)
    for key, value in {"data.subset": config.subset, "data.data_dir": config.data_dir}.items():
        if value is not None and not (isinstance(source, HubDataset) or config.eval_path):
            raise DataError(f"{key}={value} applies to Hub data sets, and '{source}' is a local path; leave it out")
    records, _ = load_records(
        source,
        config.format,
        use,
        config.on_error,
        train_report,
        config.text_field,
        config.chat,
    )
    if config.eval_path or config.eval_split:
        eval_source = data_source(config.eval_path or config.train_path, config.eval_split or "test", config)
        if not config.eval_path and not isinstance(eval_source, HubDataset):
            raise DataError(
                f"data.eval_split={config.eval_split} names a split of a Hub data set, but data.train_path "
                f"'{config.train_path}' is a local file; set data.eval_path instead"
            )
        eval_records, _ = load_records(
            eval_source, config.format, use, config.on_error, eval_report, config.text_field, config.chat
        )
    elif config.eval_fraction > 0:
        eval_records = [r for r in records if _held_out(r.source, config.eval_fraction)]
        records = [r for r in records if not _held_out(r.source, config.eval_fraction)]
        train_report.records, eval_report.records = len(records), len(eval_records)
    else:
        eval_records = []
    if config.max_examples is not None and len(records) > config.max_examples:
        train_report.dropped["beyond_max_examples"] += len(records) - config.max_examples
        records = records[: config.max_examples]
    if config.max_eval_examples is not None and len(eval_records) > config.max_eval_examples:
        eval_report.dropped["beyond_max_eval_examples"] += len(eval_records) - config.max_eval_examples
        eval_records = eval_records[: config.max_eval_examples]
    return records, eval_records, train_report, eval_report


def prepare_data(config: DataConfig, tokenizer: Any, use: Use) -> PreparedData:
    records, eval_records, train_report, eval_report = load_split_records(config, use)
    if not records:
        raise DataError(f"{config.train_path}: no usable training rows ({'; '.join(train_report.lines())})")
    lengths = (config.max_length, config.max_prompt_length)
    train = tokenize_records(records, tokenizer, *lengths, train_report, "tokenizing train", config.on_error)
    held_out = tokenize_records(eval_records, tokenizer, *lengths, eval_report, "tokenizing eval", config.on_error)
    if (config.eval_path or config.eval_split or config.eval_fraction) and not held_out:
        where = config.eval_path or (f"data.eval_fraction={config.eval_fraction} of {config.train_path}")
        raise DataError(
            f"{where}: no usable held-out examples ({'; '.join(eval_report.lines())}); give held-out data that has "
            "some, or leave it out"
        )
    return PreparedData(train, held_out, train_report, eval_report)
