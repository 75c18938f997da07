"""The kernel rows of the GPU acceptance check (benchmarks/gpu_check.py): every attention
candidate and the Triton target kernels against their references, forward and gradients."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error limits ||x - ref|| / ||ref||, by dtype. Float32 on a GPU runs matmuls in TF32
# (10-bit mantissa); on a CPU (and in the interpreter) it is exact fp32 arithmetic.
LIMITS_GPU = {"bf16": 4e-2, "fp16": 5e-3, "fp32": 5e-3}
LIMITS_CPU = {"bf16": 4e-2, "fp16": 5e-3, "fp32": 1e-4}
TARGETS_LIMIT = 1e-4


# -- kernel parity -----------------------------------------------------------------------------
def attention_cases(quick: bool, on_gpu: bool) -> dict[str, tuple[int, int, int, tuple[str, ...]]]:
    """name -> (Tq, Tk, Dh, options). Lengths: odd, and T % 128 == 64 (cuDNN's reported NaN in
    grad_q with a mask on Hopper); every case has padding or a dead sample except the cross one."""
    if quick and not on_gpu:
        return {"odd_pad": (37, 37, 64, ("pad",)),
                "t64_bias_dead": (64, 64, 64, ("bias_shared", "dead_row")),
                "odd_alibi_pos_pad": (29, 29, 64, ("alibi_pos", "pad"))}
    return {"odd_pad_dh80": (333, 333, 80, ("pad",)),
            "t192_bias_pad": (192, 192, 64, ("bias_shared", "pad")),
            "t320_bias_full_dead": (320, 320, 64, ("bias_full", "dead_row")),
            "t192_alibi_pos_pad": (192, 192, 64, ("alibi_pos", "pad")),
            "odd_alibi_bias_dh128": (129, 129, 128, ("alibi", "bias_shared", "pad")),
            "cross_bias_row": (61, 190, 64, ("bias_row",))}


def _attention_inputs(tq, tk, dh, options, device, gen, B=2, H=4):
    from d2v.kernels.attention_reference import Alibi, alibi_slopes

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x: dict[str, Any] = dict(q=randn(B, H, tq, dh), k=randn(B, H, tk, dh), v=randn(B, H, tk, dh))
    if "pad" in options:
        lengths = torch.tensor([tk - 3] + [max(1, tk // 2 - 1)] * (B - 1), device=device)
        x["key_padding_mask"] = torch.arange(tk, device=device)[None, :] >= lengths[:, None]
    if "dead_row" in options:
        mask = torch.zeros(B, tk, dtype=torch.bool, device=device)
        mask[-1] = True  # every key of the last sample padded
        x["key_padding_mask"] = mask
    if "bias_shared" in options:
        x["bias"] = randn(1, H, tq, tk)  # BEiT's relative position bias, shared over the batch
    if "bias_full" in options:
        x["bias"] = randn(B, H, tq, tk)
    if "bias_row" in options:
        x["bias"] = randn(B, 1, 1, tk)
    if "alibi" in options or "alibi_pos" in options:
        pos = None
        if "alibi_pos" in options:  # kept positions of a masked sequence (data2vec 2.0's student)
            pos = torch.stack([torch.randperm(3 * tq, generator=gen, device=device)[:tq].sort().values
                               for _ in range(B)])
        x["alibi"] = Alibi(alibi_slopes(H).to(device), torch.rand(H, generator=gen, device=device) + 0.5, pos)
    return x


def _leaf_names(x) -> list[str]:
    return ["q", "k", "v"] + (["bias"] if "bias" in x else []) + (["scale"] if "alibi" in x else [])


def _leaves(x) -> list[torch.Tensor]:
    out = [x["q"], x["k"], x["v"]]
    if "bias" in x:
        out.append(x["bias"])
    if "alibi" in x:
        out.append(x["alibi"].scale_H)
    return out


def _with_leaves(x, leaves):
    from d2v.kernels.attention_reference import Alibi

    y = dict(x, q=leaves[0], k=leaves[1], v=leaves[2])
    i = 3
    if "bias" in x:
        y["bias"], i = leaves[i], i + 1
    if "alibi" in x:
        a = x["alibi"]
        slopes = a.slopes_H.to(x.get("_round", a.slopes_H.dtype)).to(leaves[i].dtype)
        y["alibi"] = Alibi(slopes, leaves[i], a.positions_BT)
    return y


def _forward_backward(fn, x, dtype, do):
    """Output and gradients in `dtype` from inputs rounded to x["_round"] first, so that a
    candidate (dtype == the rounding) and the float64 reference see the same values."""
    leaves = [t.detach().to(x["_round"]).to(dtype).requires_grad_() for t in _leaves(x)]
    y = {k: v for k, v in _with_leaves(x, leaves).items() if k != "_round"}
    o = fn(y)
    grads = torch.autograd.grad(o, leaves, do.to(x["_round"]).to(dtype))
    return o, grads


def _alibi_grad_magnitude(x, do) -> torch.Tensor:
    """slope_h · Σ |dS_ij| · dist_ij in float64: the size of the terms of d scale_h, which cancel
    (Σ_j dS_ij = 0), so the gradient's error is judged against them, not against the small sum."""
    from d2v.kernels.attention_reference import Alibi, alibi_bias, attention_reference

    leaves = [t.detach().to(x["_round"]).double() for t in _leaves(x)]
    y = {k: v for k, v in _with_leaves(x, leaves).items() if k != "_round"}
    B, H, tq, _ = y["q"].shape
    zero = torch.zeros(B, H, tq, y["k"].shape[2], dtype=torch.float64, device=y["q"].device, requires_grad=True)
    y["bias"] = zero if "bias" not in y else y["bias"] + zero
    o = attention_reference(**y)
    (ds,) = torch.autograd.grad(o, zero, do.to(x["_round"]).double())
    a = y["alibi"]
    ones = torch.ones(H, dtype=torch.float64, device=ds.device)
    dist = -alibi_bias(Alibi(ones, ones, a.positions_BT), B, tq, tq, ds.device).double()
    return (ds.abs() * dist).sum((0, 2, 3)) * a.slopes_H.double()


