"""Every file in ../shared/data through the real adapters, with the counts of its SOURCE.md; the other file
formats (JSON, Parquet, save_to_disk) and row formats on files made from the same real data."""

import json
from pathlib import Path

import pytest

from dpokit.data.formats import FORMATS, Record, RowContext, RowFormat, detect_format, load_records
from dpokit.data.report import DataError
from tests.conftest import HH, IMDB, ULTRAFEEDBACK_EVAL, ULTRAFEEDBACK_TRAIN, VADER, write_jsonl

# SOURCE.md of hh-rlhf: rows, chosen == rejected, prompt mismatch; then replies that are only whitespace once split
# from the prompt (issue 14 counted them: 4 in harmless-base, 7 in helpful-*), skipped as empty_chosen/rejected.
HH_COUNTS = {
    "harmless-base": (2312, 0, 4, 4),
    "helpful-base": (2354, 2, 2, 4),
    "helpful-online": (1137, 2, 0, 3),
    "helpful-rejection-sampled": (2749, 32, 1, 0),
}


@pytest.mark.parametrize("subset", list(HH_COUNTS))
def test_hh_subsets_load_with_quirks_counted(subset: str) -> None:
    rows, identical, mismatch, blank = HH_COUNTS[subset]
    records, report = load_records(HH[subset])
    assert report.loaded == rows
    assert report.skipped.get("identical_chosen_rejected", 0) == identical
    assert report.skipped.get("prompt_mismatch", 0) == mismatch
    assert report.skipped.get("empty_chosen", 0) + report.skipped.get("empty_rejected", 0) == blank
    assert all(c.strip() for r in records for c in r.completions)
    assert len(records) == rows - identical - mismatch - blank == report.records
    first = records[0]
    assert first.prompt.startswith("\n\nHuman:") and first.prompt.endswith("\n\nAssistant:")
    assert not first.completions[0].startswith("\n\nAssistant:")


def test_hh_quirk_locations_are_reported() -> None:
    _, report = load_records(HH["helpful-base"])
    assert all(":" in place for place in report.where["prompt_mismatch"])
    assert any("prompt_mismatch: 2" in line for line in report.lines())


@pytest.mark.parametrize(
    ("path", "rows", "identical", "empty"), [(ULTRAFEEDBACK_TRAIN, 1000, 4, 2), (ULTRAFEEDBACK_EVAL, 200, 1, 0)]
)
def test_ultrafeedback_loads(path: Path, rows: int, identical: int, empty: int) -> None:
    """SOURCE.md counts rows and identical pairs; the train file also has one empty chosen (line 834) and one
    empty rejected (line 479), which SOURCE.md does not list: they are skipped and counted."""
    records, report = load_records(path)
    assert report.loaded == rows
    assert report.skipped["identical_chosen_rejected"] == identical
    assert report.skipped["empty_chosen"] + report.skipped["empty_rejected"] == empty
    assert len(records) == rows - identical - empty


def test_imdb_reviews_load_as_text() -> None:
    records, report = load_records(IMDB, use="sft", text_field="review")
    assert report.loaded == len(records) == 5000
    assert records[0].prompt == "" and len(records[0].completions) == 1


def test_vader_snippets_load_as_text() -> None:
    records, report = load_records(VADER, use="sft")
    assert report.loaded == len(records) == 10605
    assert "\t" not in records[0].completions[0]


def _ultrafeedback_rows(n: int) -> list[dict]:
    with ULTRAFEEDBACK_TRAIN.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def test_json_parquet_and_save_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = _ultrafeedback_rows(20)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    expected, _ = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    for name in ("d.json", "d.parquet", "disk"):
        records, report = load_records(tmp_path / name)
        assert [r.completions for r in records] == [r.completions for r in expected], name
        assert report.loaded == 20


def test_conversational_rows(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in _ultrafeedback_rows(5)
    ]
    records, _ = load_records(write_jsonl(tmp_path / "c.jsonl", rows))
    assert len(records) == 5 and records[0].is_chat
    assert records[0].completions[0][0]["role"] == "assistant"


