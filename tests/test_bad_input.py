"""The bad-input suite: hostile-but-realistic input given to the command line, one table row per case.

Every case runs `dpokit.cli.main` in-process in a fresh folder (the "world": a small data file, the tiny model, and
whatever the case sets up) and asserts the exit code, that no traceback is printed, that the one error line names
the offending key, file or value, and that no file outside the run's own folder changed. Most cases fail before
anything is loaded; the classes follow issue 14.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpokit.cli import main
from tests.conftest import hh_rows, write_jsonl

LOST_WORK, RESUME, VALUES, CONTRADICTIONS, FILES, ENVIRONMENT, CONTENT = (
    "lost-work",
    "resume",
    "values",
    "contradictions",
    "files",
    "environment",
    "content",
)


@dataclass
class World:
    root: Path
    model: Path
    data: Path
    out: Path

    @property
    def names(self) -> dict[str, str]:
        return {"root": str(self.root), "model": str(self.model), "data": str(self.data), "out": str(self.out)}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    """The issue's class of failure."""
    argv: tuple[str, ...]
    """The command line; `{root}`, `{model}`, `{data}` and `{out}` are filled in."""
    expect: tuple[str, ...]
    """Texts the error line must contain (formatted like argv)."""
    setup: Callable[[World], None] | None = None
    code: int = 2


def _run_args(command: str = "dpo") -> tuple[str, ...]:
    return (
        command,
        "model.path={model}",
        "data.train_path={data}",
        "train.output_dir={out}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "train.batch_size=4",
        "train.micro_batch_size=4",
        "train.max_steps=1",
    )


def config_case(kind: str, name: str, *overrides: str, expect: tuple[str, ...] = (), command: str = "dpo") -> Case:
    """A run whose overrides hold the fault; by default the error must name every override's `key=value`."""
    return Case(name, kind, (*_run_args(command), *overrides), expect or overrides)


def yaml_case(name: str, content: bytes | str, *expect: str, kind: str = FILES) -> Case:
    def write(world: World) -> None:
        path = world.root / "config.yaml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    # A file that is not a config names the file; a bad value inside one names its key and value.
    names_file = ("{root}/config.yaml",) if kind == FILES else ()
    return Case(name, kind, ("dpo", "{root}/config.yaml"), (*names_file, *expect), write)


