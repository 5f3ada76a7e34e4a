"""Loading policies, references and tokenizers; compiling their layers; `init-model` builds a small random Llama with
its own BPE tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dpokit.errors import UserError
from dpokit.hub import resolve_model
from dpokit.model_files import ModelError, check_model_files, loading

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""`model.dtype` names -> torch dtypes."""
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def split_model_path(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """`folder/x.gguf` -> (`folder`, `x.gguf`); a folder stays as it is."""
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), p.name
    return path, gguf_file


def is_adapter_folder(path: str | Path) -> bool:
    """A folder holding a PEFT adapter (`adapter_config.json`) rather than full weights."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path` of its adapter_config.json)."""
    import json

    base = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}/adapter_config.json names no base model (base_model_name_or_path)")
    return str(base)


def local_model_path(
    path: str, gguf_file: str | None = None, revision: str | None = None, weights: bool = False
) -> tuple[str, str | None]:
    """(folder, gguf file) on this machine for `model.path`: a local folder or `.gguf` file as it is (a local path
    always wins), else the snapshot of that Hub id in the Hub cache (downloaded unless offline). Either is checked to
    be a model (with its weights when `weights`) before transformers reads it (model_files.py)."""
    if not path:
        raise ModelError("no model given: set model.path to a Hugging Face model folder, a .gguf file or a Hub id")
    folder, gguf = split_model_path(path, gguf_file)
    if revision is not None and Path(folder).exists():
        raise ModelError(f"model.revision={revision} applies to Hub ids, and '{path}' is a local path; leave it out")
    folder = resolve_model(folder, revision, gguf)
    check_model_files(folder, gguf, path, weights)
    return folder, gguf


def load_tokenizer(path: str, gguf_file: str | None = None, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    folder, gguf = local_model_path(path, gguf_file, revision)
    if is_adapter_folder(folder) and not (Path(folder) / "tokenizer_config.json").exists():
        return load_tokenizer(adapter_base(folder))  # an adapter saved without a tokenizer: its base model's
    with loading(path):
        tokenizer = (
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer at '{path}' has no EOS token, and completions need one to end: set eos_token in its "
            "tokenizer_config.json, or use another model"
        )
    if tokenizer.pad_token_id is None:
        # Pad positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    gguf_file: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> Any:
    """A Hugging Face causal LM from a local folder, a GGUF file (dequantized by transformers) or a Hub id. A folder
    that holds a PEFT adapter loads as its base model with the adapter merged in (see dpokit.lora); a training
    checkpoint as its model."""
    from transformers import AutoModelForCausalLM

    folder, gguf = local_model_path(path, gguf_file, revision, weights=True)
    if (Path(folder) / "sharded").is_dir():  # a training checkpoint (sharded weights): assembled in memory
        from dpokit.checkpoint import assemble

        return assemble(Path(folder), attn_implementation, dtype)
    if is_adapter_folder(folder):
        from dpokit.lora import load_merged

        return load_merged(folder, attn_implementation, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    with loading(path):
        model = AutoModelForCausalLM.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}), **kwargs)
    if not gguf:
        return model
    # transformers dequantizes GGUF weights to `dtype` on load, so what we hold is an ordinary model; dropping the
    # quantizer record lets save_pretrained write it as plain safetensors that load without the GGUF file.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a Module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (dynamic shapes: packed rows change size every step). The layers
    share their code, so one compilation serves them all; a decoder without a `layers` list is compiled whole."""
    decoder = model.get_decoder()  # type: ignore[operator]
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        for layer in layers:
            layer.compile(dynamic=True)
    else:
        decoder.compile(dynamic=True)


def compiler_memory_budget(budget: float) -> contextlib.AbstractContextManager[None]:
    """While compiling, keep only `budget` of the default saved activations (AOTAutograd's memory-budget
    partitioner recomputes the cheapest operations in backward); 1.0 leaves the compiler's default."""
    if budget >= 1.0:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=budget)  # type: ignore[no-any-return]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with BOS/EOS/PAD and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )


def check_init_model(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, max_rows: int = 1) -> None:
    """The sizes `init-model` can build, named as its flags are, before any data is read."""
    problems = {
        "--vocab-size": (
            vocab_size,
            vocab_size >= 256 + len(SPECIAL_TOKENS),
            f"at least {256 + len(SPECIAL_TOKENS)} (the 256 bytes and the special tokens)",
        ),
        "--hidden-size": (hidden_size, hidden_size >= 2, "at least 2"),
        "--layers": (num_layers, num_layers >= 1, "at least 1"),
        "--heads": (num_heads, num_heads >= 1, "at least 1"),
        "--max-rows": (max_rows, max_rows >= 1, "at least 1"),
    }
    for flag, (value, ok, needed) in problems.items():
        if not ok:
            raise UserError(f"init-model {flag} {value}: must be {needed}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise UserError(
            f"init-model --hidden-size {hidden_size} must be a multiple of --heads {num_heads} with an even quotient "
            "(the size of each head, which rotary positions split in two)"
        )


def init_model(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 2048,
    seed: int = 0,
    tokenizer: Any = None,
) -> Path:
    """Write a random Llama-style model and a BPE tokenizer trained on `texts` (or the `tokenizer` given) to
    `out_dir` (HF format)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
