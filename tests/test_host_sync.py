"""Host-device synchronisations: the counter itself, and the budget of every tiny preset's
training step (1.0 and 2.0; world size 1 in-process and 2 in one launch; ZeRO 0/2/3).

On a CPU the counter works in device view: every tensor inside a step is treated as a device
tensor (on a GPU run it is one), so a `.item()`, a boolean-mask index or a `.tolist()` that would
stall a GPU is counted here. The budget is d2v's one decision per step, DeepSpeed's own reads
for the configuration, and a small constant at log steps (d2v/train/sync_budget.py); nothing may
grow with the number of parameters.
"""
import json
import os

import pytest
import torch

from d2v.train import host_sync
from d2v.train.sync_budget import budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["audio_tiny", "image_tiny", "text_tiny", "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"]
CASES_1 = [(p, 0) for p in TINY] + [("audio_tiny", 2), ("text_tiny_v2", 2), ("image_tiny", 3), ("audio_tiny_v2", 3)]
CASES_2 = [("audio_tiny", 0), ("image_tiny_v2", 0), ("text_tiny", 2), ("audio_tiny_v2", 2), ("text_tiny", 3),
           ("image_tiny_v2", 3)]


def test_the_counter_sees_what_would_stall_a_gpu():
    x = torch.randn(8, 4)
    mask = x[:, 0] > 0
    with host_sync.count_host_syncs(device_view=True) as c:
        float(x.sum())              # .item()
        _ = x[mask]                 # boolean-mask index
        _ = mask.nonzero()          # data-dependent shape
        _ = x.sum(0).tolist()       # device-to-host read
        host = x.cpu()              # device-to-host copy ...
        float(host[0, 0])           # ... whose host copy is then free to read
        with host_sync.host_work():
            float(x.max())          # marked host work: not counted
    assert dict(c.counts) == {"scalar": 1, "boolean_index": 1, "data_dependent_shape": 1, "device_to_host": 2}
    assert c.total == 5


def test_gathering_with_host_indices_needs_no_sync():
    """What the step does instead of `h[mask]`: indices made from the host copy of the mask."""
    from d2v.batch import target_index

    mask = torch.rand(3, 10) > 0.5
    index = target_index(mask, None, drops_masked=False)
    h = torch.randn(3, 10, 4)
    with host_sync.count_host_syncs(device_view=True) as c:
        gathered = h.flatten(0, 1).index_select(0, index.targets)
    assert c.total == 0
    assert torch.equal(gathered, h[mask])


def _check(case, steps, groups, zero, precision):
    assert steps, case
    for step, log_step, count, kinds in steps:
        limit = budget(zero, precision, log_step=log_step, param_groups=groups)
        assert count <= limit, f"{case} step {step} ({'log' if log_step else 'plain'}): {count} > {limit}: {kinds}"
        assert count >= 1, f"{case} step {step}: the step's own decision was not counted ({kinds})"


@pytest.mark.parametrize("preset, zero", CASES_1)
def test_sync_budget_one_process(tmp_path, preset, zero):
    from d2v.config import resolve
    from d2v.train.launch import build_run
    from d2v.train.sync_budget import count_run_syncs

    cfg = resolve(preset, overrides=["train.max_steps=8", "train.log_every=2", "train.save_every=0", "train.val_every=0",
                                     f"train.out_dir={tmp_path}"])
    run = build_run(cfg, {"zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}, console=False)
    try:
        for _ in range(2):  # warm-up, uncounted (ZeRO-3 records and checks its fetch trace)
            run.trainer.train_step([run.stream.next_batch() for _ in range(cfg.train.grad_accum)])
        counted, _ = count_run_syncs(run, 4)
        groups = len(run.trainer.engine.optimizer.param_groups)
    finally:
        run.close()
    _check((preset, zero), [[s.step, s.log_step, s.count, s.kinds] for s in counted], groups, zero,
           cfg.train.precision)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from launch import launch_two_ranks

    out = str(tmp_path_factory.mktemp("sync_budget"))
    return launch_two_ranks("tests/dist/sync_scenarios.py", out, "--cases", json.dumps(CASES_2))


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=[f"{p}-z{z}" for p, z in CASES_2])
def test_sync_budget_two_ranks(two_ranks, i):
    for rank in two_ranks:
        case = rank[i]
        _check((case["preset"], case["zero"], "world 2"), case["steps"], case["groups"], case["zero"],
               case["precision"])


def test_the_counter_sees_device_wide_waits():
    """The accelerator's synchronize() dispatches no tensor operation: counted all the same."""
    from deepspeed.accelerator import get_accelerator

    with host_sync.count_host_syncs(device_view=True) as c:
        get_accelerator().synchronize()
    assert dict(c.counts) == {"device_wide": 1}
    assert get_accelerator().synchronize.__name__ != "counted"  # restored


def test_deepspeeds_throughput_timer_is_off_in_the_filled_json():
    from d2v.config import fill_ds_config, get_preset

    ds = fill_ds_config({"zero_optimization": {"stage": 2}}, get_preset("audio_tiny"), 2, on_cpu=False)
    assert ds["timers"]["throughput"] == {"enabled": False, "synchronized": False}


def test_the_counter_sees_tensors_built_from_host_data_on_a_device():
    """torch.tensor(x, device=d) copies from pageable host memory and blocks, and dispatches no
    operator (DeepSpeed builds one per gradient-norm group): counted; a host tensor is not, and a
    `.tolist()` is counted once although a torch-function mode sees it too."""
    import torch

    with host_sync.count_host_syncs(device_view=True) as c:
        torch.tensor([1.0, 2.0], device="cpu")  # a GPU run names its accelerator here
        torch.as_tensor(3.0, device="cpu")
        torch.tensor([1.0])  # a host tensor, copied later without blocking if at all
        with host_sync.host_work():
            torch.tensor([4.0], device="cpu")
        torch.ones(2).tolist()
    assert dict(c.counts) == {"host_data_to_device": 2, "device_to_host": 1}


def test_the_finiteness_hook_is_one_kernel_per_gradient():
    """The guarded update watches every gradient for NaN/inf: one reduction per parameter per
    micro-batch (its sums are added once, at the decision), not a reduction and an add."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from d2v.train.guarded_update import GuardedUpdate

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def backward_ops(hooked: bool) -> int:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])  # 10 parameters
        if hooked:
            GuardedUpdate(None, model, 1, torch.device("cpu")).begin()
        loss = model(torch.randn(2, 4)).square().sum()
        with Ops() as ops:
            loss.backward()
        return ops.n

    assert backward_ops(True) - backward_ops(False) == 10


def test_weight_norms_copy_one_scalar_per_device_not_one_per_tensor():
    """An offloaded teacher's EMA lives on the host: its log-step norm reduces there and crosses
    to the device once (it was one blocking copy per parameter). Counted on `Tensor.to` calls
    that change device, with the float64 sum as the reference."""
    from torch.overrides import TorchFunctionMode

    from d2v.train.trainer import square_sum

    class CountMoves(TorchFunctionMode):
        moves = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                CountMoves.moves += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    tensors = [torch.randn(7, 5, dtype=torch.bfloat16) for _ in range(40)] + [torch.randn(11), None]
    with CountMoves():
        got = square_sum(tensors, torch.device("cpu"))
    want = sum(float(t.double().square().sum()) for t in tensors if t is not None)
    assert CountMoves.moves <= 1 and abs(float(got) - want) <= 1e-6 * want