def _eligibility(name: str, x, dtype: torch.dtype, on_gpu: bool, interpreting: bool) -> str | None:
    """None when `name` may run this call, else why not."""
    import importlib

    dispatch = importlib.import_module("d2v.kernels.attention")
    if name == "reference":
        return None
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception:
            return "xformers is not installed"
    if not on_gpu:
        if name == "sdpa":
            return None
        if name == "triton":
            if not interpreting:
                return "CPU without TRITON_INTERPRET=1"
            if dtype == torch.bfloat16:
                return "the interpreter's tl.dot is wrong in bf16"
            return None
        return "CUDA only"
    # The call needs every gradient: eligibility is asked with differentiable bias and scale.
    bias = None if x.get("bias") is None else x["bias"].detach().to(dtype).requires_grad_()
    alibi = x.get("alibi")
    if alibi is not None:
        alibi = alibi._replace(scale_H=alibi.scale_H.detach().to(dtype).requires_grad_())
    q = x["q"].to(dtype).requires_grad_()
    try:
        eligible = dispatch.candidates(q, x["k"].to(dtype), bias=bias, alibi=alibi)
    except TypeError:  # another signature: let the runner decide by failing or not
        return None
    return None if name in eligible else "not eligible for this call (kernels.attention.candidates)"


