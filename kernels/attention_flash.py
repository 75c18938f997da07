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

from kernels.attention_reference import Alibi
# Kernels are looked up on the module at call time: @triton.jit picks interpreter or GPU
# mode when the module is imported, and tests re-import it under TRITON_INTERPRET=1.
from kernels import attention_triton as _k
from kernels.attention_triton import LOG2E

HEAD_DIMS = (64, 80, 128)

# Production tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, padded head block,
# heavy). "Heavy" calls carry a bias, ALiBi or dropout: the bias tile, the distances and the
# Philox rounds need registers, so they take smaller tiles. Every entry compiles for sm_80 and
# sm_90 without spills (cuobjdump STACK 0; table in kernels/README.md); bigger tiles spilled.
CONFIGS = {
    ("fwd", 64, False): (128, 64, 8, 3),
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
    ("dq", 128, True): (32, 32, 4, 2),
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


def _signature(fn, dtype: str) -> dict[str, str]:
    """Runtime-argument types of an attention kernel for an ahead-of-time compile."""
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "COEF": "*fp32", "DBIAS": "*fp32", "DCOEF": "*fp32",
                "KPM": "*u8", "POS": "*i64", "BIAS": f"*{dtype}"}
    floats = ("qk_scale2", "sm_scale", "dropout_p")
    sig = {}
    for name in fn.arg_names:
        if name.isupper() and name != "H":  # H is the head count
            sig[name] = pointers.get(name, f"*{dtype}")
        elif name in floats:
            sig[name] = "fp32"
        elif not name.startswith(("HEAD_DIM", "BLOCK_", "HAS_", "BIAS_GRAD", "ALIBI_GRAD", "PREC")):
            sig[name] = "i32"
    return sig


def _specs() -> list[dict]:
    """Production configurations compiled for sm_80/sm_90 by tests/test_kernels_compile.py:
    each kernel × head dim × {light: key padding only, heavy: every option on} in bf16."""
    kernels = {"fwd": _k._fwd_kernel, "dkdv": _k._bwd_dkdv_kernel, "dq": _k._bwd_dq_kernel}
    specs = []
    for (kind, block_d, heavy), (bm, bn, warps, stages) in CONFIGS.items():
        fn = kernels[kind]
        for head_dim in (d for d in HEAD_DIMS if triton.next_power_of_2(d) == block_d):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HAS_KPM=True,
                              HAS_BIAS=heavy, HAS_ALIBI=heavy, HAS_POS=heavy, HAS_DROPOUT=heavy, PREC="tf32")
            if kind == "dkdv":
                constexprs.update(BIAS_GRAD=heavy, ALIBI_GRAD=heavy)
            specs.append(dict(fn=fn, num_warps=warps, num_stages=stages, signature=_signature(fn, "bf16"),
                              constexprs=constexprs, label=f"bf16 Dh={head_dim} {'heavy' if heavy else 'light'}"))
    return specs


GPU_COMPILE_SPECS = _specs()
