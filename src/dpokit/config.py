"""The one config schema: frozen dataclasses. YAML files are instances of `RunConfig`.

A YAML file maps section names (`model`, `data`, `reference`, `loss`, `train`, `distributed`) to fields.
Command-line overrides are `section.field=value` with the value parsed as YAML. Unknown keys and wrong types are
errors that name the key and suggest the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dpokit.config_checks import build, check_combinations, check_fields, parse_yaml, read_yaml_file, suggest
from dpokit.errors import ConfigError
from dpokit.losses import LOSSES

ReferenceMode = Literal["copy", "path", "precomputed", "none"]
DataFormat = Literal["auto", "standard", "conversational", "implicit", "pairs", "ranking", "completion", "text", "tldr"]
Optimizer = Literal["adamw", "rmsprop"]
Schedule = Literal["constant", "linear", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
OnError = Literal["raise", "skip"]
Layout = Literal["auto", "padded", "packed"]
WeightDtype = Literal["fp32", "bf16"]
T = TypeVar("T")
TrackerName = Literal["tensorboard", "wandb", "trackio"]
Head = Literal["lm", "score"]
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685v2) trained through `peft` instead of the weights."""

    r: int = 16
    """Rank of each adapter (ΔW = B·A with A: r × in, B: out × r)."""
    alpha: int = 32
    """Scale: ΔW is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names (or name suffixes) that get adapters; `all-linear`: every linear layer but the LM head."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full next to the adapters and saved with them (e.g. `lm_head`)."""

    def __post_init__(self) -> None:
        check_fields("model.lora", self)
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty; name modules or use all-linear")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                f"model.lora.target_modules={list(self.target_modules)}: all-linear stands alone; list the modules "
                "by name instead (e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head])"
            )


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Hugging Face model folder, a `.gguf` file (loaded through transformers), or a Hub id such as
    `Qwen/Qwen2.5-0.5B-Instruct` (downloaded into the Hub cache; a local path of the same name wins)."""
    revision: str | None = None
    """Branch, tag or commit of a Hub id in `path` (default: main)."""
    gguf_file: str | None = None
    """GGUF file name inside `path`, when `path` is a folder holding one."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to `from_pretrained` (`sdpa`, `eager`, ...)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (set any `model.lora.*` key, or `model.lora: {}` in YAML, to turn
    it on); π_ref is then the same model with its adapters disabled."""
    dtype: WeightDtype = "fp32"
    """Weights, gradients and optimizer state. fp32 (with bf16 autocast on GPU: mixed precision), or bf16: half the
    memory for all three, as when a model is loaded with `dtype=torch.bfloat16` elsewhere. With bf16 weights an
    update smaller than about 0.2-0.4% of a weight rounds away, so very small learning rates train little."""
    head: Head = "lm"
    """lm: a causal LM (policies); score: a reward model, the backbone of `path` with a scalar head, trained with
    loss.name=bradley_terry and saved as a sequence-classification folder (`dpokit rm`)."""

    def __post_init__(self) -> None:
        check_fields("model", self)
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ConfigError(f"model.gguf_file={self.gguf_file!r} must name a .gguf file inside model.path")
        if self.gguf_file is not None and self.path.endswith(".gguf"):
            raise ConfigError(
                f"model.path={self.path!r} is a .gguf file and model.gguf_file={self.gguf_file!r} names another; "
                "give one: the file as model.path, or its folder as model.path and the file as model.gguf_file"
            )


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""
    """Training data: JSON lines (optionally .gz), JSON, Parquet, a `datasets` folder from save_to_disk, or a Hub
    data set id such as `trl-lib/ultrafeedback_binarized` (a local path of the same name wins)."""
    eval_path: str | None = None
    """Held-out data in the same forms; when unset, `eval_split` of a Hub train_path, else `eval_fraction` of the
    training rows, is held out."""
    train_split: str = "train"
    """Split of a Hub data set in train_path."""
    eval_split: str | None = None
    """Split of a Hub data set in eval_path (default `test`), or, with eval_path unset, the split of train_path's
    Hub data set to hold out."""
    subset: str | None = None
    """Configuration (subset) of a Hub data set, the `name` of `datasets.load_dataset`."""
    data_dir: str | None = None
    """Folder inside a Hub data set repository, e.g. `helpful-base` for `Anthropic/hh-rlhf`."""
    eval_fraction: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval_path` is unset."""
    format: DataFormat = "auto"
    """Row format; `auto` detects it from the first row's fields."""
    text_field: str = "text"
    """Field holding the text of plain-text rows (format `text`), e.g. `review`."""
    chat: bool = False
    """Render HH-style `\\n\\nHuman:`/`\\n\\nAssistant:` transcripts as messages with the model's chat template."""
    max_length: int = 512
    """Longest prompt + completion in tokens; completions are cut to fit (their start kept)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens; longer prompts keep their end (and the BOS token, if any)."""
    max_examples: int | None = None
    """Use only the first N training rows (after the held-out split)."""
    max_eval_examples: int | None = None
    """Use only the first N held-out rows."""
    on_error: OnError = "raise"
    """Malformed rows: `raise` stops with file:line; `skip` counts and skips them."""

    def __post_init__(self) -> None:
        check_fields("data", self)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                f"({self.max_length}), or no completion token would fit"
            )
        if self.eval_path and self.eval_fraction > 0:
            raise ConfigError(
                f"data.eval_path ({self.eval_path}) and data.eval_fraction ({self.eval_fraction}) both choose the "
                "held-out data; set one of them"
            )
        if self.eval_path and self.train_path and os.path.abspath(self.eval_path) == os.path.abspath(self.train_path):
            raise ConfigError(
                f"data.eval_path is the training file ({self.eval_path}): held-out data must be other rows "
                "(or use data.eval_fraction to hold some out)"
            )
        if self.max_eval_examples is not None and not (self.eval_path or self.eval_fraction):
            raise ConfigError(
                f"data.max_eval_examples={self.max_eval_examples} but there is no held-out data: set data.eval_path "
                "or data.eval_fraction, or leave max_eval_examples out"
            )


