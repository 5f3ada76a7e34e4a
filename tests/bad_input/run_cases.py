"""Bad-input cases about the run's folders: work that would be lost or overwritten, resumes that do not match the
run, and folders the environment does not let a run use."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from tests.bad_input import BASE_RUN, ENVIRONMENT, LOST_WORK, RESUME, RUN_ARGS, Case, World
from tests.conftest import hh_rows, write_jsonl

STEP = "{out}/checkpoints/step-"


def run(kind: str, name: str, *args: str, expect: tuple[str, ...], setup=None, code: int = 2, command="dpo") -> Case:
    return Case(name, kind, (command, *RUN_ARGS, *args), expect, setup, code)


def resume(name: str, *overrides: str, expect: tuple[str, ...], setup=None, code: int = 2) -> Case:
    """Continue the base run (copied into the world first) with `overrides` on top of its settings."""

    def prepare(world: World) -> None:
        world.copy_run()
        if setup is not None:
            setup(world)

    return Case(name, RESUME, ("dpo", *RUN_ARGS, *BASE_RUN, *overrides, "--resume"), expect, prepare, code)


def _step(world: World, n: int) -> Path:
    return world.out / "checkpoints" / f"step-{n}"


SHARD = "sharded/__0_0.distcp"
"""A checkpoint's weights and optimizer state (one process's DCP shard file); `sharded/.metadata` indexes them."""


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_head(path: Path) -> None:
    """Same size, unreadable header (a safetensors header length far beyond the file; a pickle that cannot start)."""
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])


def _garble_tail(path: Path) -> None:
    """Same size, a zip archive (torch.save) without its directory."""
    data = path.read_bytes()
    path.write_bytes(data[:-200] + b"\0" * 200)


def _lock(world: World) -> None:
    """Another run holds the folder: its marker, locked."""
    world.out.mkdir()
    fd = os.open(world.out / ".dpokit-run", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b'{"pid": 12345}')
    world.keep.append(fd)


def _unfinished(world: World) -> None:
    world.copy_run()
    shutil.rmtree(world.out / "final")
    (world.out / "summary.json").unlink()


def _mkfile(name: str, text: str = "mine\n"):
    def make(world: World) -> None:
        path = world.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return make


CASES: list[Case] = [
    # --- 1. lost or overwritten work ------------------------------------------------------------------------------
    run(
        LOST_WORK,
        "second-run-same-folder",
        expect=("train.output_dir={out}", "a finished run", "--resume", "--overwrite"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "second-run-unfinished",
        expect=("an unfinished run (checkpoints: step-1, step-2)",),
        setup=_unfinished,
    ),
    run(
        LOST_WORK,
        "sft-into-dpo-folder",
        expect=("train.output_dir={out}", "a finished run"),
        setup=World.copy_run,
        command="sft",
    ),
    run(
        LOST_WORK,
        "dpo-from-own-final",
        "model.path={out}/final",
        expect=("model.path={out}/final", "lies inside train.output_dir={out}"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "dpo-from-own-final-overwrite",
        "model.path={out}/final",
        "--overwrite",
        expect=("model.path={out}/final", "lies inside"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "reference-is-own-final",
        "reference.mode=path",
        "reference.path={out}/final",
        "--overwrite",
        expect=("reference.path={out}/final", "lies inside"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "cache-inside-output",
        "reference.mode=precomputed",
        "reference.cache={out}/ref.safetensors",
        "--overwrite",
        expect=("reference.cache={out}/ref.safetensors", "lies inside"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "data-inside-output",
        "data.train_path={out}/metrics.jsonl",
        "--overwrite",
        expect=("data.train_path={out}/metrics.jsonl", "lies inside"),
        setup=World.copy_run,
    ),
    run(
        LOST_WORK,
        "output-dir-dot",
        "train.output_dir=.",
        expect=("data.train_path={data}", "lies inside train.output_dir=."),
    ),
    run(
        LOST_WORK,
        "output-dir-user-folder",
        "train.output_dir=work",
        expect=("train.output_dir=work", "did not write (config.yaml, notes.txt)"),
        setup=lambda w: (_mkfile("work/config.yaml")(w), _mkfile("work/notes.txt")(w)),
    ),
    run(
        LOST_WORK,
        "overwrite-user-folder",
        "--overwrite",
        expect=("train.output_dir={out}", "did not write (notes.txt)"),
        setup=_mkfile("run/notes.txt"),
    ),
    run(
        LOST_WORK,
        "overwrite-then-bad-data",
        "--overwrite",
        expect=("{data}:1",),
        setup=lambda w: (w.copy_run(), w.data.write_text("not json\n")),
    ),
    run(LOST_WORK, "output-dir-is-model", "train.output_dir={model}", expect=("model.path={model}", "lies inside")),
    run(
        LOST_WORK,
        "output-dir-inside-model",
        "train.output_dir={model}/run",
        expect=("train.output_dir={model}/run", "lies inside model.path={model}"),
    ),
    run(
        LOST_WORK,
        "output-dir-symlink-to-model",
        "train.output_dir={root}/link",
        expect=("model.path={model}", "lies inside train.output_dir={root}/link"),
        setup=lambda w: (w.root / "link").symlink_to(w.model),
    ),
    run(
        LOST_WORK,
        "output-dir-is-a-file",
        "train.output_dir={root}/notes.txt",
        expect=("train.output_dir={root}/notes.txt", "is a file"),
        setup=_mkfile("notes.txt"),
    ),
    Case(
        "init-model-onto-model",
        LOST_WORK,
        ("init-model", "--data", "{data}", "--out", "{model}"),
        ("init-model --out {model}", "already exists"),
    ),
    Case(
        "init-model-onto-file",
        LOST_WORK,
        ("init-model", "--data", "{data}", "--out", "{data}"),
        ("init-model --out {data}", "already exists"),
    ),
    run(
        LOST_WORK,
        "precompute-onto-model-weights",
        "reference.cache={model}/model.safetensors",
        expect=("reference.cache={model}/model.safetensors", "not a reference cache"),
        command="precompute-ref",
    ),
    run(
        LOST_WORK,
        "precompute-onto-data",
        "reference.cache={data}",
        expect=("reference.cache={data}",),
        command="precompute-ref",
    ),
    run(
        LOST_WORK,
        "precompute-onto-folder",
        "reference.cache={root}",
        expect=("reference.cache={root}",),
        command="precompute-ref",
    ),
    # --- 2. resumes that do not match the run -----------------------------------------------------------------------
    run(RESUME, "resume-nothing", "--resume", expect=("--resume", "train.output_dir={out}", "no run to resume")),
    run(RESUME, "resume-empty-folder", "--resume", expect=("no run to resume",), setup=lambda w: w.out.mkdir()),
    resume(
        "resume-no-checkpoint",
        expect=("no usable checkpoint in {out}/checkpoints", "train.save_every=0"),
        setup=lambda w: shutil.rmtree(w.out / "checkpoints"),
    ),
    resume("resume-changed-lr", "train.lr=2e-3", expect=("train.lr: 0.001 -> 0.002",)),
    resume("resume-changed-batch", "train.batch_size=8", expect=("train.batch_size: 4 -> 8",)),
    resume("resume-changed-beta", "loss.beta=0.5", expect=("loss.beta: 0.1 -> 0.5",)),
    resume("resume-changed-seed", "train.seed=1", expect=("train.seed: 0 -> 1",)),
    resume("resume-changed-loss", "loss.name=ipo", expect=("loss.name: 'sigmoid' -> 'ipo'",)),
    resume("resume-changed-max-length", "data.max_length=48", expect=("data.max_length: 64 -> 48",)),
    resume(
        "resume-changed-model",
        "model.path={root}/model2",
        expect=("model.path",),
        setup=lambda w: shutil.copytree(w.model, w.root / "model2"),
    ),
    resume(
        "resume-changed-data-content",
        expect=("training data differs", "data.train_path={data}"),
        setup=lambda w: write_jsonl(w.data, hh_rows(24)[12:]),
    ),
    resume(
        "resume-moved-data",
        "data.train_path={root}/moved.jsonl",
        expect=("data.train_path", "moved.jsonl"),
        setup=lambda w: shutil.copy(w.data, w.root / "moved.jsonl"),
        code=0,
    ),
    resume("resume-longer", "train.max_steps=4", expect=("train.max_steps: 3 -> 4", "at step 2"), code=0),
    resume(
        "resume-stray-folders",
        expect=(f"from {STEP}2 at step 2",),
        code=0,
        setup=lambda w: (
            shutil.copytree(_step(w, 2), _step(w, 9).with_name("step-9.bak")),
            shutil.copytree(_step(w, 1), _step(w, 7).with_name("step-x")),
            _step(w, 8).write_text("a file"),
        ),
    ),
    resume(
        "resume-truncated-weights",
        expect=(f"skipping {STEP}2: {SHARD} has", f"from {STEP}1 at step 1"),
        setup=lambda w: _truncate(_step(w, 2) / SHARD),
        code=0,
    ),
    resume(
        "resume-truncated-state",
        expect=(f"skipping {STEP}2: trainer_state.pt has", f"from {STEP}1"),
        setup=lambda w: _truncate(_step(w, 2) / "trainer_state.pt"),
        code=0,
    ),
    resume(
        "resume-garbled-weights",
        expect=(f"cannot load {STEP}2", f"from {STEP}1 at step 1"),
        setup=lambda w: _garble_head(_step(w, 2) / "sharded" / ".metadata"),
        code=0,
    ),
    resume(
        "resume-garbled-state",
        expect=(f"cannot load {STEP}2", f"from {STEP}1 at step 1"),
        setup=lambda w: _garble_tail(_step(w, 2) / "trainer_state.pt"),
        code=0,
    ),
    resume(
        "resume-file-missing",
        expect=(f"skipping {STEP}2: config.json is missing", f"from {STEP}1"),
        setup=lambda w: (_step(w, 2) / "config.json").unlink(),
        code=0,
    ),
    resume(
        "resume-garbage-record",
        expect=(f"skipping {STEP}2: dpokit_checkpoint.json is unreadable",),
        setup=lambda w: (_step(w, 2) / "dpokit_checkpoint.json").write_text("{"),
        code=0,
    ),
    resume(
        "resume-incomplete-folder",
        expect=(f"skipping {STEP}2: no dpokit_checkpoint.json", f"from {STEP}1"),
        setup=lambda w: [(_step(w, 2) / n).unlink() for n in ("dpokit_checkpoint.json", "dpokit_config.yaml")],
        code=0,
    ),
    resume(
        "resume-legacy-checkpoints",
        expect=("records no data digest", f"from {STEP}2 at step 2"),
        code=0,
        setup=lambda w: [(_step(w, n) / "dpokit_checkpoint.json").unlink() for n in (1, 2)],
    ),
    resume(
        "resume-all-damaged",
        expect=("no usable checkpoint", f"step-2: {SHARD} has", "step-1: trainer_state.pt has"),
        setup=lambda w: (_truncate(_step(w, 2) / SHARD), _truncate(_step(w, 1) / "trainer_state.pt")),
    ),
    resume("resume-and-overwrite", "--overwrite", expect=("--overwrite", "not allowed with argument --overwrite")),
    # --- 6. environment: folders a run cannot use -------------------------------------------------------------------
    run(
        ENVIRONMENT,
        "output-under-a-file",
        "train.output_dir={data}/run",
        expect=("train.output_dir={data}/run", "cannot be written"),
    ),
    run(
        ENVIRONMENT,
        "output-in-proc",
        "train.output_dir=/proc/dpokit-run",
        expect=("train.output_dir=/proc/dpokit-run", "cannot be written"),
    ),
    run(
        ENVIRONMENT,
        "output-locked-by-another-run",
        expect=("train.output_dir={out}", "in use by another dpokit run", "12345"),
        setup=_lock,
    ),
    resume(
        "resume-locked-by-another-run",
        expect=("in use by another dpokit run",),
        setup=lambda w: (shutil.rmtree(w.out), _lock(w)),
    ),
]
