"""Kernel benchmarks (docs/method.md §5, §6): bytes and FLOPs per call counted analytically, fused vs
unfused PyTorch, at data2vec shapes; on a GPU also the measured time and the achieved GB/s
against the device's measured copy bandwidth. On a CPU only the analytic table is printed.

    python benchmarks/kernels.py [--only targets] [--reps 50]

Extend: add cases to CASES (a Case has a name, the byte/FLOP model and a GPU runner).
Writes benchmarks/results/kernels-all-<stamp>.json.

Byte model of the targets (per element of B×T×D; s = bytes of the layer output dtype, 2 for
bf16; the running sum and the target are fp32). Each op below is one kernel that reads and
writes HBM; eager PyTorch (kernels.targets_reference) runs, per layer:
  instance: x.float() (r s, w 4) · F.instance_norm of the B×D×T view: .contiguous() (r 4, w 4),
            statistics (r 4), normalise (r 4, w 4) · acc.add_(y) (r 8, w 4)
  layer:    x.float() (r s, w 4) · F.layer_norm (r 4, w 4) · acc.add_ (r 8, w 4)
  None:     x.float() (r s, w 4) · acc.add_ (r 8, w 4)
  (the first layer has no add: its normalised output becomes the sum)
  finalize: acc.div_(K) (r 4, w 4), then the final norm as above without the cast.
The fused kernels (d2v/kernels/targets_triton.py), per layer:
  instance: statistics (r s) + normalise-and-add (r s, r 4, w 4);  layer/None: (r s, r 4, w 4)
  (first layer: no read of the sum) · finalize: instance r 4 + (r 4, w 4); layer/None (r 4, w 4).
Padding adds masked_fill passes to the unfused path (r 4, w 4 each) and nothing to the fused
one; the table counts the unpadded case, the cheaper one for the unfused path.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import machine, sync, table, write_record  # noqa: E402

# Arithmetic per element (sub, mul, add for the statistics; sub, mul, add to normalise and sum):
# the same for both forms, a few FLOPs per byte at most, so the roofline is bandwidth alone.
NORM_FLOPS = {"instance": 8, "layer": 8, None: 1}


def unfused_layer_bytes(norm: str | None, s: int, first: bool) -> int:
    cast = s + 4
    body = {"instance": 8 + 4 + 8, "layer": 8, None: 0}[norm]
    add = 0 if first else 12
    return cast + body + add


def unfused_finalize_bytes(norm: str | None) -> int:
    return 8 + {"instance": 8 + 4 + 8, "layer": 8, None: 0}[norm]


def fused_layer_bytes(norm: str | None, s: int, first: bool) -> int:
    reads_x = 2 * s if norm == "instance" else s
    return reads_x + (4 if first else 8)


def fused_finalize_bytes(norm: str | None) -> int:
    return 12 if norm == "instance" else 8


@dataclasses.dataclass(frozen=True)
class TargetsCase:
    name: str
    B: int
    T: int
    D: int
    K: int
    layer_norm: str | None
    final_norm: str | None
    dtype_bytes: int = 2  # bf16 teacher

    @property
    def elements(self) -> int:
        return self.B * self.T * self.D

    def bytes(self, fused: bool) -> int:
        layer = fused_layer_bytes if fused else unfused_layer_bytes
        final = fused_finalize_bytes if fused else unfused_finalize_bytes
        per = sum(layer(self.layer_norm, self.dtype_bytes, i == 0) for i in range(self.K)) + final(self.final_norm)
        return per * self.elements

    def flops(self) -> int:
        return (self.K * NORM_FLOPS[self.layer_norm] + 1 + NORM_FLOPS[self.final_norm]) * self.elements

    def analytic(self) -> dict:
        unfused, fused = self.bytes(False), self.bytes(True)
        return dict(case=self.name, shape=f"{self.B}x{self.T}x{self.D}", K=self.K,
                    norms=f"{self.layer_norm}/{self.final_norm}", unfused_MB=unfused / 1e6,
                    fused_MB=fused / 1e6, ratio=unfused / fused, GFLOP=self.flops() / 1e9,
                    flop_per_byte_fused=self.flops() / fused)

    def run_gpu(self, reps: int) -> dict:
        from d2v import kernels
        import d2v.kernels.targets_reference as ref

        gen = torch.Generator(device="cuda").manual_seed(0)
        layers = [torch.randn(self.B, self.T, self.D, device="cuda", dtype=torch.bfloat16, generator=gen)
                  for _ in range(self.K)]
        kw = dict(top_k=self.K, layer_norm=self.layer_norm, final_norm=self.final_norm)
        fused_ms = time_ms(lambda: kernels.fused_targets(layers, **kw), reps)
        unfused_ms = time_ms(lambda: ref.fused_targets(layers, **kw), reps)
        err = (kernels.fused_targets(layers, **kw) - ref.fused_targets(layers, **kw)).abs().max().item()
        return dict(fused_ms=fused_ms, unfused_ms=unfused_ms, speedup=unfused_ms / fused_ms,
                    fused_GBps=self.bytes(True) / fused_ms / 1e6, unfused_GBps=self.bytes(False) / unfused_ms / 1e6,
                    max_abs_err=err)


def time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median of `reps` CUDA-event timings after warm-up (the first call compiles)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_GBps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured device peak: a large device-to-device copy reads and writes nbytes each."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src), reps) / 1e6


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One self-attention call (B×H×T×Dh, bf16) forward + backward. FLOPs (ds_anchors.md 4):
    forward 4·B·H·T²·Dh, backward 2.5× forward (2× plus the recomputed scores). Bytes: a fused
    kernel's compulsory traffic (forward reads q, k, v and writes o and the fp32 log-sum-exp;
    backward reads q, k, v, o, do, lse and delta and writes dq, dk, dv) against an eager
    implementation that also writes and reads the T×T scores and probabilities in bf16
    (scores written, read by softmax, probabilities written, read by the matmul: 8 B per score
    forward; backward reads P, writes and reads dP and dS: 8 B more)."""
    name: str
    B: int
    T: int
    D: int
    H: int
    padding: bool = False  # half the samples padded by 20 %, the rest full
    dropout_p: float = 0.0
    alibi: bool = False  # ALiBi with kept positions (data2vec 2.0 style), computed in the kernel

    @property
    def Dh(self) -> int:
        return self.D // self.H

    def flops(self, backward: bool) -> int:
        fwd = 4 * self.B * self.H * self.T ** 2 * self.Dh
        return int(fwd * (3.5 if backward else 1.0))

    def bytes(self, fused: bool) -> int:
        bhtd, bht = self.B * self.H * self.T * self.Dh, self.B * self.H * self.T
        compulsory = (4 * bhtd * 2 + bht * 4) + (8 * bhtd * 2 + 2 * bht * 4)
        scores = 0 if fused else 16 * self.B * self.H * self.T ** 2
        return compulsory + scores

    def analytic(self) -> dict:
        options = "+".join(o for o, on in (("pad", self.padding), (f"drop{self.dropout_p}", self.dropout_p > 0),
                                            ("alibi", self.alibi)) if on) or "-"
        return dict(case=self.name, shape=f"{self.B}x{self.H}x{self.T}x{self.Dh}", options=options,
                    GFLOP_fwd=self.flops(False) / 1e9, GFLOP_fwd_bwd=self.flops(True) / 1e9,
                    fused_MB=self.bytes(True) / 1e6, eager_MB=self.bytes(False) / 1e6,
                    flop_per_byte_fused=self.flops(True) / self.bytes(True))

    def run_gpu(self, reps: int) -> dict:
        import importlib

        from d2v.kernels import Alibi, alibi_slopes

        dispatch = importlib.import_module("d2v.kernels.attention")
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(self.B, self.H, self.T, self.Dh, device="cuda", dtype=torch.bfloat16,
                               generator=gen, requires_grad=True) for _ in range(3))
        kpm = None
        if self.padding:
            kpm = torch.zeros(self.B, self.T, dtype=torch.bool, device="cuda")
            kpm[: self.B // 2, int(0.8 * self.T):] = True
        alibi = None
        if self.alibi:
            pos = torch.stack([torch.randperm(2 * self.T, device="cuda")[: self.T].sort().values
                               for _ in range(self.B)])
            alibi = Alibi(alibi_slopes(self.H).cuda(), torch.ones(self.H, device="cuda", requires_grad=True), pos)
        do = torch.randn_like(q)
        out = {}
        for name in ("triton", "xformers", "sdpa"):
            args = (kpm, None, alibi, self.dropout_p, None)
            if name == "xformers" and "xformers" not in dispatch.candidates(q, k, alibi=alibi):
                continue
            run = dispatch.RUNNERS[name]
            try:
                fwd_ms = time_ms(lambda: run(q, k, v, *args), reps)
                step_ms = time_ms(lambda: torch.autograd.grad(run(q, k, v, *args), (q, k, v), do), reps)
            except Exception as err:  # a backend that can't run this case is reported, not fatal
                out[f"{name}_error"] = repr(err)[:80]
                continue
            out[f"{name}_fwd_ms"] = fwd_ms
            out[f"{name}_ms"] = step_ms
            out[f"{name}_TFLOPs"] = self.flops(True) / step_ms / 1e9
        return out


ATTENTION_COLUMNS = [("case", "case", "{}"), ("shape", "B×H×T×Dh", "{}"), ("options", "options", "{}"),
                     ("GFLOP_fwd", "GFLOP fwd", "{:.1f}"), ("GFLOP_fwd_bwd", "GFLOP fwd+bwd", "{:.1f}"),
                     ("fused_MB", "fused MB", "{:.1f}"), ("eager_MB", "eager MB", "{:.1f}"),
                     ("flop_per_byte_fused", "FLOP/B fused", "{:.0f}")]
ATTENTION_GPU_COLUMNS = [("case", "case", "{}")] + [
    (f"{b}_{m}", f"{b} {h}", fmt) for b in ("triton", "xformers", "sdpa")
    for m, h, fmt in (("fwd_ms", "fwd ms", "{:.3f}"), ("ms", "fwd+bwd ms", "{:.3f}"), ("TFLOPs", "TFLOP/s", "{:.0f}"))]


# data2vec 1.0 base shapes (docs/method.md §3.2): audio 20 s at 50 Hz, ViT-B/16 at 224², text at 512.
CASES: dict[str, list] = {
    "targets": [
        TargetsCase("audio_base", B=8, T=999, D=768, K=8, layer_norm="instance", final_norm=None),
        TargetsCase("image_base", B=8, T=197, D=768, K=6, layer_norm="layer", final_norm="layer"),
        TargetsCase("text_base", B=8, T=512, D=768, K=10, layer_norm="layer", final_norm=None),
    ],
    # Attention dropout as in the presets (audio/text 0.1); ViT without; ALiBi as in 2.0 audio.
    "attention": [
        AttentionCase("audio_base", B=8, T=999, D=768, H=12, padding=True, dropout_p=0.1),
        AttentionCase("image_base", B=8, T=197, D=768, H=12),
        AttentionCase("text_base", B=8, T=512, D=768, H=12, padding=True, dropout_p=0.1),
        AttentionCase("audio_base_v2_alibi", B=8, T=999, D=768, H=12, padding=True, alibi=True),
        AttentionCase("audio_large", B=8, T=999, D=1024, H=16, padding=True, dropout_p=0.1),
    ],
}
COLUMNS = [("case", "case", "{}"), ("shape", "B×T×D", "{}"), ("K", "K", "{}"), ("norms", "layer/final", "{}"),
           ("unfused_MB", "unfused MB", "{:.1f}"), ("fused_MB", "fused MB", "{:.1f}"),
           ("ratio", "bytes unfused/fused", "{:.2f}"), ("GFLOP", "GFLOP", "{:.3f}"),
           ("flop_per_byte_fused", "FLOP/B fused", "{:.2f}")]
GPU_COLUMNS = [("case", "case", "{}"), ("fused_ms", "fused ms", "{:.3f}"), ("unfused_ms", "unfused ms", "{:.3f}"),
               ("speedup", "speedup", "{:.2f}"), ("fused_GBps", "fused GB/s", "{:.0f}"),
               ("unfused_GBps", "unfused GB/s", "{:.0f}"), ("pct_peak", "fused % of copy BW", "{:.0f}"),
               ("max_abs_err", "max |err|", "{:.1e}")]

GROUP_COLUMNS = {"targets": (COLUMNS, GPU_COLUMNS), "attention": (ATTENTION_COLUMNS, ATTENTION_GPU_COLUMNS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), help="one group of cases")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    record = {"machine": machine(), "groups": {}}
    on_gpu = torch.cuda.is_available()
    peak = copy_bandwidth_GBps() if on_gpu else None
    record["copy_bandwidth_GBps"] = peak
    for group, cases in CASES.items():
        if args.only and group != args.only:
            continue
        rows = [case.analytic() for case in cases]
        columns, gpu_columns = GROUP_COLUMNS[group]
        print(f"## {group}: analytic bytes and FLOPs per call\n")
        print(table(rows, columns))
        if on_gpu:
            timed = []
            for case, row in zip(cases, rows):
                t = {"case": case.name, **case.run_gpu(args.reps)}
                if "fused_GBps" in t:
                    t["pct_peak"] = 100 * t["fused_GBps"] / peak
                row.update(t)
                timed.append(t)
            print(f"\n## {group}: measured on {record['machine']['device']} (copy {peak:.0f} GB/s)\n")
            print(table(timed, gpu_columns))
        record["groups"][group] = rows
    print("\nwrote", write_record("kernels", record, args.out_dir))


if __name__ == "__main__":
    main()