@dataclass(frozen=True)
class ReferenceConfig:
    mode: ReferenceMode = "copy"
    """`copy`: frozen copy of the initial policy; `path`: another checkpoint; `precomputed`: log-probs from
    `dpokit precompute-ref`; `none`: reference-free (log π_ref taken as 0)."""
    path: str | None = None
    """Reference checkpoint (mode `path`), or the model precompute-ref scores with (default: model.path)."""
    cache: str | None = None
    """File of precomputed reference log-probs (mode `precomputed`, and where precompute-ref writes)."""

    def __post_init__(self) -> None:
        check_fields("reference", self)
        unused = {"copy": ("path", "cache"), "none": ("path", "cache"), "path": ("cache",)}.get(self.mode, ())
        for name in unused:
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"reference.{name}={getattr(self, name)!r} is not used with reference.mode={self.mode}: "
                    + (
                        "use reference.mode=precomputed for a cache"
                        if name == "cache"
                        else "use reference.mode=path to train against another model"
                    )
                    + f", or leave reference.{name} out"
                )
        if self.mode == "path" and not self.path:
            raise ConfigError("reference.mode=path needs reference.path (a model folder or .gguf file)")
        if self.mode == "precomputed" and not self.cache:
            raise ConfigError("reference.mode=precomputed needs reference.cache (made by `dpokit precompute-ref`)")