CASES: list[Case] = [
    # --- 3. values no run can use ---------------------------------------------------------------------------------
    config_case(VALUES, "beta-nan", "loss.beta=.nan", expect=("loss.beta=nan", "finite")),
    config_case(VALUES, "beta-inf", "loss.beta=.inf", expect=("loss.beta=inf", "finite")),
    config_case(VALUES, "beta-huge-literal", "loss.beta=1e400", expect=("loss.beta=inf",)),
    config_case(VALUES, "beta-zero", "loss.beta=0", expect=("loss.beta=0.0", "> 0")),
    config_case(VALUES, "beta-negative", "loss.beta=-0.1", expect=("loss.beta=-0.1",)),
    config_case(VALUES, "lr-inf", "train.lr=.inf", expect=("train.lr=inf",)),
    config_case(VALUES, "lr-nan-word", "train.lr=nan", expect=("train.lr=nan",)),
    config_case(VALUES, "lr-zero", "train.lr=0", expect=("train.lr=0.0",)),
    config_case(VALUES, "lr-negative", "train.lr=-1e-5", expect=("train.lr=-1e-05",)),
    config_case(VALUES, "grad-norm-zero", "train.max_grad_norm=0", expect=("train.max_grad_norm=0.0", "null")),
    config_case(VALUES, "grad-norm-negative", "train.max_grad_norm=-1", expect=("train.max_grad_norm=-1.0",)),
    config_case(VALUES, "grad-norm-nan", "train.max_grad_norm=.nan", expect=("train.max_grad_norm=nan",)),
    config_case(VALUES, "max-steps-zero", "train.max_steps=0"),
    config_case(VALUES, "max-steps-negative", "train.max_steps=-3"),
    config_case(VALUES, "epochs-zero", "train.epochs=0"),
    config_case(VALUES, "max-examples-negative", "data.max_examples=-1"),
    config_case(VALUES, "max-examples-zero", "data.max_examples=0"),
    config_case(VALUES, "max-length-zero", "data.max_length=0"),
    config_case(VALUES, "prompt-length-negative", "data.max_prompt_length=-5"),
    config_case(VALUES, "batch-zero", "train.batch_size=0"),
    config_case(VALUES, "batch-negative", "train.batch_size=-4"),
    config_case(VALUES, "micro-batch-zero", "train.micro_batch_size=0"),
    config_case(VALUES, "logits-chunk-zero", "train.logits_chunk=0"),
    config_case(VALUES, "seed-beyond-64-bits", "train.seed=18446744073709551616"),
    config_case(VALUES, "seed-negative", "train.seed=-1"),
    config_case(VALUES, "batch-beyond-64-bits", "train.batch_size=100000000000000000000000"),
    config_case(VALUES, "weight-decay-negative", "train.weight_decay=-0.1", expect=("train.weight_decay=-0.1",)),
    config_case(VALUES, "warmup-negative", "train.warmup_steps=-1"),
    config_case(VALUES, "label-smoothing-half", "loss.label_smoothing=0.5"),
    config_case(VALUES, "label-smoothing-negative", "loss.label_smoothing=-0.1"),
    config_case(
        VALUES, "nll-alpha-negative", "loss.name=dpo_nll", "loss.nll_alpha=-1", expect=("loss.nll_alpha=-1.0",)
    ),
    config_case(VALUES, "unlikelihood-alpha-inf", "loss.unlikelihood_alpha=.inf", expect=("unlikelihood_alpha=inf",)),
    config_case(VALUES, "eval-fraction-one", "data.eval_fraction=1", expect=("data.eval_fraction=1.0",)),
    config_case(VALUES, "eval-fraction-negative", "data.eval_fraction=-0.1"),
    config_case(VALUES, "eval-every-negative", "train.eval_every=-1"),
    config_case(VALUES, "save-every-negative", "train.save_every=-2"),
    config_case(VALUES, "log-every-negative", "train.log_every=-1"),
    config_case(VALUES, "nonfinite-steps-negative", "train.max_nonfinite_steps=-1"),
    config_case(VALUES, "pack-length-negative", "train.pack_length=-8"),
    config_case(
        VALUES,
        "memory-budget-above-one",
        "train.compile=true",
        "train.compile_memory_budget=1.5",
        expect=("train.compile_memory_budget=1.5", "(0, 1]"),
    ),
    config_case(
        VALUES,
        "max-eval-examples-zero",
        "data.eval_fraction=0.2",
        "data.max_eval_examples=0",
        expect=("data.max_eval_examples=0",),
    ),
    config_case(VALUES, "device-gpu", "train.device=gpu", expect=("train.device='gpu'", "cuda")),
    config_case(VALUES, "device-typo", "train.device=cuda0", expect=("train.device='cuda0'",)),
    config_case(VALUES, "output-dir-empty", "train.output_dir=''", expect=("train.output_dir is empty",)),
    config_case(VALUES, "output-dir-null", "train.output_dir=", expect=("train.output_dir needs a str",)),
    config_case(VALUES, "text-field-empty", "data.text_field=''", expect=("data.text_field is empty",)),
    config_case(VALUES, "attention-empty", "model.attn_implementation=''", expect=("model.attn_implementation",)),
    config_case(VALUES, "batch-word", "train.batch_size=abc", expect=("train.batch_size", "'abc'")),
    config_case(VALUES, "lr-list", "train.lr=[1]", expect=("train.lr", "[1]")),
    config_case(VALUES, "beta-bool", "loss.beta=true", expect=("loss.beta", "True")),
    config_case(VALUES, "steps-fraction", "train.max_steps=1.5", expect=("train.max_steps", "1.5")),
    config_case(VALUES, "loss-name-typo", "loss.name=dpo", expect=("loss.name", "'dpo'", "sigmoid")),
    config_case(VALUES, "gguf-file-not-gguf", "model.gguf_file=weights.bin", expect=("model.gguf_file='weights.bin'",)),
    config_case(VALUES, "unknown-key", "loss.betta=0.1", expect=("loss.betta", "did you mean 'beta'")),
    config_case(VALUES, "unknown-section", "trian.lr=0.1", expect=("trian", "did you mean 'train'")),
    config_case(VALUES, "override-bad-yaml", "loss.beta=[", expect=("loss.beta=[", "not valid YAML")),
    config_case(VALUES, "override-no-equals", "loss.beta", expect=("loss.beta", "section.field=value")),
    config_case(VALUES, "override-into-value", "train.lr.x=1", expect=("train.lr", "{{'x': 1}}")),
    config_case(VALUES, "override-duplicate-inline", "train={{lr: 1, lr: 2}}", expect=("key 'lr' is given twice",)),
    # --- 4. settings that contradict each other --------------------------------------------------------------------
    config_case(
        CONTRADICTIONS, "copy-with-path", "reference.path={model}", expect=("reference.path=", "reference.mode=copy")
    ),
    config_case(
        CONTRADICTIONS,
        "copy-with-cache",
        "reference.cache={root}/ref.safetensors",
        expect=("reference.cache=", "reference.mode=copy", "precomputed"),
    ),
    config_case(
        CONTRADICTIONS,
        "none-with-path",
        "reference.mode=none",
        "reference.path={model}",
        expect=("reference.path=", "reference.mode=none"),
    ),
    config_case(
        CONTRADICTIONS,
        "path-with-cache",
        "reference.mode=path",
        "reference.path={model}",
        "reference.cache={root}/ref.safetensors",
        expect=("reference.cache=", "reference.mode=path"),
    ),
    config_case(
        CONTRADICTIONS,
        "eval-path-and-fraction",
        "data.eval_path={data}2",
        "data.eval_fraction=0.1",
        expect=("data.eval_path", "data.eval_fraction (0.1)"),
    ),
    config_case(CONTRADICTIONS, "eval-path-is-train", "data.eval_path={data}", expect=("data.eval_path", "{data}")),
    config_case(CONTRADICTIONS, "max-eval-without-eval", "data.max_eval_examples=5"),
    config_case(CONTRADICTIONS, "eval-every-without-eval", "train.eval_every=5", expect=("train.eval_every=5",)),
    config_case(
        CONTRADICTIONS,
        "bf16-on-cpu",
        "train.precision=bf16",
        "train.device=cpu",
        expect=("train.precision=bf16", "train.device=cpu"),
    ),
    config_case(CONTRADICTIONS, "fp16", "train.precision=fp16", expect=("train.precision=fp16", "loss scaling")),
    config_case(
        CONTRADICTIONS,
        "prompt-fills-length",
        "data.max_prompt_length=64",
        expect=("data.max_prompt_length (64)", "data.max_length (64)"),
    ),
    config_case(
        CONTRADICTIONS,
        "batch-not-multiple",
        "train.batch_size=10",
        expect=("train.batch_size (10)", "train.micro_batch_size (4)"),
    ),
    config_case(CONTRADICTIONS, "path-mode-without-path", "reference.mode=path", expect=("reference.path",)),
    config_case(CONTRADICTIONS, "precomputed-without-cache", "reference.mode=precomputed", expect=("reference.cache",)),
    config_case(CONTRADICTIONS, "sft-loss-with-reference", "loss.name=sft", expect=("loss.name=sft",)),
    config_case(
        CONTRADICTIONS, "ipo-reference-free", "loss.name=ipo", "reference.mode=none", expect=("reference.mode=none",)
    ),
    config_case(
        CONTRADICTIONS,
        "smoothing-with-ipo",
        "loss.name=ipo",
        "loss.label_smoothing=0.1",
        expect=("loss.label_smoothing",),
    ),
    config_case(
        CONTRADICTIONS,
        "memory-budget-without-compile",
        "train.compile_memory_budget=0.5",
        expect=("train.compile_memory_budget", "train.compile=true"),
    ),
    config_case(
        CONTRADICTIONS, "gguf-twice", "model.path={root}/a.gguf", "model.gguf_file=b.gguf", expect=("a.gguf", "b.gguf")
    ),
    config_case(CONTRADICTIONS, "sft-command-ipo-loss", "loss.name=ipo", command="sft", expect=("loss.name=ipo",)),
    config_case(
        CONTRADICTIONS,
        "precompute-reference-free",
        "reference.mode=none",
        "reference.cache={root}/r.st",
        command="precompute-ref",
        expect=("reference.mode=none",),
    ),
    # --- 5. config files that are not what they claim ------------------------------------------------------------
    yaml_case(
        "yaml-two-train-sections",
        "train:\n  lr: 0.1\nloss:\n  beta: 0.2\ntrain:\n  lr: 0.2\n",
        "line 5",
        "'train' is given twice",
        "line 1",
    ),
    yaml_case("yaml-key-twice-in-section", "train:\n  lr: 0.1\n  lr: 0.2\n", "'lr' is given twice"),
    yaml_case("yaml-empty", "", "holds no settings"),
    yaml_case("yaml-comments-only", "# nothing here\n\n", "holds no settings"),
    yaml_case("yaml-latin-1", "# caf\xe9\ntrain:\n  lr: 0.1\n".encode("latin-1"), "not UTF-8", "0xe9"),
    yaml_case("yaml-utf-16", "train:\n  lr: 0.1\n".encode("utf-16"), "not UTF-8"),
    yaml_case("yaml-binary", b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8", "0x89"),
    yaml_case("yaml-unclosed-bracket", "train: {lr: 0.1\n", "not valid YAML", "line"),
    yaml_case("yaml-tab-indent", "train:\n\tlr: 0.1\n", "not valid YAML", "line 2"),
    yaml_case("yaml-top-level-list", "- train\n- loss\n", "mapping of sections", "list"),
    yaml_case("yaml-top-level-scalar", "dpo\n", "mapping of sections", "str"),
    yaml_case("yaml-section-scalar", "train: 5\n", "train", "expected a mapping", kind=VALUES),
    yaml_case("yaml-unknown-section", "trian:\n  lr: 0.1\n", "trian", "did you mean 'train'", kind=VALUES),
    yaml_case("yaml-beta-nan", "loss:\n  beta: .nan\n", "loss.beta=nan", kind=VALUES),
    Case(
        "yaml-folder",
        FILES,
        ("dpo", "{root}/configs.yaml"),
        ("{root}/configs.yaml", "is a folder"),
        lambda w: (w.root / "configs.yaml").mkdir(),
    ),
    Case("yaml-missing", FILES, ("dpo", "{root}/missing.yaml"), ("{root}/missing.yaml", "does not exist")),
]


@pytest.fixture
def world(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    root = tmp_path / "world"
    root.mkdir()
    monkeypatch.chdir(root)
    data = write_jsonl(root / "data.jsonl", hh_rows(12))
    return World(root, tiny_model, data, root / "run")


def _snapshot(world: World) -> dict[str, str]:
    """Every file and folder outside the run's own folder, with a digest of its content."""
    seen = {}
    for base in (world.root, world.model):
        for path in sorted(base.rglob("*")):
            if path == world.out or world.out in path.parents:
                continue
            seen[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.kind}:{c.id}")
def test_bad_input(case: Case, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    if case.setup is not None:
        case.setup(world)
    before = _snapshot(world)
    code = main([arg.format(**world.names) for arg in case.argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for text in case.expect:
        assert text.format(**world.names) in errors[0]
    assert _snapshot(world) == before


def test_the_suite_covers_every_class() -> None:
    kinds = {c.kind for c in CASES}
    assert len({c.id for c in CASES}) == len(CASES)
    assert kinds <= {LOST_WORK, RESUME, VALUES, CONTRADICTIONS, FILES, ENVIRONMENT, CONTENT, "other"}
