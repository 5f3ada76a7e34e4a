"""distributed.py in one process: every helper is a no-op, so the loop reads the same with one GPU or many."""

import torch

from dpokit import distributed


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # returns at once: there is no process group to wait for
    tensor = torch.tensor([1.5, -2.0])
    reduced = distributed.all_reduce_sum(tensor)
    assert reduced is tensor and reduced.tolist() == [1.5, -2.0]
    # One process computes the whole step: every example, in order.
    assert distributed.shard([7, 3, 9, 1]) == [7, 3, 9, 1] and distributed.shard(range(5)) == [0, 1, 2, 3, 4]
