"""Pairwise judges behind one small interface, named as on the command line:

- `rm:PATH`             a reward model (`dpokit rm`, or any sequence-classification folder): the higher score wins
- `implicit:POLICY,REF` the DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) (arXiv 2305.18290v3, Sec. 5)
- `hf:PATH`             a local causal LM asked the paper's judging question; the verdict is the likelier of the
                        answer tokens `A` and `B` at the answer position (no free text to parse)
- `openai:MODEL`        any OpenAI-compatible chat endpoint with the paper's prompt (`dpokit.eval.openai_judge`)

A judge sees comparisons (prompt, answer A, answer B) and returns one verdict each: "A", "B", "tie", or None when it
gave no usable answer (counted and reported by the caller, never guessed). Scorers (rm, implicit) do not see the
order; the LLM judges do, which is why `dpokit winrate` randomises it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from dpokit.config import DataConfig, load_config
from dpokit.data.formats import Record
from dpokit.data.report import DataReport
from dpokit.data.tokenize import TokenizedExample, tokenize_record
from dpokit.data.transcripts import Text, hh_messages
from dpokit.errors import UserError
from dpokit.eval.templates import TEMPLATES, Template, prompt_text
from dpokit.generate import left_pad

Outcome = Literal["A", "B", "tie"]


class JudgeError(UserError, ValueError):
    """A judge name or option a person can fix."""


@dataclass(frozen=True)
class Comparison:
    prompt: Text
    a: str
    b: str


@dataclass
class Verdict:
    outcome: Outcome | None
    """None: no usable verdict (see `problem`)."""
    problem: str | None = None
    """`unparseable` (an answer not in the template's format) or `failed` (no answer after the retries)."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Scores, probabilities or the judge's raw answer."""


class Judge(Protocol):
    name: str
    order_matters: bool
    """False for scorers, which judge each answer alone."""

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]: ...


def by_score(score_a: float, score_b: float) -> Verdict:
    outcome: Outcome = "A" if score_a > score_b else "B" if score_b > score_a else "tie"
    return Verdict(outcome, detail={"score_a": score_a, "score_b": score_b})


class Scorer(Protocol):
    memo: dict[str, float]

    def scores(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]: ...


def judge_by_scores(scorer: Scorer, comparisons: Sequence[Comparison]) -> list[Verdict]:
    """Verdicts of a scorer: each distinct (prompt, answer) scored once per judge (a chosen response meets many
    samples, a sample several baselines)."""
    keys = {}
    for c in comparisons:
        for answer in (c.a, c.b):
            keys[json.dumps([c.prompt, answer])] = (c.prompt, answer)
    todo = [k for k in keys if k not in scorer.memo]
    if todo:
        found = scorer.scores([keys[k][0] for k in todo], [keys[k][1] for k in todo])
        scorer.memo.update(zip(todo, found, strict=True))
    score = {k: scorer.memo[k] for k in keys}
    return [by_score(score[json.dumps([c.prompt, c.a])], score[json.dumps([c.prompt, c.b])]) for c in comparisons]


def saved_data_config(folder: str) -> DataConfig:
    """The `data` settings a dpokit run saved with its model (how it rendered prompts), or the defaults."""
    path = Path(folder) / "dpokit_config.yaml"
    return load_config(path).data if path.exists() else DataConfig()


def render(tokenizer: Any, data: DataConfig, prompt: Text, answer: str, where: str) -> TokenizedExample:
    """prompt + answer tokenized as training tokenizes a row (chat template when the run used one)."""
    completion: Text = answer
    if data.chat and isinstance(prompt, str):  # as training's data.chat renders HH transcripts (answers stripped)
        messages = [m for m in hh_messages(prompt) if m["content"] or m["role"] != "assistant"]
        prompt = messages or [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        completion = [{"role": "assistant", "content": answer.strip()}]
    example = tokenize_record(
        Record(prompt, (completion,), where), tokenizer, data.max_length, data.max_prompt_length, DataReport()
    )
    assert example is not None  # one completion is never dropped
    return example


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModelJudge:
    """`rm:PATH`: r(x, y) from a sequence-classification model; the answer with the higher reward wins."""

    order_matters = False

    def __init__(self, path: str, batch_size: int = 16, data: DataConfig | None = None) -> None:
        from dpokit.rm import load_reward_model

        if not Path(path).exists():
            raise JudgeError(f"judge rm:{path}: no such reward model folder (train one with `dpokit rm`)")
        self.name = f"rm:{path}"
        self.model, self.tokenizer = load_reward_model(path)
        self.model.to(_device()).eval()
        self.data = data or saved_data_config(path)
        self.batch_size = batch_size
        self.memo: dict[str, float] = {}

    def scores(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
        from dpokit.rm import score_texts

        return score_texts(self.model, self.tokenizer, prompts, answers, self.data, self.batch_size)

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        return judge_by_scores(self, comparisons)


class ImplicitRewardJudge:
    """`implicit:POLICY,REF`: r̂(x, y) = β·(log π(y|x) − log π_ref(y|x)), β from the policy's saved config."""

    order_matters = False

    def __init__(self, policy: str, reference: str, beta: float | None = None, batch_size: int = 16) -> None:
        from dpokit.model import load_model, load_tokenizer

        self.name = f"implicit:{policy},{reference}"
        self.policy = load_model(policy).to(_device()).eval()
        self.reference = load_model(reference).to(_device()).eval()
        self.tokenizer = load_tokenizer(policy)
        saved = Path(policy) / "dpokit_config.yaml"
        self.beta = beta if beta is not None else (load_config(saved).loss.beta if saved.exists() else 0.1)
        self.data = saved_data_config(policy)
        self.batch_size = batch_size
        self.memo: dict[str, float] = {}

    def scores(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
        from dpokit.eval.frontier import completion_logps

        pairs = zip(prompts, answers, strict=True)
        examples = [render(self.tokenizer, self.data, p, a, f"answer {i}") for i, (p, a) in enumerate(pairs)]
        ids = [e.prompt_ids for e in examples], [e.completion_ids[0] for e in examples]
        pad = self.tokenizer.pad_token_id
        policy = completion_logps(self.policy, *ids, pad, self.batch_size)
        reference = completion_logps(self.reference, *ids, pad, self.batch_size)
        return (self.beta * (policy - reference)).tolist()

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        return judge_by_scores(self, comparisons)


class LocalLMJudge:
    """`hf:PATH`: the paper's question to a local causal LM, answered by the log-probabilities of the tokens `A` and
    `B` right after `<verdict label>:` in the assistant's turn.

    Small models answer mostly by position (SmolLM2-135M-Instruct says A about 90% of the time whatever A is), so by
    default (`debias`) each comparison is asked in both orders and the verdict is the sign of the mean log-odds
    [log p(A) − log p(B)]_(A, B) − [log p(A) − log p(B)]_(B, A): a constant position bias cancels, and the order in
    which the caller puts the answers no longer matters."""

    def __init__(self, path: str, template: Template, batch_size: int = 8, debias: bool = True) -> None:
        from dpokit.model import load_model, load_tokenizer

        self.name, self.template, self.batch_size = f"hf:{path}", template, batch_size
        self.debias, self.order_matters = debias, not debias
        self.model = load_model(path).to(_device()).eval()
        self.tokenizer = load_tokenizer(path)
        self.answer_ids = [self._answer_token(x) for x in ("A", "B")]

    def _context(self, c: Comparison) -> str:
        question = self.template.render_verdict_only(prompt_text(c.prompt), c.a, c.b)
        head = f"{self.template.verdict_label}:"
        if self.tokenizer.chat_template is None:
            return f"{question}\n\n{head}"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered) + head

    def _answer_token(self, letter: str) -> int:
        """The one token that `<context> A` adds to `<context>` (with or without a space before the letter)."""
        context = f"{self.template.verdict_label}:"
        base = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        for text in (f" {letter}", letter):
            ids = self.tokenizer(context + text, add_special_tokens=False)["input_ids"]
            if len(ids) == len(base) + 1 and ids[: len(base)] == base:
                return int(ids[-1])
        raise JudgeError(f"{self.name}: the answer '{letter}' is not a single token after '{context}'")

    @torch.no_grad()
    def log_odds(self, comparisons: Sequence[Comparison]) -> list[float]:
        """log p(A) − log p(B) at the answer position, for each comparison as given."""
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(comparisons), self.batch_size):
            chunk = comparisons[start : start + self.batch_size]
            ids = [self.tokenizer(self._context(c), add_special_tokens=False)["input_ids"] for c in chunk]
            input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id, device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            lm = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
            logits = lm.logits[:, -1]
            pair = torch.log_softmax(logits.float(), dim=-1)[:, self.answer_ids]  # (B, 2)
            out += (pair[:, 0] - pair[:, 1]).tolist()
        return out

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        given = self.log_odds(comparisons)
        if not self.debias:
            return [Verdict(by_score(x, 0.0).outcome, detail={"log_odds_A": x}) for x in given]
        swapped = self.log_odds([Comparison(c.prompt, c.b, c.a) for c in comparisons])
        return [
            Verdict(by_score(x - y, 0.0).outcome, detail={"log_odds_A": x, "log_odds_A_swapped": y})
            for x, y in zip(given, swapped, strict=True)
        ]