def test_implicit_message_lists(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "hi"}]
    rows = [
        {
            "chosen": user + [{"role": "assistant", "content": "hello"}],
            "rejected": user + [{"role": "assistant", "content": "go"}],
        },
        {
            "chosen": user + [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
        },
    ]
    records, report = load_records(write_jsonl(tmp_path / "i.jsonl", rows))
    assert records == [
        Record(
            user,
            ([{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "go"}]),
            f"{tmp_path / 'i.jsonl'}:1",
        )
    ]
    assert report.skipped["prompt_mismatch"] == 1


def test_pairs_and_rankings(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "pairs": [[0, 1], [2, 1]]}]
    records, _ = load_records(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [r.completions for r in records] == [("a", "b"), ("c", "b")]
    sft, _ = load_records(tmp_path / "p.jsonl", use="sft")
    assert [r.completions for r in sft] == [("a",), ("c",)]
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    ranked, _ = load_records(path, use="ranked")
    assert ranked[0].completions == ("c", "a", "b")
    pairs, _ = load_records(path)
    assert [r.completions for r in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]


def test_sft_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q", "completion": "A"}])
    assert load_records(path, use="sft")[0][0].completions == ("A",)
    with pytest.raises(DataError, match="no preference"):
        load_records(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
        ('{"prompt": "p", "chosen": "a", "rejected": 3}', "field 'rejected' must be a string"),
        ('{"prompt": 7, "chosen": "a", "rejected": "b"}', "field 'prompt' must be a string"),
        ('{"prompt": "p", "chosen": "a", "rejected": ', "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (
            '{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}',
            "field 'chosen' must be a string, got list",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        load_records(path)
    assert f"{path}:2" in str(err.value)
    records, report = load_records(path, on_error="skip")
    assert len(records) == 1 and sum(report.skipped.values()) == 1


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: bytes that are not UTF-8"):
        load_records(path)
    assert load_records(path, on_error="skip")[1].skipped["not_utf8"] == 1


def test_bad_ranking_indices(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 5]}])
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'ranking' has an index outside 0..1"):
        load_records(path, use="ranked")


def test_empty_completions_are_counted_not_trained(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "  "}],
    )
    records, report = load_records(path)
    assert len(records) == 1 and report.skipped["empty_rejected"] == 1
    assert report.where["empty_rejected"] == [f"{path}:2"]


def test_message_fields_are_checked(tmp_path: Path) -> None:
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'chosen\[0\]' must be a \{role, content\} message"):
        load_records(write_jsonl(tmp_path / "c.jsonl", [row]))


def test_hh_transcripts_as_chat_messages() -> None:
    records, _ = load_records(HH["helpful-base"], chat=True)
    prompt, (chosen, rejected) = records[0].prompt, records[0].completions
    assert prompt[0]["role"] == "user" and prompt[-1]["role"] == "user"
    assert chosen[0]["role"] == rejected[0]["role"] == "assistant"
    assert not chosen[0]["content"].startswith(" ")


def test_a_row_format_is_one_function_and_one_table_entry(tmp_path: Path, monkeypatch) -> None:
    """A toy comparisons format ({post, summaries, choice}) added to the table alone is detected, read, and its
    fields become another format's unexpected fields."""

    def comparison_rows(row: dict, ctx: RowContext) -> list[Record]:
        better = row["summaries"][row["choice"]]
        return [Record(row["post"], (better, row["summaries"][1 - row["choice"]]), ctx.where)]

    toy = RowFormat("comparison", ("post", "summaries", "choice"), comparison_rows)
    monkeypatch.setitem(FORMATS, "comparison", toy)
    path = write_jsonl(tmp_path / "c.jsonl", [{"post": "p", "summaries": ["a", "b"], "choice": 1, "id": 3}])
    records, report = load_records(path)
    assert records == [Record("p", ("b", "a"), f"{path}:1")] and report.ignored_fields == {"id": 1}
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "choice": 0}])
    with pytest.raises(DataError, match=r"s.jsonl:1: unexpected field 'choice' in a standard row"):
        load_records(path)


def test_every_row_format_can_be_configured() -> None:
    from typing import get_args

    from dpokit.config import DataFormat

    assert set(get_args(DataFormat)) == {"auto", *FORMATS}


def test_unknown_fields_name_the_configured_text_field() -> None:
    with pytest.raises(DataError, match=r"f:1: cannot tell the format from fields \['body'\]; expected .* or review$"):
        detect_format({"body": "x"}, "f:1", text_field="review")
