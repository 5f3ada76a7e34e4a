"""Resume safety beyond the bad-input table: the safe subset names real settings, and a checkpoint from before a
setting existed is read as having had its default."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from dpokit.config import RunConfig, from_dict, to_dict
from dpokit.resume import RECORD, SAFE_TO_CHANGE, Checkpoint, ResumeError, check_config


def test_every_safe_setting_exists() -> None:
    keys = {f"{section}.{name}" for section, fields in to_dict(RunConfig()).items() for name in fields}
    assert SAFE_TO_CHANGE <= keys


def test_a_setting_the_checkpoint_does_not_record_is_taken_as_its_default(base_run: Path) -> None:
    path = base_run / "checkpoints" / "step-2"
    record = json.loads((path / RECORD).read_text())
    config = from_dict(copy.deepcopy(record["config"]))
    del record["config"]["train"]["logits_chunk"]
    checkpoint = Checkpoint(path, 2, record)
    assert check_config(checkpoint, config) == []
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, logits_chunk=512))
    with pytest.raises(ResumeError, match="train.logits_chunk: 1024 -> 512"):
        check_config(checkpoint, changed)
