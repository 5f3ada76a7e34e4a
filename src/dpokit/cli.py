"""`dpokit <command> [CONFIG.yaml] [section.field=value ...]`.

The config schema (`config.py`) is the only place settings are declared: `--help` of the training commands lists
every field with its default and docstring, and `preview`/`validate` take their data flags from `DataConfig`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import signal
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Any, Literal

import yaml

from dpokit import distributed
from dpokit.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    RunConfig,
    apply_override,
    from_dict,
    load_raw,
    section,
    section_from_dict,
)
from dpokit.errors import UserError
from dpokit.losses import LOSSES

PREVIEW_FIELDS = ("format", "text_field", "chat", "max_length", "max_prompt_length", "max_examples")
VALIDATE_FIELDS = ("format", "text_field", "chat", "max_length", "max_prompt_length")


def _config(path: str | None, overrides: Sequence[str], command: str) -> RunConfig:
    if command == "rm":
        from dpokit.rm import reward_config

        return reward_config(path, overrides)
    raw = load_raw(path)
    if command == "sft":
        # `dpokit sft` is SFT whatever the file says about losses, unless it says something else explicitly.
        loss = section(raw, "loss")
        if loss.get("name", "sft") != "sft":
            raise ConfigError(f"`dpokit sft` trains with loss.name=sft, but the config sets loss.name={loss['name']}")
        loss["name"] = "sft"
        section(raw, "reference")["mode"] = "none"
    for override in overrides:
        apply_override(raw, override)
    if command == "sft" and section(raw, "loss").get("name") != "sft":
        raise ConfigError(
            f"`dpokit sft` trains with loss.name=sft, but an override sets loss.name={raw['loss']['name']}"
        )
    if command == "precompute-ref":
        # The config describes the DPO run the cache is for; precompute-ref scores with reference.path or model.path.
        if section(raw, "reference").get("mode") == "none":
            raise ConfigError("precompute-ref has nothing to compute with reference.mode=none (reference-free)")
        if not raw["reference"].get("cache"):
            raise ConfigError(
                "precompute-ref writes to reference.cache: set it, e.g. reference.cache=runs/ref.safetensors"
            )
        raw["reference"]["mode"] = "precomputed"
    return from_dict(raw)


def _split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    configs = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a]
    if len(configs) > 1:
        raise ConfigError(f"give one CONFIG.yaml, not {len(configs)} ({', '.join(configs)}); set the rest as overrides")
    config = configs[0] if configs else None
    return config, [a for a in args if a != config]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, on one line (the schema documents itself there)."""
    body = typing.cast(ast.ClassDef, ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]).body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _choices(cls: type, name: str) -> tuple[str, ...]:
    if cls is LossConfig and name == "name":
        return tuple(LOSSES)
    tp = typing.get_type_hints(cls)[name]
    return tuple(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal else ()


def schema_help() -> str:
    """Every config field as `section.field = default`, its choices and its docstring."""
    lines = ["config fields (set any with section.field=value; defaults shown):"]
    for part in dataclasses.fields(RunConfig):
        lines += _field_lines(part.name, typing.get_type_hints(RunConfig)[part.name])
    return "\n".join(lines)


def _field_lines(prefix: str, cls: type) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        choices = _choices(cls, f.name)
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        lines.append(f"  {prefix}.{f.name} = {json.dumps(default)}" + (f"  ({' | '.join(choices)})" * bool(choices)))
        doc = field_docs(cls).get(f.name, "")
        lines += textwrap.wrap(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)
        optional_section = [
            a for a in typing.get_args(typing.get_type_hints(cls)[f.name]) if dataclasses.is_dataclass(a)
        ]
        for sub in optional_section:  # e.g. model.lora: its fields, once it is set
            lines += _field_lines(f"{prefix}.{f.name}", typing.cast(type, sub))
    return lines


def _textual(tp: Any) -> bool:
    """Whether a field holds text (str, a Literal of names, or either or None): its flag value is taken as given."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not Literal else []
    return tp is str or typing.get_origin(tp) is Literal or bool(args) and all(_textual(a) for a in args)


def _add_data_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """One flag per `DataConfig` field named (`--max-length` for max_length), documented from the schema. A value is
    read as in an override (YAML: `null`, numbers) unless the field holds text; a flag not given leaves the default."""
    defaults, hints = {f.name: f.default for f in dataclasses.fields(DataConfig)}, typing.get_type_hints(DataConfig)
    for name in names:
        choices = _choices(DataConfig, name)
        one_of = f"one of {', '.join(choices)}; " if choices else ""
        doc = f"{field_docs(DataConfig)[name]} (data.{name}, {one_of}default: {json.dumps(defaults[name])})"
        flag = "--" + name.replace("_", "-")
        if hints[name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc)
        else:
            parse = str if _textual(hints[name]) else yaml.safe_load
            parser.add_argument(
                flag, type=parse, default=argparse.SUPPRESS, choices=choices or None, metavar=name.upper(), help=doc
            )


def _data_config(args: argparse.Namespace, names: Sequence[str], **fixed: Any) -> DataConfig:
    """The `DataConfig` the flags describe, checked by the schema like a config file's `data` section."""
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return section_from_dict(DataConfig, {"train_path": args.data, **fixed, **given}, "data")


def _add_training_commands(sub: Any, debug: argparse.ArgumentParser) -> None:
    """sft, dpo, precompute-ref and rm: a config file and overrides; --help lists the schema."""
    for name, text in (
        ("sft", "supervised fine-tuning on completions (chosen responses, prompt/completion or text rows)"),
        ("dpo", "preference optimisation (DPO and its variants) against a reference model"),
        ("precompute-ref", "compute reference log-probs once and save them for reuse (reference.cache)"),
        ("rm", "a Bradley-Terry reward model: the model's backbone with a scalar head, trained on preference pairs"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[debug],
            epilog=schema_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("args", nargs="*", help="CONFIG.yaml and section.field=value overrides")
        if name != "precompute-ref":
            once = p.add_mutually_exclusive_group()
            once.add_argument(
                "--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir"
            )
            once.add_argument(
                "--overwrite", action="store_true", help="replace the run in train.output_dir (only what dpokit wrote)"
            )


def _add_data_commands(sub: Any, debug: argparse.ArgumentParser) -> None:
    """preview and validate: a data file, with the `data` section's fields as flags."""
    p = sub.add_parser(
        "preview", help="show which tokens are prompt and which are trained, with counts", parents=[debug]
    )
    p.add_argument("data", help="data file or save_to_disk folder (data.train_path)")
    p.add_argument("--model", required=True, help="model folder or .gguf file (for its tokenizer)")
    _add_data_flags(p, PREVIEW_FIELDS)
    p.add_argument("-n", "--examples", type=int, default=3, help="examples to show (default: 3)")
    p.add_argument("--sft", action="store_true", help="preview SFT examples (one completion each)")
    p.add_argument("--plain", action="store_true", help="no colours")
    p = sub.add_parser(
        "validate", help="check a data file: every malformed row with file:line and field, and counts", parents=[debug]
    )
    p.add_argument("data", help="data file or save_to_disk folder (data.train_path)")
    _add_data_flags(p, VALIDATE_FIELDS)
    p.add_argument("--sft", action="store_true", help="validate for SFT (one completion per example)")
    p.add_argument("--model", help="also tokenize with this model's tokenizer and count truncations and drops")


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors in input too"
    )
    parser = argparse.ArgumentParser(
        prog="dpokit", description="Direct Preference Optimization for Hugging Face causal LMs.", parents=[debug]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub, debug)
    _add_data_commands(sub, debug)
    p = sub.add_parser(
        "demo",
        help="the paper's controlled-sentiment experiment (IMDb): reward/KL frontier of DPO, PPO and the baselines",
        parents=[debug],
    )
    p.add_argument("--quick", action="store_true", help="a smaller version (under 2 minutes on 2 cores)")
    p.add_argument("--out", help="output folder (default runs/demo or runs/demo-quick); stages are cached there")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1; --quick: 0)")
    p.add_argument(
        "--workers", type=int, default=None, help="processes for the training runs (default: one per CPU core)"
    )
    p.add_argument(
        "--imdb",
        help="movie_review.jsonl.gz or a Hub data set id (default: stanfordnlp/imdb from the Hub when reachable, "
        "else imdb-text2vec/ in DPOKIT_DATA_DIR or ../shared/data)",
    )
    p.add_argument(
        "--vader",
        help="movieReviewSnippets_GroundTruth.txt (default: vader-movie-snippets/ in DPOKIT_DATA_DIR or "
        "../shared/data; without it the reward's agreement with human ratings is not measured)",
    )
    p = sub.add_parser(
        "export",
        help="write a run's model as a Hugging Face folder (LoRA: the adapter, or merged with --merge)",
        parents=[debug],
    )
    p.add_argument("run", help="run folder (its final/ is exported) or a checkpoint folder")
    p.add_argument("out", help="new output folder")
    p.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapter into the base model's weights")
    p = sub.add_parser(
        "init-model", help="create a small random Llama with a BPE tokenizer trained on a data file", parents=[debug]
    )
    p.add_argument("--data", required=True, help="data file whose text trains the tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-rows", type=int, default=20000, help="rows of text used to train the tokenizer")
    p.add_argument("--text-field", default="text", help="field of plain-text rows (e.g. review)")
    p.add_argument("--seed", type=int, default=0)
    from dpokit.eval import commands as eval_commands

    eval_commands.add_parsers(sub, debug)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        # Bad input, settings or environment: one line that says what to fix. Anything else is a bug and keeps
        # its traceback; --debug shows it for these too.
        if getattr(args, "debug", False):
            raise
        print(f"dpokit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stage = "a run that had started keeps its last checkpoint (continue with --resume)"
        print(f"dpokit {args.command}: interrupted (SIGINT); {stage}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        distributed.shutdown()  # under torchrun: the group ends with the command, however it ends


def _run(args: argparse.Namespace) -> int:
    if args.command in ("generate", "winrate", "experiment"):
        from dpokit.eval import commands as eval_commands

        return eval_commands.run(args)
    if args.command in ("sft", "dpo", "precompute-ref", "rm"):
        path, overrides = _split_args(args.args)
        config = _config(path, overrides, args.command)
        if args.command == "precompute-ref":
            from dpokit.precompute import precompute_reference

            cache = precompute_reference(config)
            if distributed.launched_rank() == 0:
                print(f"wrote {cache}")
            return 0
        from dpokit.train import Interrupted, train

        try:
            summary = train(config, resume=args.resume, overwrite=args.overwrite)
        except Interrupted as e:
            print(f"dpokit {args.command}: {e}", file=sys.stderr)
            return 128 + e.signum
        if distributed.launched_rank() == 0:
            final = {k: round(v, 4) for k, v in (summary["train"] | summary["eval"]).items()}
            print(f"done: {config.train.output_dir}/final  {final}")
        return 0
    if args.command == "preview":
        return _preview(args)
    if args.command == "demo":
        from pathlib import Path

        from dpokit.experiments import sentiment

        out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
        seeds = tuple(args.seeds or ((0,) if args.quick else (0, 1)))
        sentiment.run_demo(out, args.quick, seeds, args.imdb, args.vader, args.workers)
        print(f"wrote {out}/frontier.png, results.json, results.csv, report.md")
        return 0
    if args.command == "validate":
        return _validate(args)
    if args.command == "export":
        from dpokit.export import export

        print(f"wrote {export(args.run, args.out, args.merge)}")
        return 0
    if args.command == "init-model":
        from dpokit.data.formats import Use, load_records, record_texts, sniff_format
        from dpokit.model import check_init_model, init_model
        from dpokit.runfolder import check_new_folder

        check_init_model(args.vocab_size, args.hidden_size, args.layers, args.heads, args.max_rows)
        check_new_folder(args.out, "init-model --out")
        fmt = sniff_format(args.data, args.text_field)
        use: Use = "sft" if fmt in ("text", "completion") else "pairs"
        records, _ = load_records(args.data, fmt, use, "skip", text_field=args.text_field)
        texts = (text for record in records[: args.max_rows] for text in record_texts(record))
        out = init_model(texts, args.out, args.vocab_size, args.hidden_size, args.layers, args.heads, seed=args.seed)
        print(f"wrote {out}")
        return 0
    raise AssertionError(args.command)


def _preview(args: argparse.Namespace) -> int:
    from dpokit.data.prepare import prepare_data
    from dpokit.model import load_tokenizer
    from dpokit.preview import render

    data_config = _data_config(args, PREVIEW_FIELDS, on_error="skip")
    tokenizer = load_tokenizer(args.model)
    data = prepare_data(data_config, tokenizer, "sft" if args.sft else "pairs")
    print(render(tokenizer, data.train, data.train_report, args.examples, args.plain or not sys.stdout.isatty()))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Exit 0 when every row is usable (content quirks are counted, not failures), 1 when some rows are malformed or
    none is usable."""
    from dpokit.data.formats import Use, load_records
    from dpokit.data.report import MAX_MESSAGES, DataReport
    from dpokit.data.tokenize import tokenize_records

    data = _data_config(args, VALIDATE_FIELDS)
    report = DataReport()
    use: Use = "sft" if args.sft else "pairs"
    records, _ = load_records(
        data.train_path, data.format, use, "skip", report, text_field=data.text_field, chat=data.chat
    )
    if args.model:
        from dpokit.model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        tokenize_records(records, tokenizer, data.max_length, data.max_prompt_length, report, on_error="skip")
    for message in report.messages:
        print(message)
    if len(report.messages) == MAX_MESSAGES:
        print(f"... (only the first {MAX_MESSAGES} malformed rows are shown; the counts below cover all)")
    print("\n".join(report.lines()))
    if not records:
        print(f"{data.train_path}: no usable rows, nothing to train on")
    return 1 if report.messages or not records else 0


if __name__ == "__main__":
    raise SystemExit(main())
