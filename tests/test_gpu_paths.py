"""GPU-only branches forced on the CPU (unit layer): the DeepSpeed JSON filled for a GPU, the
device ordinal under one-GPU-per-task binding, pinned batches, and the run log's MFU."""
import pytest
import torch

from d2v.config import resolve
from d2v.config.deepspeed_json import DeepSpeedConfigError, fill_ds_config, optimizer_description
from d2v.train.distributed import local_device_index
from d2v.train.throughput_log import datasheet_peak, interval_values, peak_tflops

ZERO2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}


def test_a_gpu_run_uses_torch_fused_adamw_unless_deepspeed_is_asked_for():
    cfg = resolve("audio_base")
    ds = fill_ds_config(ZERO2, cfg, 8, on_cpu=False)
    params = ds["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # no FusedAdam JIT build on any node
    assert optimizer_description(ds) == "torch.optim.AdamW(fused=True)"
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True  # a GPU host can pin
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}  # d2v decides finiteness
    asked = fill_ds_config(ZERO2, resolve("audio_base", overrides=["optim.implementation=deepspeed"]), 8, on_cpu=False)
    assert "torch_adam" not in asked["optimizer"]["params"]
    assert optimizer_description(asked).startswith("DeepSpeed FusedAdam")
    on_cpu = fill_ds_config(ZERO2, resolve("audio_base", overrides=["optim.implementation=deepspeed"]), 2, on_cpu=True)
    assert on_cpu["optimizer"]["params"]["torch_adam"] is True  # nothing to compile on a CPU
    assert on_cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    with pytest.raises(DeepSpeedConfigError, match="optim.implementation"):
        fill_ds_config(ZERO2, resolve("audio_base", overrides=["optim.implementation=apex"]), 8, on_cpu=False)


@pytest.mark.parametrize("local_rank, visible, expect", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (0, 1, 0)])
def test_the_device_ordinal_follows_what_the_rank_can_see(local_rank, visible, expect):
    """srun --gpus-per-task=1 shows each task one GPU: every LOCAL_RANK maps to ordinal 0."""
    assert local_device_index(local_rank, visible) == expect


def test_more_ranks_than_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4 but only 4 GPUs"):
        local_device_index(4, 4)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_device_index(0, 0)


def test_batches_are_pinned_with_a_gpu(monkeypatch):
    from d2v.data import loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert loader.pin_batches()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not loader.pin_batches()


def test_batch_pin_memory_keeps_every_field(monkeypatch):
    from d2v.batch import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(tuple(self.shape)) or self.clone())
    b = Batch(source=torch.randn(2, 5), mask=torch.zeros(2, 3, dtype=torch.bool), keys=["a", "b"]).with_index(drops_masked=False)
    out = b.pin_memory()
    assert out.keys == ["a", "b"] and torch.equal(out.source, b.source)
    assert (2, 5) in pinned and (2, 1, 3) in pinned and (0,) in pinned  # source, mask (B×M×T), the target index


def test_mfu_is_taken_against_the_named_peak(monkeypatch):
    assert datasheet_peak("NVIDIA H200") == 989.0
    assert datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak("Some Future GPU") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = resolve("audio_tiny")
    assert peak_tflops(cfg, torch.device("cuda", 0)) == (989.0, "NVIDIA H100 80GB HBM3 bf16 dense datasheet")
    assert peak_tflops(cfg, torch.device("cpu"))[0] is None
    given = resolve("audio_tiny", overrides=["train.peak_tflops=500"])
    assert peak_tflops(given, torch.device("cuda", 0)) == (500.0, "train.peak_tflops")
    # 2 ranks, 4e15 FLOPs in 2 s: 1 PFLOP/s per device; against 500 TFLOP/s that is 200 %
    v = interval_values(cfg, samples=8, positions=400, flops=4e15, elapsed=2.0, world_size=2, peak=500.0,
                        device=torch.device("cpu"))
    assert v["samples_per_s"] == 4 and v["positions_per_s"] == 200
    assert v["tflops_per_device"] == pytest.approx(1000.0) and v["mfu"] == pytest.approx(2.0)
    assert "mfu" not in interval_values(cfg, samples=1, positions=1, flops=1, elapsed=1, world_size=1, peak=None,
                                        device=torch.device("cpu"))


@pytest.mark.parametrize("preset", ["audio_base", "image_base", "text_base", "audio_base_v2", "image_base_v2",
                                    "text_base_v2"])
def test_attention_is_planned_for_every_shape_family_of_a_gpu_run(monkeypatch, preset):
    """On a GPU every rank plans the backends once at start-up with one summing collective; the
    student's family needs gradients (and the bias gradient where the bias is learned)."""
    from d2v import kernels
    from d2v.train import attention_plan

    seen = {}
    monkeypatch.setattr(kernels, "plan_attention", lambda buckets, **kw: seen.update(buckets=buckets, **kw))
    monkeypatch.setattr(kernels, "describe_attention_plan", lambda: ["planned"])
    monkeypatch.setattr(attention_plan.collectives, "world_size", lambda: 8)
    cfg = resolve(preset)
    assert attention_plan.plan_for_run(cfg, torch.device("cuda", 0), torch.bfloat16) == ["planned"]
    buckets = seen["buckets"]
    assert seen["reduce_times"] is attention_plan.collectives.all_reduce_values
    assert seen["num_heads"] == cfg.model.num_heads and seen["batch"](buckets[0]) >= 1
    assert {b.grad for b in buckets} == {True, False}
    assert max(b.tq for b in buckets) >= attention_plan.max_length(cfg)
    assert all(b.dtype == torch.bfloat16 and b.head_dim == 64 for b in buckets)
    if preset == "image_base":
        assert all(b.bias for b in buckets) and any(b.bias_grad for b in buckets)
    if preset == "audio_base_v2":
        assert all(b.alibi for b in buckets) and any(b.alibi_grad for b in buckets)
    # a CPU run, or a head width no fused kernel serves, plans nothing
    assert attention_plan.plan_for_run(cfg, torch.device("cpu"), torch.bfloat16) == []
    assert attention_plan.plan_for_run(resolve("audio_tiny"), torch.device("cuda", 0), torch.bfloat16) == []


@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_the_planned_attention_bias_is_the_one_the_model_has(rel_pos_bias):
    """The plan times bias kernels exactly when the student's encoder holds a learned bias: a vision
    1.0 model without BEiT's relative position bias gets the unbiased kernels it launches."""
    from d2v.models import build_model
    from d2v.train.attention_plan import run_buckets

    cfg = resolve("image_tiny", overrides=[f"model.image.rel_pos_bias={str(rel_pos_bias).lower()}"])
    has_bias = build_model(cfg).encoder.rel_pos_bias is not None
    assert has_bias == rel_pos_bias
    assert {b.bias for b in run_buckets(cfg, torch.bfloat16)} == {has_bias}
