"""The prompt/completion boundary at token level, EOS and BOS rules, truncation order and its counts."""

from pathlib import Path

import pytest

from dpokit.data.formats import Record, load_records
from dpokit.data.report import DataError, DataReport
from dpokit.data.tokenize import tokenize_record, tokenize_records
from tests.conftest import HH, hh_rows, write_jsonl


def _one(
    tokenizer, record: Record, max_length: int = 512, max_prompt_length: int = 256, report: DataReport | None = None
):
    return tokenize_record(record, tokenizer, max_length, max_prompt_length, report or DataReport())


def test_boundary_is_joined_at_token_level(tokenizer) -> None:
    example = _one(tokenizer, Record("\n\nHuman: hi\n\nAssistant:", (" Hello there", " Go away"), "x:1"))
    prompt_ids = tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"]
    assert list(example.prompt_ids) == prompt_ids
    for completion, text in zip(example.completion_ids, (" Hello there", " Go away"), strict=True):
        assert list(completion[:-1]) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_eos_once_and_bos_once(tokenizer) -> None:
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    example = _one(tokenizer, Record("Question", ("Answer" + tokenizer.eos_token, "No"), "x:1"))
    for completion in example.completion_ids:
        assert completion[-1] == eos and completion.count(eos) == 1
    full = example.prompt_ids + example.completion_ids[0]
    assert full[0] == bos and full.count(bos) == 1


def test_chat_template_boundary_and_single_bos(tokenizer) -> None:
    user = [{"role": "user", "content": "hi"}]
    example = _one(
        tokenizer,
        Record(user, ([{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "no"}]), "x:1"),
    )
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert tokenizer.decode(example.prompt_ids).endswith("<|assistant|>\n")
    assert example.prompt_ids.count(bos) == 1
    for completion in example.completion_ids:
        assert completion[-1] == eos and completion.count(eos) == 1
    assert tokenizer.decode(example.completion_ids[0], skip_special_tokens=True) == "hello"


def test_chat_template_that_is_not_a_prefix_is_refused(tokenizer) -> None:
    # A template whose generation prompt differs from how the assistant turn is rendered.
    saved = tokenizer.chat_template
    tokenizer.chat_template = saved.replace("<|assistant|>\n{% endif %}", "<|assistant|> {% endif %}")
    try:
        with pytest.raises(DataError, match="x:7: the chat template renders the prompt differently"):
            _one(
                tokenizer,
                Record([{"role": "user", "content": "hi"}], ([{"role": "assistant", "content": "a"}],), "x:7"),
            )
    finally:
        tokenizer.chat_template = saved


def test_truncation_cuts_prompt_first_keeping_its_end_and_bos(tokenizer) -> None:
    prompt = " ".join(f"word{i}" for i in range(200))
    report = DataReport()
    example = _one(
        tokenizer, Record(prompt, (" yes " * 100, " no"), "x:1"), max_length=64, max_prompt_length=16, report=report
    )
    full_prompt = tokenizer(prompt)["input_ids"]
    assert len(example.prompt_ids) == 16
    assert example.prompt_ids[0] == tokenizer.bos_token_id
    assert list(example.prompt_ids[1:]) == full_prompt[-15:]
    assert len(example.completion_ids[0]) == 64 - 16  # start kept, cut to what is left
    assert len(example.completion_ids[1]) < 48  # the short one is untouched
    assert report.truncated == {"prompt": 1, "completion": 1}


def test_identical_after_truncation_is_dropped_and_counted(tokenizer) -> None:
    report = DataReport()
    record = Record("p", (" same start " * 20 + "A", " same start " * 20 + "B"), "x:3")
    assert _one(tokenizer, record, max_length=16, max_prompt_length=4, report=report) is None
    assert report.dropped["identical_after_truncation"] == 1 and report.where["identical_after_truncation"] == ["x:3"]


def test_real_hh_file_counts_add_up(tokenizer) -> None:
    records, report = load_records(HH["helpful-online"])
    examples = tokenize_records(records, tokenizer, 128, 64, report)
    assert report.kept == len(examples) == report.records - sum(report.dropped.values())
    assert report.truncated["prompt"] > 0 and report.truncated["completion"] > 0
    assert all(max(e.lengths) <= 128 and len(e.prompt_ids) <= 64 for e in examples)


def test_preview_shows_prompt_and_trained_tokens(tiny_model: Path, hh_file: Path, capsys) -> None:
    from dpokit.cli import main

    assert (
        main(
            [
                "preview",
                str(hh_file),
                "--model",
                str(tiny_model),
                "-n",
                "1",
                "--max-length",
                "64",
                "--max-prompt-length",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "prompt (not trained):" in out and "chosen (trained," in out and "rejected (trained," in out
    assert "skipped identical_chosen_rejected: 1" in out
    assert "truncated prompt:" in out and "=== lengths" in out


def test_eval_fraction_holds_out_the_same_rows_wherever_the_file_is(tokenizer, tmp_path: Path) -> None:
    """The held-out rows once depended on the file's full path: the demo's reward model was measured on other pairs
    in another output folder, and tests on other rows every session."""
    from dpokit.config import DataConfig
    from dpokit.data.prepare import prepare_data

    rows = hh_rows(60)
    held_out = []
    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        data = write_jsonl(tmp_path / folder / "pairs.jsonl", rows)
        config = DataConfig(train_path=str(data), eval_fraction=0.25, max_length=96, max_prompt_length=48)
        held_out.append([e.source.rpartition(":")[2] for e in prepare_data(config, tokenizer, "pairs").eval])
    assert held_out[0] == held_out[1] and 5 <= len(held_out[0]) <= 25
