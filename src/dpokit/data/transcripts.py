"""Anthropic HH transcripts (`\\n\\nHuman: … \\n\\nAssistant: …`) and chat message lists: splitting a pair of whole
conversations at the last assistant turn, and turning a transcript into messages for a chat template."""

from __future__ import annotations

from dpokit.data.report import DataError

Message = dict[str, str]
Text = str | list[Message]
HH_ASSISTANT = "\n\nAssistant:"


def split_implicit(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text] | None:
    """Split two whole transcripts at the last assistant turn; None when their prompts differ."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: implicit-prompt message lists must end with an assistant message", "malformed_transcript"
            )
        if chosen[:-1] != rejected[:-1]:
            return None
        return chosen[:-1], [chosen[-1]], [rejected[-1]]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise DataError(
                f"{where}: field 'chosen' has no '\\n\\nAssistant:' turn to split the prompt at", "malformed_transcript"
            )
        prompt = chosen[: cut + len(HH_ASSISTANT)]
        if not rejected.startswith(prompt):
            return None
        return prompt, chosen[len(prompt) :], rejected[len(prompt) :]
    raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists", "wrong_type")


def hh_messages(transcript: str) -> list[Message]:
    """`\n\nHuman: a\n\nAssistant: b` -> [{user: a}, {assistant: b}] (the last turn may be empty)."""
    messages: list[Message] = []
    for turn in transcript.split("\n\n"):
        for marker, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if turn.startswith(marker):
                messages.append({"role": role, "content": turn[len(marker) :].strip()})
                break
        else:
            if messages:  # a paragraph break inside a turn
                messages[-1]["content"] += "\n\n" + turn
    return messages


def as_chat(prompt: str, completions: tuple[str, ...]) -> tuple[list[Message], tuple[list[Message], ...]]:
    """An HH prompt and its completions as messages, for rendering with the model's own chat template."""
    messages = hh_messages(prompt)
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    return messages, tuple([{"role": "assistant", "content": c.strip()}] for c in completions)
