"""What GPU users read off a run log: positions (frames, patches or tokens) per second, achieved
TFLOP/s per device and MFU, and peak device memory.

FLOPs are the analytic counts of d2v/estimate/flops.py for the shapes each step actually ran: student
forward and backward, the teacher's forward and the audio feature encoder all count. MFU is taken
against `train.peak_tflops` when set, else the device's bf16 dense datasheet peak; the log names
which. A CPU has no datasheet entry: without `train.peak_tflops` its MFU is left out.
"""
from __future__ import annotations

import resource
import torch

from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig

# bf16 dense tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity).
DATASHEET_BF16_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 SXM", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0),
)


def datasheet_peak(device_name: str) -> float | None:
    for key, peak in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def peak_tflops(cfg: D2vConfig, device: torch.device) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where the number comes from)."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name)
        if peak is not None:
            return peak, f"{name} bf16 dense datasheet"
        return None, f"{name}: no datasheet entry (set train.peak_tflops)"
    return None, "no datasheet for a CPU (set train.peak_tflops)"


class StepFlops:
    """Analytic training FLOPs of micro-batches, cached by the one shape that varies (audio length).
    Only the student blocks that ran count: LayerDrop skips some in training (the teacher runs all)."""

    def __init__(self, cfg: D2vConfig) -> None:
        self.cfg = cfg
        self.spec = modality_spec(cfg.model.modality)
        self.num_blocks = cfg.model.depth + cfg.model.v2.prenet_depth  # 1.0 models have no prenet
        self._per_sample: dict[int, tuple[float, float]] = {}

    def __call__(self, source: torch.Tensor, blocks_run: int | None = None) -> float:
        from d2v.estimate.flops import flops_per_sample

        spec = self.spec
        length = int(source.shape[1]) if spec.varies_in_length else 0
        if length not in self._per_sample:
            seconds = spec.seconds(self.cfg, length) if spec.varies_in_length else 1.0
            count = flops_per_sample(self.cfg, seconds)
            self._per_sample[length] = count.train_step, count.blocks
        step, blocks = self._per_sample[length]
        skipped = 0 if blocks_run is None else self.num_blocks - blocks_run
        # every block costs the same (one width, the same tokens); forward + backward = 3 forwards
        return int(source.shape[0]) * (step - 3.0 * blocks * skipped / self.num_blocks)


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory allocated by this process (host RSS on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def interval_values(cfg: D2vConfig, *, samples: float, positions: float, flops: float, elapsed: float,
                    world_size: int, peak: float | None, device: torch.device) -> dict[str, float]:
    """Rates over a log interval: samples, positions and FLOPs are summed over ranks."""
    elapsed = max(elapsed, 1e-9)
    tflops = flops / elapsed / world_size / 1e12
    out = {"samples_per_s": samples / elapsed, "positions_per_s": positions / elapsed,
           "tflops_per_device": tflops, "peak_mem_gib": peak_memory_gib(device)}
    if peak:
        out["mfu"] = tflops / peak
    return out
