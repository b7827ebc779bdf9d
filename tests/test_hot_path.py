"""Guards on the round loop's hot path, by counting rather than timing (timing is noisy in CI).

Per round, FedAvg must issue one all-reduce, read from the device a constant number of times
however many batches there are, build no DataLoader and copy nothing between host and device.
"""

import pytest
import torch
from test_engine import make_run
from torch.utils._python_dispatch import TorchDispatchMode

from fedlit.engine import prepare, run_round

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class OpCounter(TorchDispatchMode):
    """Counts aten calls, and copies whose source and destination devices differ."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.cross_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        out = func(*args, **kwargs)
        if name in ("aten._to_copy", "aten.copy_"):
            source = args[1] if name == "aten.copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device != out.device:
                self.cross_device += 1
        return out


def count_one_round(tmp_path, local_epochs, accelerator="cpu"):
    run = make_run(
        tmp_path,
        rounds=100,
        local_epochs=local_epochs,
        eval_every=1000,  # no evaluation: only the training round is counted
        personal_eval=False,
        accelerator=accelerator,
    )
    fed = prepare(run)
    run_round(fed, 1)  # warm-up: lazily built state does not count
    calls_before = fed.comm.calls
    with OpCounter() as counter:
        run_round(fed, 2)
    return counter, fed.comm.calls - calls_before, fed


@pytest.mark.parametrize("accelerator", DEVICES)
def test_a_fedavg_round_syncs_a_constant_number_of_times_and_copies_nothing(tmp_path, accelerator):
    one, reduces_one, fed = count_one_round(tmp_path / "e1", 1, accelerator)
    three, reduces_three, _ = count_one_round(tmp_path / "e3", 3, accelerator)
    # three times the batches, the same number of device->host reads (loss and total weight)
    assert three.calls["aten.convolution_backward"] == pytest.approx(
        3 * one.calls["aten.convolution_backward"], rel=0.05
    )
    assert one.calls.get("aten._local_scalar_dense", 0) == 2
    assert three.calls.get("aten._local_scalar_dense", 0) == 2
    # one all-reduce per round, whatever the number of local steps
    assert reduces_one == reduces_three == 1
    # batches are gathered and augmented where the data lives
    assert one.cross_device == three.cross_device == 0


def test_the_round_loop_builds_no_dataloader(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DataLoader was built in the round loop")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", refuse)
    fed = prepare(make_run(tmp_path, rounds=2, personal_eval=True))
    for round_idx in (1, 2):
        run_round(fed, round_idx)


def test_the_fedavg_all_reduce_carries_the_model_once(tmp_path):
    _, _, fed = count_one_round(tmp_path, 1)
    n_params = sum(p.numel() for p in fed.global_model.parameters())
    # float64 sum of n_k * w_k, plus the loss and the total weight: a few hundred KB here
    assert fed.comm.collective_bytes == 2 * 8 * (n_params + 2)