def make_judge(spec: str, template: str = "dialogue", **options: Any) -> Judge:
    """A judge from its name: `rm:PATH`, `implicit:POLICY,REF`, `hf:PATH` or `openai:MODEL`. Options: `batch_size`
    (local judges), `beta` (implicit), `debias` (hf), and those of `OpenAIJudge` (openai)."""
    kind, _, target = spec.partition(":")
    if not target:
        raise JudgeError(f"judge '{spec}': expected rm:PATH, implicit:POLICY,REF, hf:PATH or openai:MODEL")
    if template not in TEMPLATES:
        raise JudgeError(f"judge template '{template}' is not one of: {', '.join(TEMPLATES)}")
    batch = {"batch_size": options["batch_size"]} if options.get("batch_size") else {}
    if kind == "rm":
        return RewardModelJudge(target, **batch)
    if kind == "implicit":
        parts = target.split(",")
        if len(parts) != 2 or not all(parts):
            raise JudgeError(f"judge '{spec}': implicit needs two models, implicit:POLICY,REF")
        return ImplicitRewardJudge(parts[0], parts[1], options.get("beta"), **batch)
    if kind == "hf":
        return LocalLMJudge(target, TEMPLATES[template], debias=options.get("debias", True), **batch)
    if kind == "openai":
        from dpokit.eval.openai_judge import OpenAIJudge

        keys = ("base_url", "api_key_env", "concurrency", "timeout", "max_retries", "cache", "backoff")
        return OpenAIJudge(target, TEMPLATES[template], **{k: options[k] for k in keys if options.get(k) is not None})
    raise JudgeError(f"judge '{spec}': unknown kind '{kind}'; use rm:, implicit:, hf: or openai:")
