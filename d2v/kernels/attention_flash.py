"""Launchers, custom ops and autograd for the Triton attention kernels (docs/method.md §5).

Legend: B batch, H heads, Tq/Tk query/key length, Dh head width.
`flash_attention` is what dispatch calls. The forward and backward are `torch.library` custom
ops (`d2v_kernels::flash_attention_fwd/bwd`) with fake implementations, so `torch.compile` traces a
model through them as opaque calls; autograd is registered on the forward op.
"""
from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from d2v.kernels.attention_reference import Alibi
# Kernels are looked up on the module at call time: @triton.jit picks interpreter or GPU
# mode when the module is imported, and tests re-import it under TRITON_INTERPRET=1.
from d2v.kernels import attention_triton as _k
from d2v.kernels.attention_triton import LOG2E

HEAD_DIMS = (64, 80, 128)

# Production tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, padded head block,
# heavy). "Heavy" calls carry a bias, ALiBi or dropout: the bias tile, the distances and the
# Philox rounds need registers, so they take smaller tiles. Every entry compiles for sm_80 and
# sm_90 without spills (cuobjdump STACK 0) as the runtime specialises them (RESOURCES.md);
# bigger tiles spilled, and so did 3 stages for the light Dh-64 forward on sm_80 and 4 warps
# for the heavy Dh-128 dQ on sm_90.
CONFIGS = {
    ("fwd", 64, False): (128, 64, 8, 2),
    ("fwd", 128, False): (64, 64, 8, 2),
    ("fwd", 64, True): (128, 32, 8, 2),
    ("fwd", 128, True): (64, 32, 8, 2),
    ("dkdv", 64, False): (64, 64, 8, 2),
    ("dkdv", 128, False): (32, 64, 8, 2),
    ("dkdv", 64, True): (64, 32, 8, 2),
    ("dkdv", 128, True): (32, 32, 8, 2),
    ("dq", 64, False): (64, 64, 8, 2),
    ("dq", 128, False): (64, 64, 8, 2),
    ("dq", 64, True): (32, 64, 4, 2),
    ("dq", 128, True): (32, 32, 8, 2),
}
# The interpreter runs each program on numpy: small tiles keep tests fast and put several
# tile boundaries inside short test sequences.
_INTERPRET_TILE = (32, 32, 4, 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(kind: str, block_d: int, heavy: bool) -> tuple[int, int, int, int]:
    return _INTERPRET_TILE if _interpreting() else CONFIGS[(kind, block_d, heavy)]


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's TF32 switch, like torch's own matmuls do.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _options(q: Tensor, tk: int, kpm, bias, slopes, alibi_scale, positions):
    """Kernel pointer/stride arguments and constexpr flags for the optional inputs. Absent
    tensors are replaced by q (never read: their branch is compiled out)."""
    B, H, Tq, _ = q.shape
    if kpm is not None and kpm.dtype == torch.bool:
        kpm = kpm.view(torch.uint8)
    if kpm is not None and kpm.stride(-1) != 1:
        kpm = kpm.contiguous()
    # expand() gives the broadcast dimensions stride 0: every (b, h) reads the same bias.
    bias4 = bias.expand(B, H, Tq, tk) if bias is not None else None
    coef = (slopes.float() * alibi_scale.detach().float()).contiguous() if slopes is not None else None
    if positions is not None:
        positions = positions.contiguous()
    flags = dict(HAS_KPM=kpm is not None, HAS_BIAS=bias is not None, HAS_ALIBI=slopes is not None,
                 HAS_POS=positions is not None)
    args = [x if x is not None else q for x in (kpm, bias4, coef, positions)]
    strides = [kpm.stride(0) if kpm is not None else 0,
               *(bias4.stride() if bias4 is not None else (0, 0, 0, 0)),
               positions.stride(0) if positions is not None else 0]
    return args, strides, flags


def _run_forward(q, k, v, kpm, bias, slopes, alibi_scale, positions, dropout_p, rng, scale):
    seed, rng_offset = (int(x) for x in rng.tolist())
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    # o takes q's layout (the model's q is a B×T×H×Dh buffer seen as B×H×T×Dh), so the
    # model's transpose back to B×T×D is free; its strides are passed on their own.
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(Dh)
    heavy = bias is not None or slopes is not None or dropout_p > 0.0
    bm, bn, warps, stages = _config("fwd", block_d, heavy)
    opt_args, opt_strides, flags = _options(q, Tk, kpm, bias, slopes, alibi_scale, positions)
    grid = (triton.cdiv(Tq, bm), B * H)
    _k._fwd_kernel[grid](q, k, v, o, lse, *opt_args, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
                      *opt_strides, H, Tq, Tk, scale * LOG2E, dropout_p, seed, rng_offset,
                      HEAD_DIM=Dh, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HAS_DROPOUT=dropout_p > 0.0,
                      PREC=_precision(q.dtype), num_warps=warps, num_stages=stages, **flags)
    return o, lse


def _run_backward(do, q, k, v, o, lse, kpm, bias, slopes, alibi_scale, positions, dropout_p, rng,
                  scale, bias_grad, alibi_grad):
    seed, rng_offset = (int(x) for x in rng.tolist())
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    q, k, v, do = (_last_dim_contiguous(x) for x in (q, k, v, do))
    grads = []
    for x in (q, k, v):
        g = torch.empty_like(x)
        grads.append(g if g.stride() == x.stride() else None)
    if any(g is None for g in grads):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        grads = [torch.empty_like(x) for x in (q, k, v)]
    dq, dk, dv = grads
    # delta_i = Σ_j P_ij dP_ij = do_i · o_i (also with dropout, whose scaling is inside o).
    delta = (o.float() * do.float()).sum(-1).contiguous()
    block_d = triton.next_power_of_2(Dh)
    heavy = bias is not None or slopes is not None or dropout_p > 0.0
    opt_args, opt_strides, flags = _options(q, Tk, kpm, bias, slopes, alibi_scale, positions)
    common = dict(HEAD_DIM=Dh, BLOCK_D=block_d, HAS_DROPOUT=dropout_p > 0.0, PREC=_precision(q.dtype), **flags)
    scalars = (H, Tq, Tk, scale * LOG2E, scale, dropout_p, seed, rng_offset)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *opt_strides)

    bm, bn, warps, stages = _config("dkdv", block_d, heavy)
    n_tiles = triton.cdiv(Tk, bn)
    dbias_full = torch.empty((B, H, Tq, Tk), dtype=torch.float32, device=q.device) if bias_grad else q
    dcoef_part = torch.empty((B * H, n_tiles), dtype=torch.float32, device=q.device) if alibi_grad else q
    _k._bwd_dkdv_kernel[(n_tiles, B * H)](
        q, k, v, do, lse, delta, dk, dv, dbias_full, dcoef_part, *opt_args, *strides, *scalars,
        BLOCK_M=bm, BLOCK_N=bn, BIAS_GRAD=bias_grad, ALIBI_GRAD=alibi_grad,
        num_warps=warps, num_stages=stages, **common)
    bm, bn, warps, stages = _config("dq", block_d, heavy)
    _k._bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, do, lse, delta, dq, *opt_args, *strides, *scalars,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    dbias = q.new_empty(0)
    if bias_grad:
        # dbias is dS summed over the dimensions the bias was broadcast along.
        shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        dims = [i for i in range(4) if shape4[i] == 1 and dbias_full.shape[i] != 1]
        summed = dbias_full.sum(dims, keepdim=True) if dims else dbias_full  # sum([]) sums all
        dbias = summed.reshape(bias.shape).to(bias.dtype)
    dscale = q.new_empty(0)
    if alibi_grad:
        # d scale_h = Σ dS·(-|p_i - p_j|)·slope_h; the kernel summed the first factor.
        dcoef_H = dcoef_part.view(B, H, n_tiles).sum((0, 2))
        dscale = (dcoef_H * slopes.float()).to(alibi_scale.dtype)
    return dq, dk, dv, dbias, dscale


