"""Every torch.distributed call lives here; in one process each helper is a no-op, so the loop reads the same on
one device or many.

Launch: `torchrun --nproc_per_node N -m dpokit dpo CONFIG` (and `--nnodes`/`--rdzv-endpoint` across machines).
`process_group` initialises from torchrun's environment (NCCL for CUDA tensors with one GPU per local rank, gloo
for CPU tensors) and destroys the group however the command ends. `shard_model` applies FSDP2 (`fully_shard`) to
each decoder layer and then to the `LogpsModel` root. Checkpoints are `torch.distributed.checkpoint` (DCP) folders
of FQN-keyed shards, so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dpokit.config import DistributedConfig
from dpokit.errors import UserError
from dpokit.logprobs import LogpsModel

T = TypeVar("T")


class RankFailed(UserError):
    """A command failed on one of the processes; every process raises this, with the same message."""


# ---------------------------------------------------------------------------------------------------------- group
def launched() -> bool:
    """Started by torchrun (or another launcher that sets torchrun's variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def launched_rank() -> int:
    """This process's rank as torchrun numbered it (0 when not launched), known before and after the group."""
    return int(os.environ["RANK"]) if launched() else 0


def launched_world_size() -> int:
    """Processes torchrun started (1 when not launched), known before the group exists."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (its GPU there)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float, single: bool = False) -> Iterator[None]:
    """The process group a command runs in. Launched by torchrun: initialised from its environment on first use and
    kept for the life of the process (torch cannot reliably initialise a second group from torchrun's store in one
    process, and a script may call `train` twice), `shutdown` ends it: the CLI calls it when its command ends,
    whatever ends it (success, an error, or the `Interrupted` a signal turns into), and so does the interpreter's
    exit. With `single` and no torchrun: a group of this one process, which FSDP needs, for this block only.
    Collectives fail after `timeout_s` seconds rather than wait forever for a process that is gone."""
    if is_initialized() or not (launched() or single):
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if launched():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        atexit.register(shutdown)
        yield
        return
    dist.init_process_group(backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        shutdown()


def shutdown() -> None:
    """Destroy the process group, if there is one."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; unchanged in a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every process if it is true on any (e.g. a signal that reached only some)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def gather(obj: T) -> list[T]:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(totals: dict[str, float]) -> dict[str, float]:
    """Statistics summed over this process's batches -> summed over every process's (the keys of all of them)."""
    if not is_initialized() or world_size() == 1:
        return totals
    summed: dict[str, float] = {}
    for part in gather(totals):
        for k, v in part.items():
            summed[k] = summed.get(k, 0.0) + v
    return summed


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` (a command's set-up: config, files, data) on every process and make them agree on the outcome: if
    it raised a `UserError` anywhere, every process raises `RankFailed` with the same message, so a bad row that
    only one process read stops them all at once, each saying why, instead of leaving the others waiting in their
    next collective. Anything else (a bug) keeps its traceback where it happened; the others stop with a pointer.
    In one process the error is raised as it is."""
    try:
        result = fn()
    except Exception as e:
        _raise_if_any_failed(e)
        raise
    _raise_if_any_failed(None)
    return result


def _raise_if_any_failed(error: Exception | None) -> None:
    if not is_initialized() or world_size() == 1:
        return  # the caller raises `error` itself
    mine = None if error is None else (isinstance(error, UserError), f"{type(error).__name__}: {error}", str(error))
    failed = [(r, f) for r, f in enumerate(gather(mine)) if f is not None]
    if not failed or (error is not None and not isinstance(error, UserError)):
        return
    first, (user, described, message) = failed[0]
    where = f"[rank {first}] " if len(failed) < world_size() else ""
    if user:
        raise RankFailed(where + message) from error
    raise RuntimeError(f"rank {first} failed ({described}); see its traceback")


# ----------------------------------------------------------------------------------------------------- the data
def shard(items: Sequence[T]) -> list[T]:
    """This process's share of a step's examples, a contiguous slice (the processes see each example once): cut into
    micro-batches, it gives the very micro-batches one process would compute first, second, ..., so the arithmetic
    differs from one process's only in how the gradients are added up."""
    share = -(-len(items) // world_size())
    return list(items[rank() * share : (rank() + 1) * share])


def shard_batches(batches: Sequence[T]) -> list[tuple[int, T | None]]:
    """This process's share of whole batches, as (position, batch): batch i goes to process i mod N, so each
    batch is the one a single process would build. Every process gets the same number of entries (the short ones
    end in (-1, None)): under FSDP every forward is a collective that all processes must join."""
    n, size, me = len(batches), world_size(), rank()
    rounds = -(-n // size)
    return [(i, batches[i]) if (i := r * size + me) < n else (-1, None) for r in range(rounds)]


# ------------------------------------------------------------------------------------------------------- FSDP2
def use_fsdp(settings: DistributedConfig, device: torch.device) -> bool:
    """Whether this run shards its models (see `DistributedConfig.fsdp`); refuse what cannot work."""
    size = launched_world_size()
    wanted = settings.fsdp == "on" or (settings.fsdp == "auto" and (size > 1 or settings.cpu_offload))
    if size > 1 and not wanted:
        raise UserError(
            f"distributed.fsdp=off runs in one process, but torchrun started {size}: drop the override "
            "(auto shards with FSDP2) or launch one process"
        )
    if settings.cpu_offload and device.type != "cuda":
        raise UserError("distributed.cpu_offload moves weights between CPU and GPU; it needs train.device on a GPU")
    return wanted


def place(
    model: LogpsModel, device: torch.device, settings: DistributedConfig, *, frozen: bool, bf16: bool
) -> LogpsModel:
    """Put `model` where it runs: sharded over the processes with FSDP2 (see `shard_model`), or whole on `device`.
    A frozen model (the reference) is put in eval mode without gradients."""
    if frozen:
        model.eval().requires_grad_(False)
    if not use_fsdp(settings, device):
        return model.to(device)
    decoder = model.lm.get_decoder()  # type: ignore[operator]
    layers = getattr(decoder, "layers", None)
    shard_model(
        model,
        list(layers) if isinstance(layers, torch.nn.ModuleList) else [],
        device,
        frozen=frozen,
        bf16=bf16,
        reduce_bf16=settings.reduce_dtype == "bf16",
        cpu_offload=settings.cpu_offload,
    )
    return model


def shard_model(
    model: torch.nn.Module,
    layers: Sequence[torch.nn.Module],
    device: torch.device,
    *,
    frozen: bool,
    bf16: bool,
    reduce_bf16: bool = False,
    cpu_offload: bool = False,
) -> None:
    """FSDP2, in place: `fully_shard` on each decoder layer, then on `model` (the root, owning the embedding, final
    norm and LM head). bf16: parameters gathered and computed in bf16 while the sharded fp32 copy is what the
    optimizer updates, gradients reduced in fp32 (or bf16). A frozen model (the reference) frees every gathered
    weight right after its forward, root included; the policy keeps its root's weights from the forward to the
    backward, where they are needed first. cpu_offload: shards, gradients and optimizer state live in CPU memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    reduce = torch.bfloat16 if reduce_bf16 else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce) if bf16 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp, offload_policy=offload)
    # The root's input is a batch object (token ids and masks only): nothing to cast, and it must pass untouched.
    root_mp = MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=frozen, mp_policy=root_mp, offload_policy=offload)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over every process's shards) to `max_norm`; return the norm before, a plain
    tensor where the gradients lie."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ------------------------------------------------------------------------------------------------ checkpoints
def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state as a DCP folder: each process writes its shards, keyed by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_is_fine(), _written_or_oserror(folder):
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore a `save_sharded` folder into this run's model (and optimizer), whatever the number of processes
    that wrote it: DCP reads each of this process's shards from wherever the writers put them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model)}
        with _one_process_is_fine(), _as_runtime_error(folder):
            dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    both: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_is_fine(), _as_runtime_error(folder):
        dcp.load(both, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns that it runs in one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _as_runtime_error(folder: Path) -> Iterator[None]:
    """DCP reports a failed load (on every process alike) as a BaseException; make it an error a caller can catch,
    e.g. `--resume` going back to the checkpoint before."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:  # read the index first: DCP logs a traceback to the root logger when it cannot, then tries other files
        FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        raise RuntimeError(f"{folder}/.metadata cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        yield
    except CheckpointException as e:
        errors = {r: f[0] if isinstance(f, tuple) else f for r, f in e.failures.items()}
        failures = "; ".join(f"rank {r}: {type(f).__name__}: {f}"[:300] for r, f in errors.items())
        raise RuntimeError(f"{folder} does not load into this model ({failures})") from None


@contextlib.contextmanager
def _written_or_oserror(folder: Path) -> Iterator[None]:
    """DCP reports a failed save as a BaseException holding each process's error: a write that failed (a full
    disk) becomes that OSError again, which the run turns into one line (device.out_of_resources)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        for error in errors:
            if isinstance(error, OSError):
                raise error from None
        raise RuntimeError(f"saving {folder} failed: {'; '.join(map(repr, errors))[:600]}") from None


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on process 0, in CPU memory (an empty dict elsewhere): one tensor at a time is
    gathered, so no process ever holds more than the full model once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]


def commit(tmp: Path, final: Path) -> None:
    """Make a folder every process wrote into visible under its final name, at once: all processes finish writing,
    then process 0 renames it (a kill before the rename leaves `<name>.tmp`, which nothing reads)."""
    barrier()
    if is_main():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()
