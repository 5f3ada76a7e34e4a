"""What a config is checked against before anything runs: the range of every number, the shape of a few strings, and
the YAML file itself (readable, UTF-8, not empty, no key given twice), and each raw value against its field's type
(`build`: raw mapping -> dataclass, with a did-you-mean for unknown keys and choices).

`BOUNDS` is the one table of numeric ranges; `config.py`'s dataclasses call `check_fields` from `__post_init__`, so a
config built from YAML, from overrides or in Python is checked alike. Rules between the fields of one section stay
in `config.py`; rules between sections are `check_combinations`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dpokit.errors import ConfigError
from dpokit.losses import LOSSES

if typing.TYPE_CHECKING:
    from dpokit.config import RunConfig

INT_LIMIT = 2**63 - 1
"""The largest integer any field takes: torch keeps steps, sizes and seeds in 64-bit integers."""


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number; `low`/`high` are included unless `open_low`/`open_high`; None: no bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    hint: str = ""
    """What to do instead, added to the message (e.g. how to switch the feature off)."""

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {low}"
        return f"{'<' if self.open_high else '<='} {high}"


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) or value is None else f"{value:g}"


POSITIVE = Bounds(0, open_low=True)
AT_LEAST_ONE = Bounds(1)
NOT_NEGATIVE = Bounds(0)

BOUNDS: dict[str, Bounds] = {
    "model.lora.r": AT_LEAST_ONE,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": Bounds(0, 1, open_high=True),
    "data.eval_fraction": Bounds(0, 1, open_high=True, hint="0 holds nothing out"),
    "data.max_length": Bounds(2, hint="a prompt token and a completion token at least"),
    "data.max_prompt_length": AT_LEAST_ONE,
    "data.max_examples": Bounds(1, hint="null uses every row"),
    "data.max_eval_examples": Bounds(1, hint="null uses every held-out row"),
    "loss.beta": POSITIVE,
    "loss.label_smoothing": Bounds(0, 0.5, open_high=True),
    "loss.nll_alpha": NOT_NEGATIVE,
    "loss.unlikelihood_alpha": NOT_NEGATIVE,
    "loss.margin": NOT_NEGATIVE,
    "train.seed": Bounds(0, INT_LIMIT),
    "train.batch_size": AT_LEAST_ONE,
    "train.micro_batch_size": AT_LEAST_ONE,
    "train.epochs": AT_LEAST_ONE,
    "train.max_steps": Bounds(1, hint="null trains for train.epochs"),
    "train.lr": POSITIVE,
    "train.weight_decay": NOT_NEGATIVE,
    "train.warmup_steps": NOT_NEGATIVE,
    "train.max_grad_norm": Bounds(0, open_low=True, hint="null disables clipping"),
    "train.eval_every": Bounds(0, hint="0 evaluates at the end only"),
    "train.save_every": Bounds(0, hint="0 saves the final model only"),
    "train.log_every": Bounds(0, hint="0 writes no per-step metrics"),
    "train.max_nonfinite_steps": NOT_NEGATIVE,
    "train.pack_length": Bounds(0, hint="0 fits each micro-batch"),
    "train.logits_chunk": AT_LEAST_ONE,
    "train.compile_memory_budget": Bounds(0, 1, open_low=True),
    "distributed.timeout_s": Bounds(1, INT_LIMIT),
}
"""Every int and float field of the schema, by `section.field` (a test checks that none is missing)."""

PATHS = {"model.path", "data.train_path", "data.eval_path", "reference.path", "reference.cache", "train.output_dir"}
"""Fields holding a path: a leading `~` there is a folder named `~`, since only the shell expands it."""
NON_EMPTY = {"data.text_field", "model.attn_implementation", "train.output_dir"}
"""String fields that must hold something when given (an empty output folder would mean the current folder)."""

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""transformers' attention kernels; a Hub kernel (`org/name`) or a `paged|...` one is passed through as given."""


