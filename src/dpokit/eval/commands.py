"""The command-line side of evaluation: `dpokit generate` and `dpokit winrate` (cli.py registers them here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dpokit.config import DataConfig, load_config
from dpokit.errors import UserError


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a training config whose data section says how prompts are rendered")
    p.add_argument("--format", help="row format (default: the config's, else auto)")
    p.add_argument("--chat", action="store_true", default=None, help="render HH transcripts with the chat template")
    p.add_argument("--max-length", type=int, help="as data.max_length in training")
    p.add_argument(
        "--max-prompt-length", type=int, help="as data.max_prompt_length in training (prompts keep their end)"
    )


def add_parsers(sub: Any, debug: argparse.ArgumentParser) -> None:
    """The evaluation commands; `debug` is the parent parser that gives each its --debug flag."""
    p = sub.add_parser(
        "generate",
        help="sample completions for the prompts of a data file (rendered as training renders them) to JSON lines",
        parents=[debug],
    )
    p.add_argument("data", help="data file whose prompts to complete (any dpokit format)")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--out", required=True, help="JSON-lines output; a rerun skips the prompts it already holds")
    p.add_argument("-n", "--samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    _data_flags(p)

    p = sub.add_parser(
        "winrate", help="win rate of samples against a baseline under a judge, with a bootstrap CI", parents=[debug]
    )
    p.add_argument("candidates", help="samples from `dpokit generate`")
    p.add_argument("--judge", required=True, help="rm:PATH, implicit:POLICY,REF, hf:PATH or openai:MODEL")
    p.add_argument("--baseline", default="chosen", help="another samples file, or `chosen` (the data's responses)")
    p.add_argument("--data", help="the data file the samples were made from (needed for --baseline chosen)")
    p.add_argument("--out", required=True, help="folder for comparisons.jsonl, summary.json and report.md")
    p.add_argument("--template", default="dialogue", help="dialogue, summarization or summarization-simple")
    p.add_argument("--both-orders", action="store_true", help="judge each pair both ways; disagreement is a tie")
    p.add_argument("--seed", type=int, default=0, help="seed of the A/B order and of the bootstrap")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (at least 1000)")
    p.add_argument("--batch-size", type=int, help="local judges: comparisons per forward")
    p.add_argument("--beta", type=float, help="implicit judge: β (default: the policy's saved loss.beta)")
    p.add_argument("--base-url", help="openai judge: the endpoint (default $OPENAI_BASE_URL or OpenAI's)")
    p.add_argument("--api-key-env", help="openai judge: environment variable holding the key (OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, help="openai judge: requests in flight at most (4)")
    p.add_argument("--timeout", type=float, help="openai judge: seconds per request (60)")
    p.add_argument("--max-retries", type=int, help="openai judge: retries on 429, 5xx and timeouts (5)")
    p.add_argument("--cache", help="openai judge: verdict cache file (default OUT/verdict_cache.jsonl)")
    _data_flags(p)

    p = sub.add_parser(
        "experiment", help="the paper's experiments as one command: hh (single-turn dialogue)", parents=[debug]
    )
    p.add_argument("name", choices=["hh"], help="hh: Preferred-FT and DPO on Anthropic HH, judged by a reward model")
    p.add_argument("--quick", action="store_true", help="a tiny version for CI (well under a minute of training)")
    p.add_argument("--out", help="output folder (default runs/hh or runs/hh-quick); stages are cached there")
    p.add_argument("--hh", help="the hh-rlhf folder (default $DPOKIT_DATA_DIR/hh-rlhf or ../shared/data/hh-rlhf)")
    p.add_argument("--model", help="a pretrained base model (folder or .gguf) instead of the small one trained here")
    p.add_argument("--chat", action="store_true", help="render the dialogues with the model's chat template")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="sizes, e.g. eval_prompts=500 batch=64")
    p.add_argument("--judge", action="append", default=[], help="another judge (openai:MODEL, hf:PATH, ...)")
    p.add_argument("--base-url", help="openai judge: the endpoint")
    p.add_argument("--concurrency", type=int, help="openai judge: requests in flight at most")
    p.add_argument("--seed", type=int, default=0)


def data_settings(args: argparse.Namespace, path: str) -> DataConfig:
    from dpokit.eval.samples import data_config

    base = load_config(args.config).data if args.config else DataConfig()
    return data_config(
        base,
        train_path=path,
        format=args.format,
        chat=args.chat,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )


def run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return _generate(args)
    if args.command == "experiment":
        return _experiment(args)
    return _winrate(args)


def _experiment(args: argparse.Namespace) -> int:
    from dpokit.experiments.hh import run_experiment
    from dpokit.experiments.hh_report import summary_line

    out = Path(args.out or ("runs/hh-quick" if args.quick else "runs/hh"))
    options = {k: getattr(args, k) for k in ("base_url", "concurrency") if getattr(args, k) is not None}
    result = run_experiment(
        out,
        args.quick,
        args.set,
        Path(args.hh) if args.hh else None,
        args.model,
        args.chat,
        args.judge,
        options,
        args.seed,
    )
    print(summary_line(result))
    print(f"wrote {out}/report.md, results.json, results.csv, winrate_vs_temperature.png, winrate_over_steps.png")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dpokit import distributed
    from dpokit.config import DistributedConfig
    from dpokit.eval.samples import generate_file, sample_device
    from dpokit.generate import Sampling

    try:
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as e:
        raise UserError(f"dpokit generate: {e}") from e
    # Under torchrun each process samples its share of the prompts and process 0 merges the shares (samples.py).
    with distributed.process_group(sample_device(), DistributedConfig().timeout_s):
        out = generate_file(
            args.model,
            data_settings(args, args.data),
            Path(args.out),
            sampling,
            args.samples,
            args.seed,
            args.batch_size,
            args.limit,
        )
    if distributed.is_main():
        print(f"wrote {out}")
    return 0


def _winrate(args: argparse.Namespace) -> int:
    from dpokit.eval.judges import make_judge
    from dpokit.eval.winrate import (
        against_chosen,
        against_samples,
        judge_pairings,
        load_samples,
        summarize,
        write_outputs,
    )

    if args.resamples < 1000:
        raise UserError(f"--resamples {args.resamples}: use at least 1000 for a 95% interval")
    candidates = load_samples(args.candidates)
    if args.baseline == "chosen":
        if not args.data:
            raise UserError("--baseline chosen needs --data, the data file the samples were made from")
        from dpokit.eval.samples import data_records, row_id

        rows, _ = data_records(data_settings(args, args.data))
        pairings = against_chosen(candidates, [_row(r, row_id) for r in rows])
    else:
        pairings = against_samples(candidates, load_samples(args.baseline))
    out = Path(args.out)
    options = {k: getattr(args, k) for k in ("batch_size", "beta", "base_url", "api_key_env", "concurrency")}
    options |= {
        "timeout": args.timeout,
        "max_retries": args.max_retries,
        "cache": args.cache or out / "verdict_cache.jsonl",
    }
    judge = make_judge(args.judge, args.template, **options)
    records = judge_pairings(judge, pairings, args.seed, args.both_orders)
    summary = summarize(records, args.resamples, args.seed)
    summary |= {"judge": judge.name, "candidate": args.candidates, "baseline": args.baseline}
    summary |= {"template": args.template, "both_orders": args.both_orders}
    write_outputs(out, records, summary, f"Win rate of {Path(args.candidates).name} against {args.baseline}")
    print(
        f"win rate {summary['win_rate']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}] over "
        f"{summary['judged']} comparisons ({summary['unparseable']} unparseable, {summary['failed']} failed); "
        f"wrote {out}/summary.json, comparisons.jsonl, report.md"
    )
    return 0


def _row(record: Any, row_id: Any) -> Any:
    from dpokit.eval.samples import PromptRow

    return PromptRow(row_id(record.source), record.prompt, record.completions[0], ())