@torch.library.custom_op("d2v_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                        bias: Tensor | None, alibi_slopes: Tensor | None, alibi_scale: Tensor | None,
                        positions: Tensor | None, dropout_p: float, rng: Tensor,
                        scale: float) -> tuple[Tensor, Tensor]:
    """Returns (o B×H×Tq×Dh, lse B×H×Tq fp32 in log2 units, +inf for fully masked rows).
    `rng` is a CPU int64 tensor [seed, offset]: a tensor, not ints, so that torch.compile
    neither specializes on nor recompiles for each step's fresh seed."""
    return _run_forward(q, k, v, key_padding_mask, bias, alibi_slopes, alibi_scale, positions,
                        dropout_p, rng, scale)


@flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, bias, alibi_slopes, alibi_scale, positions, dropout_p, rng, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("d2v_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        key_padding_mask: Tensor | None, bias: Tensor | None,
                        alibi_slopes: Tensor | None, alibi_scale: Tensor | None,
                        positions: Tensor | None, dropout_p: float, rng: Tensor,
                        scale: float, bias_grad: bool, alibi_grad: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv, dbias (bias's shape, or empty) and d alibi_scale (H, or empty)."""
    return _run_backward(do, q, k, v, o, lse, key_padding_mask, bias, alibi_slopes, alibi_scale,
                         positions, dropout_p, rng, scale, bias_grad, alibi_grad)


@flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, bias, alibi_slopes, alibi_scale, positions,
      dropout_p, rng, scale, bias_grad, alibi_grad):
    dbias = torch.empty_like(bias) if bias_grad else q.new_empty(0)
    dscale = torch.empty_like(alibi_scale) if alibi_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dscale


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, bias, slopes, alibi_scale, positions, dropout_p, rng, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kpm, bias, slopes, alibi_scale, positions)
    ctx.rng = (dropout_p, rng, scale)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, kpm, bias, slopes, alibi_scale, positions = ctx.saved_tensors
    dropout_p, rng, scale = ctx.rng
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    alibi_grad = alibi_scale is not None and ctx.needs_input_grad[6]
    dq, dk, dv, dbias, dscale = torch.ops.d2v_kernels.flash_attention_bwd(
        do, q, k, v, o, lse, kpm, bias, slopes, alibi_scale, positions, dropout_p, rng, scale,
        bias_grad, alibi_grad)
    return (dq, dk, dv, None, dbias if bias_grad else None, None, dscale if alibi_grad else None,
            None, None, None, None)


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def draw_seed() -> Tensor:
    """Philox seed from torch's default generator, so `torch.manual_seed` reproduces dropout.
    Below 2**30 so that seed + b·H + h stays a 32-bit kernel argument."""
    return torch.randint(0, 2 ** 30, (1,))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                    bias: Tensor | None = None, alibi: Alibi | None = None, dropout_p: float = 0.0,
                    scale: float | None = None, seed: int | None = None, rng_offset: int = 0) -> Tensor:
    """The Triton path of `kernels.attention` (same contract). `seed`/`rng_offset` pin the
    dropout mask (tests rebuild it with `dropout_keep_mask`); by default the seed is drawn."""
    Dh = q.shape[-1]
    if Dh not in HEAD_DIMS or v.shape[-1] != Dh:
        raise ValueError(f"Triton attention supports head dims {HEAD_DIMS} (q and v alike), got {Dh}")
    if alibi is not None and alibi.positions_BT is not None and q.shape[2] != k.shape[2]:
        raise ValueError("ALiBi positions are shared by queries and keys: Tq must equal Tk")
    scale = Dh ** -0.5 if scale is None else scale
    if seed is not None:
        rng = torch.tensor([seed, rng_offset])
    elif dropout_p > 0.0:
        rng = torch.cat([draw_seed(), torch.tensor([rng_offset])])
    else:
        rng = torch.zeros(2, dtype=torch.int64)
    slopes = scale_h = positions = None
    if alibi is not None:
        slopes, scale_h, positions = alibi.slopes_H.to(q.device), alibi.scale_H, alibi.positions_BT
    o, _ = flash_attention_fwd(q, k, v, key_padding_mask, bias, slopes, scale_h, positions,
                               float(dropout_p), rng, float(scale))
    return o


