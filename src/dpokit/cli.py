"""`dpokit <command> [CONFIG.yaml] [section.field=value ...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpokit.config import ConfigError, RunConfig, apply_override, from_dict, load_raw
from dpokit.data.report import DataError, DataReport
from dpokit.reference import ReferenceMismatch
from dpokit.train import NonFiniteError


def _config(path: str | None, overrides: Sequence[str], command: str) -> RunConfig:
    raw = load_raw(path)
    if command == "sft":
        # `dpokit sft` is SFT whatever the file says about losses, unless it says something else explicitly.
        loss = raw.setdefault("loss", {}) or {}
        if loss.get("name", "sft") != "sft":
            raise ConfigError(f"`dpokit sft` trains with loss.name=sft, but the config sets loss.name={loss['name']}")
        loss["name"] = "sft"
        raw["loss"] = loss
        raw.setdefault("reference", {})["mode"] = "none"
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def _split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    config = next((a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a), None)
    return config, [a for a in args if a != config]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpokit", description="Direct Preference Optimization for Hugging Face causal LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("sft", "supervised fine-tuning on completions (chosen responses, prompt/completion or text rows)"),
        ("dpo", "preference optimisation (DPO and its variants) against a reference model"),
        ("precompute-ref", "compute reference log-probs once and save them for reuse (reference.cache)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("args", nargs="*", help="CONFIG.yaml and section.field=value overrides")
        if name != "precompute-ref":
            p.add_argument(
                "--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir"
            )
    p = sub.add_parser("preview", help="show which tokens are prompt and which are trained, with counts")
    p.add_argument("data", help="data file or save_to_disk folder")
    p.add_argument("--model", required=True, help="model folder or .gguf file (for its tokenizer)")
    p.add_argument("--format", default="auto")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("-n", "--examples", type=int, default=3)
    p.add_argument("--sft", action="store_true", help="preview SFT examples (one completion each)")
    p.add_argument("--plain", action="store_true", help="no colours")
    p = sub.add_parser("demo", help="the paper's controlled-sentiment experiment (IMDb): reward/KL frontier of DPO")
    p.add_argument("--quick", action="store_true", help="a smaller version (about 2 minutes on 2 cores)")
    p.add_argument("--out", help="output folder (default runs/demo or runs/demo-quick); stages are cached there")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1; --quick: 0)")
    p.add_argument("--imdb", help="movie_review.jsonl.gz (default: ../shared/data/imdb-text2vec)")
    p.add_argument("--vader", help="movieReviewSnippets_GroundTruth.txt (default: ../shared/data/vader-movie-snippets)")
    p = sub.add_parser("validate", help="check a data file: every malformed row with file:line and field, and counts")
    p.add_argument("data", help="data file or save_to_disk folder")
    p.add_argument("--format", default="auto")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sft", action="store_true", help="validate for SFT (one completion per example)")
    p.add_argument("--model", help="also tokenize with this model's tokenizer and count truncations and drops")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p = sub.add_parser("init-model", help="create a small random Llama with a BPE tokenizer trained on a data file")
    p.add_argument("--data", required=True, help="data file whose text trains the tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-rows", type=int, default=20000, help="rows of text used to train the tokenizer")
    p.add_argument("--text-field", default="text", help="field of plain-text rows (e.g. review)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, DataError, ReferenceMismatch, NonFiniteError, FileNotFoundError, ValueError) as e:
        print(f"dpokit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command in ("sft", "dpo", "precompute-ref"):
        path, overrides = _split_args(args.args)
        config = _config(path, overrides, args.command)
        if args.command == "precompute-ref":
            from dpokit.precompute import precompute_reference

            print(f"wrote {precompute_reference(config)}")
            return 0
        from dpokit.train import Interrupted, train

        try:
            summary = train(config, resume=args.resume)
        except Interrupted as e:
            print(f"dpokit {args.command}: {e}", file=sys.stderr)
            return 128 + e.signum
        final = {k: round(v, 4) for k, v in (summary["train"] | summary["eval"]).items()}
        print(f"done: {config.train.output_dir}/final  {final}")
        return 0
    if args.command == "preview":
        from dpokit.config import DataConfig
        from dpokit.data.prepare import prepare_data
        from dpokit.model import load_tokenizer
        from dpokit.preview import render

        tokenizer = load_tokenizer(args.model)
        data_config = DataConfig(
            train_path=args.data,
            format=args.format,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            on_error="skip",
        )
        data = prepare_data(data_config, tokenizer, "sft" if args.sft else "pairs")
        print(render(tokenizer, data.train, data.train_report, args.examples, args.plain or not sys.stdout.isatty()))
        return 0
    if args.command == "demo":
        from pathlib import Path

        from dpokit.experiments import sentiment

        out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
        seeds = tuple(args.seeds or ((0,) if args.quick else (0, 1)))
        sentiment.run_demo(
            out, args.quick, seeds, Path(args.imdb or sentiment.IMDB), Path(args.vader or sentiment.VADER)
        )
        print(f"wrote {out}/frontier.png, results.json, results.csv, report.md")
        return 0
    if args.command == "validate":
        return _validate(args)
    if args.command == "init-model":
        from dpokit.data.formats import Use, load_records, record_texts, sniff_format
        from dpokit.model import init_model

        fmt = sniff_format(args.data, args.text_field)
        use: Use = "sft" if fmt in ("text", "completion") else "pairs"
        records, _ = load_records(args.data, fmt, use, "skip", text_field=args.text_field)
        texts = (text for record in records[: args.max_rows] for text in record_texts(record))
        out = init_model(texts, args.out, args.vocab_size, args.hidden_size, args.layers, args.heads, seed=args.seed)
        print(f"wrote {out}")
        return 0
    raise AssertionError(args.command)


def _validate(args: argparse.Namespace) -> int:
    """Exit 0 when every row is usable (content quirks are counted, not failures), 1 when some rows are malformed."""
    from dpokit.data.formats import Use, load_records
    from dpokit.data.report import MAX_MESSAGES
    from dpokit.data.tokenize import tokenize_records

    report = DataReport()
    use: Use = "sft" if args.sft else "pairs"
    records, _ = load_records(args.data, args.format, use, "skip", report, args.text_field)
    if args.model:
        from dpokit.model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        tokenize_records(records, tokenizer, args.max_length, args.max_prompt_length, report)
    for message in report.messages:
        print(message)
    if len(report.messages) == MAX_MESSAGES:
        print(f"... (only the first {MAX_MESSAGES} malformed rows are shown; the counts below cover all)")
    print("\n".join(report.lines()))
    return 1 if report.messages else 0


if __name__ == "__main__":
    raise SystemExit(main())
