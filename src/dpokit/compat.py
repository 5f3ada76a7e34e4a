"""Do the model, its tokenizer, the reference and the length settings fit together? Checked when they load, before a
step runs: a reference with another tokenizer or vocabulary gives log-probs of other tokens (silently wrong with a
larger vocabulary, an index error with a smaller one), and positions beyond the model's context window are either an
index error or garbage."""

from __future__ import annotations

from typing import Any

from dpokit.config import RunConfig
from dpokit.errors import ConfigError, UserError


class IncompatibleModels(UserError):
    """The policy, its tokenizer and the reference do not fit together."""


def vocabulary(model: Any) -> int:
    """Rows of the model's output layer: the token ids it scores."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_policy(config: RunConfig, tokenizer: Any, model: Any, given: str) -> None:
    """The tokenizer's ids must be rows of the model, and `data.max_length` positions must fit its context."""
    if len(tokenizer) > vocabulary(model):
        raise IncompatibleModels(
            f"{given}: its tokenizer has {len(tokenizer)} tokens but the model scores {vocabulary(model)}; token ids "
            "beyond that have no row. Use the tokenizer saved with this model"
        )
    window = getattr(model.config, "max_position_embeddings", None)
    if isinstance(window, int) and config.data.max_length > window:
        raise ConfigError(
            f"data.max_length={config.data.max_length} is beyond the context window of {given} "
            f"(max_position_embeddings={window}); set data.max_length to {window} or less (longer examples are then "
            "truncated, and counted)"
        )


def check_reference_tokenizer(config: RunConfig, tokenizer_digest: str) -> None:
    """reference.path must tokenize as model.path does: checked on the tokenizers alone, before any weights load."""
    from dpokit.model import load_tokenizer
    from dpokit.reference import tokenizer_digest as digest_of

    if config.reference.path is None:
        return
    if digest_of(load_tokenizer(config.reference.path)) != tokenizer_digest:
        raise IncompatibleModels(
            f"reference.path={config.reference.path} has another tokenizer (or chat template) than "
            f"model.path={config.model.path}: the same token ids would mean different text to the two models. Use a "
            "reference trained with model.path's tokenizer"
        )


def check_reference(config: RunConfig, policy: Any, reference: Any) -> None:
    """The reference scores the same token ids as the policy."""
    if vocabulary(reference) != vocabulary(policy):
        raise IncompatibleModels(
            f"reference.path={config.reference.path} scores {vocabulary(reference)} token ids and "
            f"model.path={config.model.path} {vocabulary(policy)}: their log-probs do not compare. Use a reference "
            "with model.path's vocabulary"
        )
