"""The judging prompts of the DPO paper and the strict parser of their answers.

Source: Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290v3, Appendix C.2 ("GPT-4 prompts
for computing summarization and dialogue win rates"); the paper judged with gpt-4-0314 and chose the order of the two
answers at random for every comparison. `summarization` is the paper's prompt (C) (concise), `summarization-simple`
its prompt (S).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from dpokit.data.transcripts import Text, hh_messages

Choice = Literal["A", "B"]


@dataclass(frozen=True)
class Template:
    name: str
    question: str
    """The opening question."""
    prompt_label: str
    answer_label: str
    """`Response` or `Summary`: the two answers are `<answer_label> A` and `<answer_label> B`."""
    closing: str
    verdict_label: str
    """The line that carries the verdict: `<verdict_label>: A`."""

    def render(self, prompt: str, a: str, b: str) -> str:
        return (
            f"{self.question}\n\n{self.prompt_label}: {prompt}\n\n"
            f"{self.answer_label} A:\n{a.strip()}\n\n{self.answer_label} B:\n{b.strip()}\n\n{self.closing}"
        )

    def render_verdict_only(self, prompt: str, a: str, b: str) -> str:
        """The same comparison, asking for the verdict line alone (for judges scored at the answer token)."""
        closing = f'State only "A" or "B" to indicate your choice, in the format:\n{self.verdict_label}: <"A" or "B">'
        return self.render(prompt, a, b).removesuffix(self.closing) + closing

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


DIALOGUE = Template(
    name="dialogue",
    question="For the following query to a chatbot, which response is more helpful?",
    prompt_label="Query",
    answer_label="Response",
    closing=(
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
        'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response '
        'should use the format:\nComparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">'
    ),
    verdict_label="More helpful",
)
_SUMMARY_CLOSING = (
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a "
    'new line, state only "A" or "B" to indicate your choice. Your response should use the format:\n'
    'Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">'
)
SUMMARIZATION = Template(
    name="summarization",
    question=(
        "Which of the following summaries does a better job of summarizing the most important points in the given "
        "forum post, without including unimportant or irrelevant details? A good summary is both precise and concise."
    ),
    prompt_label="Post",
    answer_label="Summary",
    closing=_SUMMARY_CLOSING,
    verdict_label="Preferred",
)
SUMMARIZATION_SIMPLE = Template(
    name="summarization-simple",
    question="Which of the following summaries does a better job of summarizing the most important points in the "
    "given forum post?",
    prompt_label="Post",
    answer_label="Summary",
    closing=_SUMMARY_CLOSING,
    verdict_label="Preferred",
)
TEMPLATES = {t.name: t for t in (DIALOGUE, SUMMARIZATION, SUMMARIZATION_SIMPLE)}


def parse_verdict(text: str, template: Template) -> Choice | None:
    """The verdict of an answer written in the template's format, or None when it is not there or is ambiguous.

    Strict: exactly one line `<verdict_label>: A` (or B), quotes, asterisks and a final period allowed around the
    letter; no guessing from free text.

    >>> parse_verdict('Comparison: B is vague.\\nMore helpful: A', DIALOGUE)
    'A'
    >>> parse_verdict('I prefer A.', DIALOGUE) is None
    True
    """
    pattern = re.compile(rf"^[\s*]*{re.escape(template.verdict_label)}[\s*]*:[\s*\"']*([AB])[\s*\"'.]*$")
    found = {m.group(1) for line in text.splitlines() if (m := pattern.match(line))}
    if len(found) != 1:
        return None
    choice = found.pop()
    return "A" if choice == "A" else "B"


def prompt_text(prompt: Text) -> str:
    """The query as a judge reads it: a single user turn as its text, a longer dialogue as a transcript."""
    if isinstance(prompt, str) and prompt.rstrip().endswith("TL;DR:"):  # a summarisation prompt: the post itself
        return prompt.rstrip().removesuffix("TL;DR:").strip()
    if isinstance(prompt, str):
        messages = hh_messages(prompt) if "\n\nHuman:" in prompt else [{"role": "user", "content": prompt.strip()}]
    else:
        messages = list(prompt)
    messages = [m for m in messages if m["content"] or m["role"] != "assistant"]
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)