def dropout_keep_mask(seed: int, rng_offset: int, B: int, H: int, Tq: int, Tk: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> Tensor:
    """The kernels' dropout keep-mask (bool B×H×Tq×Tk) for a given (seed, offset)."""
    out = torch.empty((B, H, Tq, Tk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(Tq, 32), triton.cdiv(Tk, 32), B * H)
    _k._keep_mask_kernel[grid](out, Tq, Tk, float(dropout_p), seed, rng_offset, BLOCK_M=32, BLOCK_N=32)
    return out.bool()


class _LaunchRecorder:
    """Stands in for the kernel module while `record_launches` runs: each `kernel[grid](...)`
    is recorded as (kernel, args, kwargs) instead of launched."""

    def __init__(self, module) -> None:
        self.module, self.launches = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        launches = self.launches

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((fn, args, kwargs))
        return _Grid()


def record_launches(q, k, v, *, key_padding_mask=None, bias=None, alibi=None, dropout_p=0.0,
                    grad=True) -> list[tuple]:
    """(kernel, args, kwargs) of every kernel launch of one call (forward, plus backward when
    `grad`), built by the launchers themselves; nothing runs on a device. The GPU-compile
    check hands these to Triton's own binder, so it compiles what the runtime launches."""
    global _k
    real, _k = _k, _LaunchRecorder(_k)
    try:
        slopes = scale_h = positions = None
        if alibi is not None:
            slopes, scale_h, positions = alibi.slopes_H, alibi.scale_H, alibi.positions_BT
        rng = torch.tensor([12345, 0])
        scale = q.shape[-1] ** -0.5
        o, lse = _run_forward(q, k, v, key_padding_mask, bias, slopes, scale_h, positions, dropout_p, rng, scale)
        if grad:
            _run_backward(torch.empty_like(o), q, k, v, o, lse, key_padding_mask, bias, slopes, scale_h, positions,
                          dropout_p, rng, scale, bias is not None, alibi is not None)
        return _k.launches
    finally:
        _k = real


def model_inputs(B: int, H: int, T: int, Dh: int, dtype: torch.dtype, options: tuple[str, ...]) -> dict:
    """Stand-in inputs laid out as d2v's models pass them: q/k/v are B×T×H×Dh projections seen
    as B×H×T×Dh, BEiT's bias is a gathered 1×H×T×T view of its (T·T)×H table, ALiBi carries
    fp32 slopes, its learned scale and int64 kept positions. Contents are left uninitialised."""
    def heads():
        return torch.empty(B, T, H, Dh, dtype=dtype).transpose(1, 2)

    x = dict(q=heads(), k=heads(), v=heads())
    if "pad" in options:
        x["key_padding_mask"] = torch.zeros(B, T, dtype=torch.bool)
    if "bias" in options:
        x["bias"] = torch.empty(T * T, H, dtype=dtype).view(T, T, H).permute(2, 0, 1).unsqueeze(0)
    if "alibi" in options:
        positions = torch.arange(T).repeat(B, 1) if "positions" in options else None
        x["alibi"] = Alibi(torch.ones(H), torch.ones(H, dtype=dtype), positions)
    if "dropout" in options:
        x["dropout_p"] = 0.1
    return x


# Every distinct attention call of the presets whose head dim has Triton kernels (the base and
# large presets: Dh 64; the tiny presets have Dh 16 and run SDPA): (presets, H, T, options).
# Students train (grad, dropout); teachers run forward only without dropout. Variable-length
# modalities (audio, text) launch with and without a padding mask (no mask when no row is
# padded). tests/test_kernels_compile.py checks the heads and widths against d2v's presets.
def _preset_calls() -> list[tuple[str, int, int, tuple[str, ...]]]:
    calls = []
    for size, H in (("base", 12), ("large", 16)):
        families = (
            (f"audio_{size} text_{size} text_{size}_v2", 999, (), True),
            # the second ViT-L phase (image_large_phase2) runs image_large's shapes
            (f"image_{size}" + (" image_large_phase2" if size == "large" else ""), 197, ("bias",), False),
            (f"audio_{size}_v2", 999, ("alibi",), True),
            (f"image_{size}_v2", 197, (), False),
        )
        for presets, T, base, variable in families:
            v2_image = presets.startswith("image") and presets.endswith("v2")
            student = base + (("positions",) if "alibi" in base else ()) + (() if v2_image else ("dropout",))
            for pad in ((("pad",), ()) if variable else ((),)):
                calls.append((presets + " student", H, T, student + pad + ("grad",)))
                calls.append((presets + " teacher", H, T, base + pad))
    return calls


PRESET_CALLS = _preset_calls()
# Head dims no preset uses, compiled at one layout with the lightest and heaviest options.
OTHER_HEAD_DIM_CALLS = [(f"head dim {dh}, no preset", 16, 999, opts) for dh in (80, 128)
                        for opts in (("pad", "grad"), ("pad", "bias", "alibi", "positions", "dropout", "grad"))]


def _call_launches(H: int, T: int, Dh: int, options: tuple[str, ...], dtype: torch.dtype) -> list[tuple]:
    x = model_inputs(2, H, T, Dh, dtype, options)
    return record_launches(**x, grad="grad" in options)


# The dtypes the dispatcher hands these kernels on a GPU (d2v.kernels.attention.TRITON_DTYPES).
COMPILE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _specs() -> list[dict]:
    """What the GPU-compile check compiles (tests/test_kernels_compile.py): the launches of
    every preset call in every dtype the GPU path takes, recorded lazily (the inputs are built
    only when compiling)."""
    specs = []
    for name, dtype in COMPILE_DTYPES.items():
        for presets, H, T, options in PRESET_CALLS:
            specs.append(dict(label=f"{name} Dh=64 H={H} {'+'.join(o for o in options if o != 'grad') or 'plain'}",
                              used_by=presets, launches=lambda H=H, T=T, options=options, dtype=dtype:
                              _call_launches(H, T, 64, options, dtype)))
        for what, H, T, options in OTHER_HEAD_DIM_CALLS:
            dh = int(what.split()[2].rstrip(","))
            specs.append(dict(label=f"{name} Dh={dh} H={H} {'+'.join(o for o in options if o != 'grad')}",
                              used_by=what, launches=lambda H=H, T=T, options=options, dh=dh, dtype=dtype:
                              _call_launches(H, T, dh, options, dtype)))
    return specs


GPU_COMPILE_SPECS = _specs()
