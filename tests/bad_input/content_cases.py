"""Bad-input cases: content the row checks used to miss (each skipped and counted by reason, and a file with nothing
left refused naming the reasons), held-out data with nothing in it, and models that do not fit together."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bad_input import CONTENT, RUN_ARGS, Case, World

HH = "\n\nHuman: Hi there\n\nAssistant:"


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _rows(row: dict[str, Any], n: int = 6) -> Callable[[World], None]:
    """`n` copies of `row` (a little varied, so that no other rule applies) as {root}/c.jsonl."""

    def write(world: World) -> None:
        text = json.dumps(row)
        lines = [text.replace("Hi there", f"Hi there {i}") for i in range(n)]
        (world.root / "c.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    return write


def quirk(name: str, row: dict[str, Any], reason: str, command: str = "dpo", *extra: str) -> Case:
    """Every row has the quirk: the run is refused, and the count by reason (with a place) is in the message."""
    args = (command, *RUN_ARGS, "data.train_path={root}/c.jsonl", *extra)
    return Case(
        name, CONTENT, args, ("no usable training rows", f"skipped {reason}: 6  (e.g. {{root}}/c.jsonl:1"), _rows(row)
    )


def validated(name: str, row: dict[str, Any], reason: str) -> Case:
    """`validate` counts the same reason, and exits 1: no row is left to train on."""
    return Case(
        name,
        CONTENT,
        ("validate", "{root}/c.jsonl"),
        (f"skipped {reason}: 6", "no usable rows"),
        _rows(row),
        code=1,
        said="out",
    )


STANDARD = {"prompt": "Hi there", "chosen": "yes", "rejected": "no"}
CONVERSATION = {
    "prompt": _messages(("user", "Hi there")),
    "chosen": _messages(("assistant", "yes")),
    "rejected": _messages(("assistant", "no")),
}
SPANS_A_USER_TURN = CONVERSATION | {"chosen": _messages(("assistant", "a"), ("user", "b"), ("assistant", "c"))}
HUMAN_ROLE = CONVERSATION | {"prompt": _messages(("human", "Hi there"))}


def _model_copy(change: Callable[[Path], object]) -> Callable[[World], None]:
    """{root}/m2: the tiny model, changed."""

    def copy(world: World) -> None:
        change(Path(shutil.copytree(world.model, world.root / "m2")))

    return copy


def _template(text: str) -> Callable[[Path], None]:
    def write(model: Path) -> None:
        (model / "chat_template.jinja").write_text(text, encoding="utf-8")

    return write


REFUSES_USER = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('no user turns here') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)


def _resized(rows: int) -> Callable[[Path], None]:
    def resize(model: Path) -> None:
        from transformers import AutoModelForCausalLM

        network = AutoModelForCausalLM.from_pretrained(model)
        network.resize_token_embeddings(rows)
        network.save_pretrained(model)

    return resize


def _context(window: int) -> Callable[[Path], None]:
    def shrink(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": window}))

    return shrink


def _no_template(model: Path) -> None:
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))


def _eval_file(content: str) -> Callable[[World], None]:
    return lambda world: (world.root / "e.jsonl").write_text(content, encoding="utf-8")


CASES: list[Case] = [
    # --- 7. content the row checks missed ---------------------------------------------------------------------------
    quirk("whitespace-chosen", STANDARD | {"chosen": "  \n"}, "empty_chosen"),
    quirk("whitespace-rejected", STANDARD | {"rejected": "\t"}, "empty_rejected"),
    quirk("hh-reply-a-single-space", {"chosen": HH + " ", "rejected": HH + " no"}, "empty_chosen"),
    quirk("hh-reply-empty-rejected", {"chosen": HH + " yes", "rejected": HH}, "empty_rejected"),
    quirk("completion-spans-a-user-turn", SPANS_A_USER_TURN, "completion_not_assistant"),
    quirk(
        "completion-is-a-user-turn", CONVERSATION | {"rejected": _messages(("user", "no"))}, "completion_not_assistant"
    ),
    quirk("unknown-role-in-prompt", HUMAN_ROLE, "unknown_role"),
    quirk("unknown-role-in-completion", CONVERSATION | {"chosen": _messages(("gpt", "yes"))}, "unknown_role"),
    quirk("empty-assistant-message", CONVERSATION | {"chosen": _messages(("assistant", ""))}, "empty_chosen"),
    quirk("blank-assistant-rejected", CONVERSATION | {"rejected": _messages(("assistant", " "))}, "empty_rejected"),
    quirk(
        "sft-completion-spans-a-user-turn",
        {"prompt": CONVERSATION["prompt"], "completion": SPANS_A_USER_TURN["chosen"]},
        "completion_not_assistant",
        "sft",
    ),
    quirk("pairs-empty", {"prompt": "Hi there", "responses": ["a", "b"], "pairs": []}, "no_pairs"),
    quirk(
        "ranking-blank-response", {"prompt": "Hi there", "responses": ["a", " "], "ranking": [0, 1]}, "empty_response"
    ),
    quirk("identical-pair", STANDARD | {"rejected": "yes"}, "identical_chosen_rejected"),
    quirk(
        "implicit-prompts-differ",
        {"chosen": HH + " yes", "rejected": "\n\nHuman: Other\n\nAssistant: no"},
        "prompt_mismatch",
    ),
    validated("validate-whitespace-completion", STANDARD | {"chosen": " "}, "empty_chosen"),
    validated("validate-spans-a-user-turn", SPANS_A_USER_TURN, "completion_not_assistant"),
    validated("validate-unknown-role", HUMAN_ROLE, "unknown_role"),
    validated("validate-pairs-empty", {"prompt": "Hi there", "responses": ["a", "b"], "pairs": []}, "no_pairs"),
    Case(
        "validate-empty-file",
        CONTENT,
        ("validate", "{root}/c.jsonl"),
        ("rows loaded: 0", "no usable rows"),
        lambda w: (w.root / "c.jsonl").write_text(""),
        code=1,
        said="out",
    ),
    Case(
        "validate-blank-lines-only",
        CONTENT,
        ("validate", "{root}/c.jsonl"),
        ("no usable rows",),
        lambda w: (w.root / "c.jsonl").write_text("\n\n  \n"),
        code=1,
        said="out",
    ),
    # --- tokenization-time problems: a line and a reason, and data.on_error=skip counts them ----------------------
    Case(
        "chat-template-refuses",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2", "data.train_path={root}/c.jsonl"),
        ("{root}/c.jsonl:1", "chat template refuses this conversation", "no user turns here"),
        lambda w: (_model_copy(_template(REFUSES_USER))(w), _rows(CONVERSATION)(w)),
    ),
    Case(
        "chat-template-refuses-skip",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2", "data.train_path={root}/c.jsonl", "data.on_error=skip"),
        ("skipped chat_template: 6",),
        lambda w: (_model_copy(_template(REFUSES_USER))(w), _rows(CONVERSATION)(w)),
        said="out",
    ),
    Case(
        "no-chat-template",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2", "data.train_path={root}/c.jsonl"),
        ("{root}/c.jsonl:1", "need a tokenizer with a chat template"),
        lambda w: (_model_copy(_no_template)(w), _rows(CONVERSATION)(w)),
    ),
    Case(
        "no-chat-template-skip",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2", "data.train_path={root}/c.jsonl", "data.on_error=skip"),
        ("skipped no_chat_template: 6",),
        lambda w: (_model_copy(_no_template)(w), _rows(CONVERSATION)(w)),
        said="out",
    ),
    # --- 4. held-out data with nothing in it --------------------------------------------------------------------------
    Case(
        "eval-file-empty",
        CONTENT,
        ("dpo", *RUN_ARGS, "data.eval_path={root}/e.jsonl"),
        ("{root}/e.jsonl", "no usable held-out examples"),
        _eval_file(""),
    ),
    Case(
        "eval-file-all-quirks",
        CONTENT,
        ("dpo", *RUN_ARGS, "data.eval_path={root}/e.jsonl"),
        ("{root}/e.jsonl", "no usable held-out examples", "identical_chosen_rejected"),
        _eval_file(json.dumps(STANDARD | {"rejected": "yes"}) + "\n"),
    ),
    Case(
        "eval-fraction-holds-out-nothing",
        CONTENT,
        ("dpo", *RUN_ARGS, "data.eval_fraction=0.0001"),
        ("data.eval_fraction=0.0001", "no usable held-out examples"),
    ),
    # --- 4. models that do not fit together ---------------------------------------------------------------------------
    Case(
        "reference-other-tokenizer",
        CONTENT,
        ("dpo", *RUN_ARGS, "reference.mode=path", "reference.path={root}/m2"),
        ("reference.path={root}/m2", "another tokenizer"),
        _model_copy(_template("{{ messages }}")),
    ),
    Case(
        "reference-larger-vocabulary",
        CONTENT,
        ("dpo", *RUN_ARGS, "reference.mode=path", "reference.path={root}/m2"),
        ("reference.path={root}/m2", "scores 416 token ids"),
        _model_copy(_resized(416)),
    ),
    Case(
        "model-smaller-than-its-tokenizer",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2"),
        ("{root}/m2", "scores 64"),
        _model_copy(_resized(64)),
    ),
    Case(
        "max-length-beyond-context",
        CONTENT,
        ("dpo", *RUN_ARGS, "model.path={root}/m2"),
        ("data.max_length=64", "max_position_embeddings=32"),
        _model_copy(_context(32)),
    ),
    Case(
        "precompute-reference-other-tokenizer",
        CONTENT,
        ("precompute-ref", *RUN_ARGS, "reference.path={root}/m2", "reference.cache={root}/r.st"),
        ("reference.path={root}/m2", "another tokenizer"),
        _model_copy(_template("{{ messages }}")),
    ),
]