def check_attention(report, args, device: torch.device) -> None:
    import importlib

    from d2v.kernels.attention_reference import attention_reference

    dispatch = importlib.import_module("d2v.kernels.attention")
    on_gpu = device.type == "cuda"
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    limits = LIMITS_GPU if on_gpu else LIMITS_CPU
    cases = attention_cases(args.quick, on_gpu)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    inputs = {}
    for case, (tq, tk, dh, options) in cases.items():
        x = _attention_inputs(tq, tk, dh, options, device, gen)
        do = torch.randn(x["q"].shape, generator=gen, device=device)
        inputs[case] = (x, do)
    for name in dispatch.RUNNERS:
        runner = dispatch.RUNNERS[name]
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            limit = limits[dname] * args.tolerance_scale
            row = f"attention/{name}/{dname}"
            per_case: dict[str, Any] = {}
            worst = (-1.0, "")
            for case, (x, do) in inputs.items():
                x = dict(x, _round=dtype)
                why = _eligibility(name, x, dtype, on_gpu, interpreting)
                if why is not None:
                    per_case[case] = f"n/a: {why}"
                    continue
                try:
                    o, grads = _forward_backward(
                        lambda y: runner(y["q"], y["k"], y["v"], y.get("key_padding_mask"), y.get("bias"),
                                         y.get("alibi"), 0.0, None), x, dtype, do)
                except Exception as e:
                    per_case[case] = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
                    worst = (math.inf, f"{case} raised")
                    continue
                o_ref, grads_ref = _forward_backward(lambda y: attention_reference(**y), x, torch.float64, do)
                errs = {}
                for t, g, r in zip(["out"] + _leaf_names(x), (o, *grads), (o_ref, *grads_ref)):
                    diff = (g.double() - r)
                    if not torch.isfinite(g).all():
                        errs[t] = math.inf
                    elif t == "scale":
                        errs[t] = float((diff.abs() / _alibi_grad_magnitude(x, do).clamp_min(1e-30)).max())
                    else:
                        errs[t] = float(diff.norm() / r.norm().clamp_min(1e-30))
                if "dead_row" in cases[case][3] and bool((o[-1] != 0).any()):
                    errs["dead_row_nonzero"] = math.inf
                per_case[case] = errs
                t, e = max(errs.items(), key=lambda kv: kv[1])
                if e > worst[0]:
                    worst = (e, f"{case} d{t}" if t not in ("out", "dead_row_nonzero") else f"{case} {t}")
            ran = [c for c, v in per_case.items() if isinstance(v, dict)]
            errors = [c for c, v in per_case.items() if isinstance(v, str) and v.startswith("error")]
            skipped = {c: v for c, v in per_case.items() if isinstance(v, str) and v.startswith("n/a")}
            if not ran and not errors:
                report.add(row, f"n/a: {sorted(set(skipped.values()))[0][5:]}", None, None, None, cases=per_case)
                continue
            ok = not errors and worst[0] <= limit
            note = f"; {len(skipped)} n/a" if skipped else ""
            report.add(row, f"{len(ran)}/{len(cases)} cases, worst {worst[1]}{note}", worst[0], limit, ok,
                       cases=per_case)


TARGET_NORMS = (("instance", None), (None, "layer"), ("layer", None), ("instance", "instance"))


def check_targets(report, args, device: torch.device) -> None:
    from d2v import kernels
    import d2v.kernels.targets as kt
    from d2v.kernels import targets_reference as ref

    on_gpu = device.type == "cuda"
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if args.quick and not on_gpu:  # the interpreter runs ~40 ms per program: two cheap cases
        B, D, K, cases = 2, 32, 2, [(37, None, "instance"), (64, None, "layer")]
    else:
        B, D, K = 4, 768, 8
        cases = [(T, ln, fn) for T in (333, 192) for ln, fn in TARGET_NORMS]
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    for dname in args.dtypes:
        row = f"targets/triton/{dname}"
        if kt._tt is None:
            report.na(row, "triton does not import")
            continue
        if not on_gpu and not interpreting:
            report.na(row, "CPU without TRITON_INTERPRET=1")
            continue
        dtype = DTYPES[dname]
        # Kernel and reference read the same rounded inputs and compute in fp32 (no matmul).
        limit = TARGETS_LIMIT * args.tolerance_scale
        per_case, worst = {}, (-1.0, "")
        env = {} if on_gpu else {"D2V_KERNELS": "triton"}
        for T, layer_norm, final_norm in cases:
            pad = torch.zeros(B, T, dtype=torch.bool, device=device)
            pad[0, T - 5:] = True
            pad[-1] = True  # a fully padded sample
            layers = [torch.randn(B, T, D, generator=gen, device=device).to(dtype) for _ in range(K)]
            case = f"T{T}_{layer_norm}_{final_norm}"
            with _env(env):
                y = kernels.fused_targets(layers, top_k=K, layer_norm=layer_norm, final_norm=final_norm,
                                          padding_mask=pad)
                used = kt.backend(layers[0])
            want = ref.fused_targets([t.double() for t in layers], top_k=K, layer_norm=layer_norm,
                                     final_norm=final_norm, padding_mask=pad)
            err = float((y.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            if not torch.isfinite(y).all() or bool((y[pad] != 0).any()) or used != "triton":
                err = math.inf
            per_case[case] = {"rel_err": err, "backend": used}
            if err > worst[0]:
                worst = (err, case)
        report.add(row, f"{len(per_case)} cases (padding, a fully padded sample), worst {worst[1]}", worst[0],
                   limit, worst[0] <= limit, cases=per_case)


@contextlib.contextmanager
def _env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
