"""The TL;DR comparisons of openai/summarize-from-feedback as a row format (fixtures written here: the data cannot
be fetched on this machine), and the paper's summarisation judging prompt."""

from __future__ import annotations

import pytest

from dpokit.data.formats import load_records, sniff_format
from dpokit.data.report import DataError
from dpokit.eval.judges import Comparison
from dpokit.eval.templates import SUMMARIZATION, SUMMARIZATION_SIMPLE, TEMPLATES, parse_verdict, prompt_text
from tests.conftest import write_jsonl

POST = {
    "id": "t3_abc",
    "subreddit": "relationships",
    "title": "My roommate eats my food",
    "post": "Every week my roommate finishes my groceries and says sorry. What should I do?",
}


def comparison(choice: int, info: dict | None = None, texts: tuple[str, str] = (" Talk to them.", "Move out")) -> dict:
    """A row shaped like the `comparisons` configuration of openai/summarize_from_feedback."""
    return {
        "info": info or POST,
        "summaries": [
            {"text": texts[0], "policy": "sup2", "note": ""},
            {"text": texts[1], "policy": "ppo", "note": None},
        ],
        "choice": choice,
        "worker": "w1",
        "batch": "batch3",
        "split": "train",
        "extra": {"confidence": 7},
    }


def test_tldr_rows(tmp_path) -> None:
    article = {"id": "cnn1", "article": "A storm hit the coast on Monday.", "site": "cnn", "title": None, "post": None}
    rows = [comparison(0), comparison(1), comparison(1, article, (" Storm.", " Sun."))]
    path = write_jsonl(tmp_path / "tldr.jsonl", rows)
    assert sniff_format(path) == "tldr"
    records, report = load_records(path)
    prompt = (
        "SUBREDDIT: r/relationships\n\nTITLE: My roommate eats my food\n\nPOST: Every week my roommate finishes my "
        "groceries and says sorry. What should I do?\n\nTL;DR:"
    )
    assert [(r.prompt, r.completions) for r in records] == [
        (prompt, (" Talk to them.", " Move out")),
        (prompt, (" Move out", " Talk to them.")),
        ("Article:\nA storm hit the coast on Monday.\n\nTL;DR:", (" Sun.", " Storm.")),
    ]
    assert report.ignored_fields["worker"] == 3  # extra fields are read past and counted
    sft, _ = load_records(path, "tldr", "sft")
    assert [r.completions for r in sft] == [(" Talk to them.",), (" Move out",), (" Sun.",)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (comparison(2), "'choice' must be 0 or 1"),
        (comparison(True), "'choice' must be 0 or 1"),
        (comparison(0) | {"summaries": [{"text": "only one"}]}, "list of two"),
        (comparison(0) | {"info": {"title": "no post"}}, "'info' must hold a 'post'"),
    ],
)
def test_malformed_tldr_rows(tmp_path, row, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [comparison(0), row])
    with pytest.raises(DataError, match=message):
        load_records(path, "tldr")
    _, report = load_records(path, "tldr", on_error="skip")
    assert len(report.messages) == 1 and sum(report.skipped.values()) == 1


def test_empty_summary_is_skipped_and_counted(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [comparison(0), comparison(0, texts=(" ok", "  "))])
    records, report = load_records(path, "tldr")
    assert len(records) == 1 and report.skipped["empty_summaries"] == 1


def test_summarization_prompt() -> None:
    """The paper's prompt (C) (concise) with the post (without its `TL;DR:` cue) and both summaries in order; the
    verdict line is `Preferred:`."""
    prompt = load_records_prompt()
    text = SUMMARIZATION.render(prompt_text(prompt), " Talk to them.", "Move out")
    assert text.startswith("Which of the following summaries does a better job of summarizing the most important")
    assert "without including unimportant or irrelevant details? A good summary is both precise and concise." in text
    assert "Post: SUBREDDIT: r/relationships\n\nTITLE: My roommate" in text and "TL;DR:" not in text
    assert "Summary A:\nTalk to them.\n\nSummary B:\nMove out\n\n" in text
    assert text.endswith('Preferred: <"A" or "B">')
    assert parse_verdict("Comparison: A is concise.\nPreferred: A", SUMMARIZATION) == "A"
    assert parse_verdict("More helpful: A", SUMMARIZATION) is None
    assert "precise and concise" not in SUMMARIZATION_SIMPLE.render("p", "a", "b")
    assert set(TEMPLATES) == {"dialogue", "summarization", "summarization-simple"}
    assert Comparison(prompt, "a", "b").prompt == prompt


def load_records_prompt() -> str:
    return f"SUBREDDIT: r/relationships\n\nTITLE: {POST['title']}\n\nPOST: {POST['post']}\n\nTL;DR:"
