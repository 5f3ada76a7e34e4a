"""LoRA through `peft`: adapters on a frozen model, π_ref = the same model with its adapters disabled, adapter
checkpoints in PEFT's own format, and merging them back into plain weights.

Under LoRA one copy of the weights serves both the policy (adapters on) and the reference (adapters off): no second
model, and no gradients or optimizer state for the frozen weights. Only the adapters (and `modules_to_save`) train.

Tied embeddings: with `tie_word_embeddings` the LM head and the input embedding are one tensor. Adapters on either
module (or either in `modules_to_save`) change only that module's use of it while training; merging would write the
change into the shared tensor and so into both, so `merge` unties them first and the merged model stores both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit import distributed
from dpokit.config import LoraConfig
from dpokit.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft(model: Any) -> bool:
    """A `peft.PeftModel` (a model wrapped with adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: Any, lora: LoraConfig, base_path: str, revision: str | None = None) -> Any:
    """Wrap `model` with fresh LoRA adapters (B = 0, so the policy starts equal to the model); freeze the rest.
    `base_path` (model.path as given, a folder or Hub id) is recorded in the adapter's config, so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder)` finds its base (a local
    path is recorded absolute)."""
    if Path(base_path).exists():
        base_path = str(Path(base_path).resolve())
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if distributed.world_size() > 1:
        raise UserError(
            f"model.lora with {distributed.world_size()} processes: LoRA is not yet supported with torchrun / FSDP2 "
            "(adapters, the adapter-off reference and adapter checkpoints are single-process); run LoRA in one "
            "process, where one copy of the weights serves policy and reference"
        )
    targets: str | list[str] = list(lora.target_modules)
    if lora.target_modules == ("all-linear",):
        targets = "all-linear"
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
        revision=revision,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:  # peft names the modules it could not find
        raise UserError(f"model.lora.target_modules={list(lora.target_modules)}: {e}") from e
    wrapped.peft_config["default"].base_model_name_or_path = base_path
    return wrapped


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The base model: adapters disabled and, for the duration, eval mode (no adapter dropout either way)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield
    finally:
        model.train(was_training)


def adapter_off_reference(policy: Any, chunk: int) -> Any:
    """π_ref as (batch, split) -> (B, K) log-probs: the policy's own weights with its adapters disabled."""
    from dpokit.logprobs import batch_logps

    @torch.no_grad()
    def reference_logps(batch: Any, split: str) -> Tensor:
        with adapters_off(policy):
            return batch_logps(policy, batch, chunk).logps

    return reference_logps


def base_state_dict(model: Any) -> dict[str, Tensor]:
    """The frozen model's weights under their original names (as `model.state_dict()` gave them before wrapping):
    adapter weights and trained copies left out, `base_layer.` / `original_module.` taken out of the names."""
    out = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Put a saved adapter's weights into a model wrapped with the same adapter config (for `--resume`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(
            f"checkpoint {folder} holds adapter weights this model has no place for ({unexpected[:5]}); "
            "it was made with other model.lora settings"
        )


def _head_and_embedding_weights(model: Any) -> tuple[Any, Tensor, Tensor]:
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()

    def weight(module: Any) -> Tensor:
        if hasattr(module, "original_module"):  # modules_to_save wrapper: the frozen original
            module = module.original_module
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        return module.weight  # type: ignore[no-any-return]

    return head, weight(head), weight(embedding)


def merge(model: Any) -> Any:
    """Merge the adapters into the weights and return the plain model (untied first where needed, see above)."""
    base = model.get_base_model()
    head, head_weight, embedding_weight = _head_and_embedding_weights(base)
    touched = head is not None and (hasattr(head, "get_base_layer") or hasattr(head, "original_module"))
    embedding = base.get_input_embeddings()
    touched = touched or hasattr(embedding, "get_base_layer") or hasattr(embedding, "original_module")
    if head is not None and touched and head_weight is embedding_weight:
        untied = torch.nn.Parameter(head_weight.detach().clone(), requires_grad=False)
        target = head.original_module if hasattr(head, "original_module") else head
        target = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        target.weight = untied
        base.config.tie_word_embeddings = False
        if hasattr(base.config, "get_text_config"):
            base.config.get_text_config().tie_word_embeddings = False
    return model.merge_and_unload()


def load_merged(folder: str, attn_implementation: str, dtype: torch.dtype) -> Any:
    """A model that carries an adapter: its base (from the adapter's config) with the adapter merged in."""
    import json

    from peft import PeftModel

    from dpokit.model import adapter_base, load_model

    revision = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("revision")
    base = load_model(adapter_base(folder), None, attn_implementation, dtype, revision)
    return merge(PeftModel.from_pretrained(base, folder))