def _check_number(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # wrong types are caught when the YAML is read; None is "not set"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number ({_explain(key)})")
    if abs(value) > INT_LIMIT:
        raise ConfigError(f"{key}={value}: beyond the 64-bit range torch accepts ({_explain(key)})")
    bounds = BOUNDS.get(key)
    if bounds is not None and not bounds.admits(value):
        raise ConfigError(f"{key}={value}: must be {_explain(key)}")


def _explain(key: str) -> str:
    bounds = BOUNDS.get(key)
    if bounds is None:
        return "no range known"
    return bounds.describe() + (f"; {bounds.hint}" if bounds.hint else "")


def check_fields(section: str, obj: Any) -> None:
    """Range-check every number and the shape of the strings of one config section (a dataclass instance)."""
    for f in dataclasses.fields(obj):
        key, value = f"{section}.{f.name}", getattr(obj, f.name)
        _check_number(key, value)
        if key in NON_EMPTY and isinstance(value, str) and not value.strip():
            raise ConfigError(f"{key} is empty; give a value (or leave the key out for the default)")
        if key in PATHS and isinstance(value, str) and value.startswith("~"):
            raise ConfigError(
                f"{key}={value} starts with '~', which dpokit does not expand (a shell expands it at the start of a "
                "word, not after '='): write the full path"
            )
    attention = getattr(obj, "attn_implementation", None) if section == "model" else None
    if attention and attention not in ATTENTION and "/" not in attention and not attention.startswith("paged|"):
        close = difflib.get_close_matches(attention, ATTENTION, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"model.attn_implementation={attention!r} is not an attention kernel: use {', '.join(ATTENTION)}{hint}"
        )
    if section == "train" and not DEVICE.fullmatch(obj.device):
        hint = " (did you mean 'cuda'?)" if obj.device.lower() in ("gpu", "cuda0", "nvidia") else ""
        raise ConfigError(f"train.device={obj.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps{hint}")


class _Duplicate(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"line {again}: key '{key}' is given twice (first on line {first}); keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is YAML's own way of changing a default
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Duplicate(key, seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; errors are one line naming `where` (a file or an override) and the line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass, so as safe as yaml.safe_load
    except _Duplicate as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {place}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; one-line errors for a missing, unreadable, non-UTF-8 or empty file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; give the .yaml file inside it")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"config file '{path}' holds no settings (it is empty or only comments)")
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"config file '{path}': the top level must be a mapping of sections, got {kind}")
    return raw


def suggest(key: str, options: typing.Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the option nearest `key`, or nothing."""
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal and isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(
                f"{where}: {value!r} is not one of: {choices}{suggest(str(value), map(str, typing.get_args(tp)))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(items))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:
            raise ConfigError(f"{where}={value}: too large for a float")
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if value is None and tp in (int, float, str, bool):
        raise ConfigError(f"{where} needs a {tp.__name__} value, got none (null or an empty override)")
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: Any, raw: Any, where: str) -> Any:
    """A config dataclass from a raw mapping (YAML, overrides): unknown keys and wrong types are one-line errors
    naming `where` + the key; nested sections are built the same way."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'{suggest(str(key), names)}")
        tp = hints[key]
        optional = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # an optional section, e.g. model.lora
            tp = optional[0] if value is not None else type(None)
        if tp is type(None):
            kwargs[key] = None
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, path)
        else:
            kwargs[key] = coerce(value, tp, path)
    return cls(**kwargs)


def check_combinations(config: RunConfig) -> None:
    """Rules between sections of a `RunConfig` (each section checks its own fields and their combinations)."""
    name, mode = config.loss.name, config.reference.mode
    if (config.model.head == "score") != (name == "bradley_terry"):
        raise ConfigError(
            f"model.head={config.model.head} with loss.name={name}: a reward model (model.head=score) trains with "
            "loss.name=bradley_terry, and bradley_terry trains reward models only (use `dpokit rm`)"
        )
    if config.model.head == "score" and config.train.layout == "packed":
        raise ConfigError("model.head=score trains with train.layout=padded (or auto)")
    if LOSSES[name].reference == "unused" and mode != "none":
        raise ConfigError(f"loss.name={name} trains without a reference: set reference.mode=none")
    if LOSSES[name].reference == "required" and mode == "none":
        free = [n for n, spec in LOSSES.items() if spec.reference != "required"]
        raise ConfigError(
            f"reference.mode=none (reference-free) is defined for loss.name={', '.join(free)} only; "
            f"loss.name={name} needs a reference (reference.mode=copy, path or precomputed)"
        )
    if config.train.eval_every and not (config.data.eval_path or config.data.eval_fraction):
        raise ConfigError(
            f"train.eval_every={config.train.eval_every} but there is no held-out data: set data.eval_path or "
            "data.eval_fraction, or train.eval_every=0"
        )