@dataclass(frozen=True)
class LossConfig:
    name: str = "sigmoid"
    """Objective, a name in the loss registry `dpokit.losses.LOSSES`: sigmoid (DPO, Eq. 7), ipo, hinge, ..."""
    beta: float = 0.1
    """β: strength of the KL constraint toward π_ref."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the assumed probability that a preference label is flipped (sigmoid only)."""
    nll_alpha: float = 1.0
    """α of dpo_nll: weight of the per-token NLL of the chosen completion."""
    unlikelihood_alpha: float = 1.0
    """α of unlikelihood: weight of the token-wise log(1 − p) term on the rejected completion."""
    margin: float = 0.0
    """m of bradley_terry: the reward margin a chosen response is asked to win by (Llama 2's margin term)."""

    def __post_init__(self) -> None:
        check_fields("loss", self)
        spec = LOSSES.get(self.name)
        if spec is None:
            raise ConfigError(
                f"loss.name: {self.name!r} is not one of: {', '.join(LOSSES)}{suggest(self.name, LOSSES)}"
            )
        # A hyper-parameter the loss does not read would be silently ignored. β is left out: every loss but sft
        # reads it, and configs share it across losses.
        for f in dataclasses.fields(self):
            if f.name not in ("name", "beta", *spec.hyperparameters.values()) and getattr(self, f.name) != f.default:
                readers = [name for name, other in LOSSES.items() if f.name in other.hyperparameters.values()]
                raise ConfigError(
                    f"loss.{f.name} applies to loss.name={' or '.join(readers)} only, not {self.name}: "
                    f"leave it at its default ({f.default})"
                )


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/dpokit"
    """Folder for checkpoints, metrics.jsonl, summary.json and the resolved config."""
    seed: int = 0
    """Seed for data order, initialisation of new models and dropout."""
    batch_size: int = 16
    """Examples (pairs) per optimizer step."""
    micro_batch_size: int = 16
    """Examples per forward/backward; batch_size must be a multiple of it (gradient accumulation)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    optimizer: Optimizer = "adamw"
    """adamw, or rmsprop (the paper's)."""
    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 (rmsprop)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    schedule: Schedule = "constant"
    """After warm-up: constant, linear decay to 0, or cosine decay to 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    precision: Precision = "auto"
    """fp32, or bf16 autocast (GPU); auto picks bf16 on CUDA and fp32 on CPU."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    eval_every: int = 0
    """Evaluate on held-out data every N steps (0: only at the end)."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: only the final model)."""
    log_every: int = 1
    """Write metrics every N steps."""
    max_nonfinite_steps: int = 10
    """Steps with a non-finite loss or gradient that are skipped (with a warning) before the run stops."""
    eval_train: bool = False
    """At the end, also evaluate on every training example (reported as `train_eval/...`)."""
    layout: Layout = "auto"
    """padded: one padded row per completion (any model); packed: each prompt once, no pad tokens, the LM head only
    at completion tokens, in chunks (models with a plain linear LM head); auto: packed for Llama-family models."""
    pack_length: int = 0
    """Row capacity of the packed layout in tokens (0: the longest example of the micro-batch; with
    model.attn_implementation=flex_attention, 0 puts the whole micro-batch in one row)."""
    logits_chunk: int = 1024
    """Completion tokens per LM-head chunk in the packed layout (bounds the (tokens, vocab) logits in memory)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, about a third more compute)."""
    compile: bool = False
    """torch.compile each decoder layer (dynamic shapes; one compilation serves all layers)."""
    compile_memory_budget: float = 1.0
    """With compile: the share of the compiler's default saved activations to keep (0 < x <= 1). Below 1 the
    compiler recomputes the cheapest operations in backward until activations fit the budget."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU)."""
    report_to: tuple[TrackerName, ...] | None = None
    """Trackers that get the metrics and the resolved config: tensorboard, wandb, trackio (a list; [] for none).
    Default: tensorboard when it is installed."""

    def __post_init__(self) -> None:
        check_fields("train", self)
        if self.compile_memory_budget < 1.0 and not self.compile:
            raise ConfigError("train.compile_memory_budget applies with train.compile=true only")
        if self.precision == "fp16":
            raise ConfigError(
                "train.precision=fp16 is refused: fp16 gradients underflow without loss scaling, which dpokit does "
                "not do. Use bf16 (same speed on Ampere and newer GPUs, no scaling needed) or fp32."
            )
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.precision == "bf16" and self.device == "cpu":
            raise ConfigError("train.precision=bf16 needs a CUDA device, and train.device=cpu: use fp32 or auto on CPU")


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes (`torchrun --nproc_per_node N -m dpokit ...`): each takes a share of every batch."""

    fsdp: Switch = "auto"
    """Shard the policy and the reference with FSDP2 (each decoder layer, then the whole model): auto = when
    launched with several processes (or with cpu_offload); on = also in one process; off = never (one process)."""
    cpu_offload: bool = False
    """With FSDP on a GPU: parameters, gradients and optimizer state stay in CPU memory and the optimizer steps
    there; each layer's weights visit the GPU for its forward and backward. Fits much larger models, slower."""
    reduce_dtype: WeightDtype = "fp32"
    """With FSDP and bf16 compute (train.precision): the dtype gradients are averaged across processes in. fp32
    keeps the single-process result; bf16 halves the traffic."""
    timeout_s: int = 1800
    """Seconds a collective waits for the other processes before the run fails (a process that died, or hangs)."""

    def __post_init__(self) -> None:
        check_fields("distributed", self)
        if self.cpu_offload and self.fsdp == "off":
            raise ConfigError("distributed.cpu_offload is FSDP's: set distributed.fsdp=auto or on, or drop it")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        check_combinations(self)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.field=value` override to a raw config mapping, in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.field=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = section(node, part, f"override '{override}': ")
    node[parts[-1]] = parse_yaml(text, f"override '{override}'") if text.strip() else None


def section(raw: dict[str, Any], name: str, where: str = "") -> dict[str, Any]:
    """`raw[name]` as a mapping, made empty when missing or written with nothing under it (`reference:`)."""
    if raw.get(name) is None:
        raw[name] = {}
    if not isinstance(raw[name], dict):
        raise ConfigError(f"{where}'{name}' is not a section (a mapping of fields), it holds {raw[name]!r}")
    return typing.cast(dict[str, Any], raw[name])


def section_from_dict(cls: type[T], raw: dict[str, Any], where: str) -> T:
    """One section (e.g. `DataConfig`) from a raw mapping, with the checks and messages of a whole config."""
    return typing.cast(T, build(cls, raw, where))


def load_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    return read_yaml_file(path)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    config: RunConfig = build(RunConfig, raw, "")
    return config


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or defaults when `path` is None), apply overrides, and validate."""
    raw = load_raw(path)
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain dicts and lists (tuples become lists, as YAML and JSON write them)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return plain(dataclasses.asdict(config))


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
