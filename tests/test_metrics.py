"""Step statistics: summed where they are computed, brought to the host in one transfer, averaged per example."""

import pytest
import torch

from dpokit.metrics import averaged, to_host


def test_to_host_adds_batches_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = [
        {"loss": torch.tensor(1.5), "examples": 2, "completion_tokens": torch.tensor(6), "tokens": 20},
        {"loss": torch.tensor(0.5), "examples": 2, "completion_tokens": torch.tensor(4), "tokens": 18},
    ]
    transfers, real_tolist = [], torch.Tensor.tolist

    def counting_tolist(tensor):
        transfers.append(tensor.shape)
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    total = to_host([*sums, {"grad_norm": torch.tensor(3.0)}])
    assert total == {"loss": 2.0, "examples": 4.0, "completion_tokens": 10.0, "tokens": 38.0, "grad_norm": 3.0}
    assert list(total) == ["loss", "examples", "completion_tokens", "tokens", "grad_norm"]
    assert transfers == [torch.Size([3])]  # loss, completion_tokens and grad_norm together
    del total["grad_norm"]
    assert averaged(total, per_token=False) == {"loss": 0.5, "tokens": 38.0}
    assert averaged(total, per_token=True) == {"loss": 0.2, "tokens": 38.0}
