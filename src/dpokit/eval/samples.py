"""`dpokit generate`: completions for the prompts of a dpokit data file, written to resumable JSON lines.

Each prompt is tokenized by the training tokenizer code (`tokenize_record` on the row's preferred completion, with
the same `data` settings), so the prompt tokens a model is sampled from are the tokens it was trained on. Output rows:
`{id, sample, prompt, completion, model, temperature, top_p, seed, tokens, finished}`; `id` is the row's line in the
data file. Rows are written after every batch; a rerun skips the (id, sample) rows the file already holds. Under
torchrun each rank samples every world_size-th missing row into its own part file, and rank 0 merges the parts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dpokit import distributed
from dpokit.config import DataConfig
from dpokit.data.formats import Record, Text, load_records
from dpokit.data.report import DataReport
from dpokit.data.tokenize import tokenize_record
from dpokit.generate import Sampling, generate


@dataclass(frozen=True)
class PromptRow:
    id: str
    """The row's line in its data file."""
    prompt: Text
    chosen: Text
    """The row's preferred completion (the baseline of `dpokit winrate --baseline chosen`)."""
    prompt_ids: tuple[int, ...]


def row_id(source: str) -> str:
    """`path/file.jsonl:17` -> `17`."""
    return source.rsplit(":", 1)[-1]


def data_records(data: DataConfig) -> tuple[list[Record], DataReport]:
    """One record per row of `data.train_path` (the preferred completion only), as training reads the file."""
    records, report = load_records(
        data.train_path, data.format, "sft", data.on_error, text_field=data.text_field, chat=data.chat
    )
    first: dict[str, Record] = {}
    for record in records:
        first.setdefault(record.source, record)  # pairs rows yield one record per winner; one prompt is enough
    return list(first.values()), report


def data_prompts(data: DataConfig, tokenizer: Any) -> list[PromptRow]:
    """Every prompt of the data file with its training token ids (truncated as training truncates)."""
    records, report = data_records(data)
    rows = []
    for record in records:
        example = tokenize_record(record, tokenizer, data.max_length, data.max_prompt_length, report)
        if example is not None:
            rows.append(PromptRow(row_id(record.source), record.prompt, record.completions[0], example.prompt_ids))
    return rows


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The complete rows of a JSON-lines file; a last line cut short by a kill is left out."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _part(out: Path, rank: int, world: int) -> Path:
    return out if world == 1 else out.with_name(f"{out.name}.rank{rank}-of-{world}")


def generate_file(
    model_path: str,
    data: DataConfig,
    out: Path,
    sampling: Sampling,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Sample `samples` completions for each prompt of `data.train_path` (the first `limit`) into `out`."""
    from dpokit.model import load_model, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
    prompts = data_prompts(data, tokenizer)[:limit]
    rank, world = distributed.rank(), distributed.world_size()
    # Shard what the merged file lacks (the same list on every rank), then skip what this rank's part already holds.
    merged = {(r["id"], r["sample"]) for r in read_jsonl(out)}
    part = _part(out, rank, world)
    own = {(r["id"], r["sample"]) for r in read_jsonl(part)} if part != out else set()
    todo = [(p, j) for p in prompts for j in range(samples) if (p.id, j) not in merged]
    mine = [(p, j) for p, j in distributed.shard(todo) if (p.id, j) not in own]
    out.parent.mkdir(parents=True, exist_ok=True)
    if mine:
        _cut_torn_line(part)
        model = model if model is not None else load_model(model_path)
        model.to(sample_device())
        meta = {"model": model_path, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed}
        with (
            part.open("a", encoding="utf-8") as f,
            tqdm(total=len(mine), desc="generate", unit="sample", disable=not distributed.is_main()) as bar,
        ):

            def write(indices: list[int], completions: list[tuple[int, ...]]) -> None:
                for i, ids in zip(indices, completions, strict=True):
                    p, j = mine[i]
                    text = tokenizer.decode(list(ids), skip_special_tokens=True)
                    row = {"id": p.id, "sample": j, "prompt": p.prompt, "completion": text, **meta}
                    row |= {"tokens": len(ids), "finished": bool(ids) and ids[-1] == tokenizer.eos_token_id}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()

            generate(
                model,
                [p.prompt_ids for p, _ in mine],
                [f"{p.id}/{j}" for p, j in mine],
                sampling,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                seed,
                batch_size,
                on_batch=write,
                progress=bar,
            )
    distributed.barrier()
    if distributed.is_main():
        _merge(out, [p.id for p in prompts])
    distributed.barrier()
    return out


def _merge(out: Path, order: Sequence[str]) -> None:
    """Rank parts into `out`, in data order, one row per (id, sample)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    parts = _parts(out)[1:]
    for part in [out, *parts]:
        for r in read_jsonl(part):
            rows.setdefault((r["id"], r["sample"]), r)
    position = {id_: i for i, id_ in enumerate(order)}
    write_jsonl(out, sorted(rows.values(), key=lambda r: (position.get(r["id"], len(position)), r["sample"])))
    for part in parts:
        part.unlink()


def _cut_torn_line(path: Path) -> None:
    """Drop a last line that a kill cut short, so that appended rows start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _parts(out: Path) -> list[Path]:
    """The output file and any rank part files of an unfinished multi-process run."""
    return [out, *sorted(out.parent.glob(out.name + ".rank*-of-*"))]


def sample_device() -> Any:
    """The GPU of this process (LOCAL_RANK's under torchrun) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def data_config(base: DataConfig | None = None, **changes: Any) -> DataConfig:
    """The `data` settings of a training config with the given fields changed (None values ignored)."""
    return replace(base or DataConfig(), **{k: v for k, v in changes.items() if v is not None})
