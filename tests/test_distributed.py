"""distributed.py in one process: every helper a no-op without a process group; how work is split over ranks; when
FSDP2 applies; set-up failures; and FSDP2 at world size 1 (a real process group of one, gloo), where every parameter
is a DTensor shard outside the wrapped forward. The 2-process runs are in test_torchrun.py."""

import random
from pathlib import Path

import pytest
import torch

from dpokit import distributed
from dpokit.config import ConfigError, DistributedConfig, load_config
from dpokit.data.collate import collate
from dpokit.data.pack import pack
from dpokit.device import pick_device
from dpokit.errors import UserError
from dpokit.logprobs import LogpsModel
from dpokit.losses import sigmoid_loss
from dpokit.model import load_model
from tests.test_pack import _close, _examples

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: size)


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # returns at once: there is no process group to wait for
    tensor = torch.tensor([1.5, -2.0])
    reduced = distributed.all_reduce_sum(tensor)
    assert reduced is tensor and reduced.tolist() == [1.5, -2.0]
    # One process computes the whole step: every example, in order.
    assert distributed.shard([7, 3, 9, 1]) == [7, 3, 9, 1] and distributed.shard(range(5)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_example_and_batch_goes_to_exactly_one_rank(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    examples, batches = list(range(12)), [f"b{i}" for i in range(7)]
    seen: list[int] = []
    got: dict[int, list] = {}
    for r in range(size):
        _as_rank(monkeypatch, r, size)
        seen += distributed.shard(examples)
        got[r] = distributed.shard_batches(batches)
    assert sorted(seen) == examples
    real = sorted((i, b) for entries in got.values() for i, b in entries if b is not None)
    assert real == list(enumerate(batches))  # each batch whole, once, at its position
    # Under FSDP every forward is a collective: all ranks run the same number of them.
    assert len({len(entries) for entries in got.values()}) == 1


def test_when_fsdp_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert not distributed.use_fsdp(DistributedConfig(), cpu)  # one process, auto: no wrapping
    assert distributed.use_fsdp(DistributedConfig(fsdp="on"), cpu)
    with pytest.raises(UserError, match="needs train.device on a GPU"):
        distributed.use_fsdp(DistributedConfig(cpu_offload=True), cpu)
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    assert distributed.use_fsdp(DistributedConfig(), cpu)  # two processes, auto: FSDP2
    with pytest.raises(UserError, match="torchrun started 2"):
        distributed.use_fsdp(DistributedConfig(fsdp="off"), cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="every process on one GPU"):
        pick_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)  # LOCAL_RANK's GPU


def test_distributed_settings_are_validated() -> None:
    assert load_config(None, ["distributed.fsdp=on", "distributed.timeout_s=60"]).distributed.timeout_s == 60
    assert load_config(None, ["distributed.fsdp=off"]).distributed.fsdp == "off"  # not YAML 1.1's boolean
    with pytest.raises(ConfigError, match="distributed.fsdp: 'of' is not one of: auto, on, off .did you mean 'off'"):
        load_config(None, ["distributed.fsdp=of"])
    with pytest.raises(ConfigError, match="cpu_offload is FSDP's"):
        load_config(None, ["distributed.fsdp=off", "distributed.cpu_offload=true"])
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        load_config(None, ["distributed.timeout_s=0"])


def test_set_up_errors_keep_their_type_in_one_process() -> None:
    class Bad(UserError):
        pass

    def fail() -> None:
        raise Bad("data.jsonl:3: no 'chosen'")

    with pytest.raises(Bad, match="data.jsonl:3"):
        distributed.agree(fail)
    assert distributed.agree(lambda: 7) == 7


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_padded_under_fsdp2(tiny_model: Path, checkpointing: bool) -> None:
    """The exactness test of test_pack, through FSDP2 (world size 1): log-probs, loss and every parameter's
    gradient of the packed prefix-shared layout equal the padded ones, with and without activation checkpointing.
    Both go through the wrapped module's forward; the packed path reads the LM head's weight inside it."""
    plain = LogpsModel(load_model(str(tiny_model)).float(), chunk=16)
    examples = _examples(random.Random(5), 6)
    padded, packed = collate(examples, range(6), pad_id=0), pack(examples, range(6), pad_id=0, capacity=64)
    reference = plain(padded).logps.detach() + 0.3

    def loss_of(out):
        return sigmoid_loss(out.logps[:, 0], out.logps[:, 1], reference[:, 0], reference[:, 1], beta=0.5).losses.mean()

    with distributed.process_group(torch.device("cpu"), 60, single=True):
        model = LogpsModel(load_model(str(tiny_model)).float(), chunk=16)
        if checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        distributed.place(model, torch.device("cpu"), DistributedConfig(fsdp="on"), frozen=False, bf16=False)
        assert distributed.is_sharded(model)
        results = {}
        for name, batch in (("padded", padded), ("packed", packed)):
            model.zero_grad(set_to_none=True)
            out = model(batch)
            loss = loss_of(out)
            loss.backward()
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
            results[name] = (out, loss.detach(), grads)
    (ref, ref_loss, ref_grads), (fast, fast_loss, fast_grads) = results["padded"], results["packed"]
    assert torch.equal(ref.lengths, fast.lengths)
    assert _close(fast.logps, ref.logps) and _close(fast.log1m, ref.log1m) and _close(fast_loss, ref_loss)
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 10
    for name in ref_grads:
        assert _close(fast_grads[name], ref_grads[name]), name
    # And the sharded model computes what the plain one does.
    assert _close(ref.logps, plain(padded).logps)


def test_training_under_fsdp2_in_one_process_is_training_without_it(tiny_model: Path, hh_file: Path, tmp_path: Path):
    """distributed.fsdp=on in one process (a process group of one): the same losses and final weights as no wrapping,
    its DCP checkpoint exports to the same weights, and `dpokit export` refuses a folder that holds no model."""
    from safetensors.torch import load_file

    from dpokit.cli import main
    from dpokit.train import train
    from tests.conftest import read_metrics, tiny_run

    for name, fsdp in (("plain", "off"), ("fsdp", "on")):
        overrides = [*tiny_run(tiny_model, hh_file, tmp_path / name), "train.micro_batch_size=4", "train.max_steps=3"]
        summary = train(load_config(None, [*overrides, "train.save_every=2", f"distributed.fsdp={fsdp}"]))
        assert (summary["world_size"], summary["fsdp"]) == (1, fsdp == "on")
    assert not distributed.is_initialized()  # the group of one ended with the run
    plain, fsdp = (read_metrics(tmp_path / n) for n in ("plain", "fsdp"))
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("plain", "fsdp"))
    assert a.keys() == b.keys() and all(_close(b[k], a[k]) for k in a)
    for name in ("plain", "fsdp"):
        assert main(["export", str(tmp_path / name / "checkpoints" / "step-2"), str(tmp_path / f"{name}-2")]) == 0
    c, d = (load_file(str(tmp_path / f"{n}-2" / "model.safetensors")) for n in ("plain", "fsdp"))
    assert c.keys() == d.keys() == a.keys() and all(_close(d[k], c[k]) for k in c)
    assert not all(torch.equal(c[k], a[k]) for k in a)  # step 2's weights, not the final ones
    assert main(["export", str(tmp_path / "fsdp" / "checkpoints"), str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()
