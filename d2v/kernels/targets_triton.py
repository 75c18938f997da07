"""Triton kernels for the streaming data2vec targets (docs/method.md §5): normalise a layer output and
add it into the fp32 running sum, and the final divide-by-K plus norm. Forward only.

Legend: B batch, T time, D width. Inputs are bf16/fp16/fp32 with any strides; every statistic
and the running sum are fp32. One entry point, `normalize_into(x, norm, mask, scale, out, add)`:
    out  = norm(x * scale)         (add=False: first layer, or finalize with scale = 1/K)
    out += norm(x * scale)         (add=True: accumulate into acc)
padded positions (mask True) get 0 (add=False) or are left unchanged (add=True; they are 0).

Instance norm (over T, per (b, d)) needs the statistics before normalising: `_instance_stats`
streams a chunk of T in tiles, takes each tile's exact mean and M2 in registers and merges
tiles with Chan's parallel formula (no sum/sum-of-squares cancellation) into per-chunk partials;
`_instance_merge` merges the chunks the same way into mean and rstd (B×D fp32);
`_instance_apply` then reads x once and read-modify-writes out once. Layer norm and the
identity are one pass per row (`_row_norm`): the row lives in one block up to MAX_ROW_BLOCK
columns, above that two loops over column blocks (statistics, then normalise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

EPS = 1e-5
MAX_ROW_BLOCK = 4096  # a 4096-column fp32 row is 16 values per thread at 8 warps; wider rows loop
NORM_CODE = {None: 0, "layer": 1, "instance": 2}

# Production tiles (GPU). The interpreter runs one program at a time (~1 ms each), so it
# gets the same kernels with the same tiles: the shapes under test are tiny anyway.
# 8 warps keep the tiles at 16-32 fp32 values per thread (<100 registers, checked by
# tests/test_kernels_compile.py): these kernels are bandwidth-bound and want occupancy.
# Statistics are split over time chunks too (a third grid axis) so that audio's B×D/64 = 96
# column strips become ~400 programs and fill an H100's 132 SMs; a small kernel merges chunks.
STATS_TILE = dict(T_CHUNK=256, BLOCK_T=64, BLOCK_D=64, num_warps=8)
MERGE_BLOCK_D = 256
APPLY_TILE = dict(BLOCK_T=32, BLOCK_D=128, num_warps=8)


# The sequence length and the chunk count change from batch to batch: not specialised, so
# one compiled variant serves every batch instead of a recompile whenever T % 16 changes.
_PER_CALL = ["T", "S"]


@triton.jit(do_not_specialize=_PER_CALL)
def _instance_stats(X, MASK, PART, T, D, sxb, sxt, sxd, scale,
                    HAS_MASK: tl.constexpr, T_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Grid (B, cdiv(D, BLOCK_D), S = cdiv(T, T_CHUNK)). Partial (n, mean, M2) over the valid t
    of chunk s of x[b, :, d] · scale, into PART[b, s, 0:3, d] (fp32 B×S×3×D)."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)
    in_d = offs_d < D
    n = tl.full((1,), 0.0, tl.float32)  # valid frames merged so far (same for every d)
    mean = tl.full((BLOCK_D,), 0.0, tl.float32)
    m2 = tl.full((BLOCK_D,), 0.0, tl.float32)
    for t0 in range(chunk * T_CHUNK, chunk * T_CHUNK + T_CHUNK, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_t = offs_t < T
        if HAS_MASK:
            pad = tl.load(MASK + b * T + offs_t, mask=valid_t, other=1)
            valid_t = valid_t & (pad == 0)
        w = valid_t.to(tl.float32)[:, None]  # BLOCK_T×1
        ptrs = X + b * sxb + offs_t[:, None] * sxt + offs_d[None, :] * sxd
        x = tl.load(ptrs, mask=valid_t[:, None] & in_d[None, :], other=0.0).to(tl.float32) * scale
        n_tile = tl.sum(w, axis=0)  # (1,)
        mean_tile = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
        dev = (x - mean_tile[None, :]) * w
        n, mean, m2 = _chan_merge(n, mean, m2, n_tile, mean_tile, tl.sum(dev * dev, axis=0))
    part = PART + ((b * tl.num_programs(2) + chunk) * 3) * D + offs_d
    tl.store(part, tl.broadcast_to(n, (BLOCK_D,)), mask=in_d)  # n per d: one layout for all three
    tl.store(part + D, mean, mask=in_d)
    tl.store(part + 2 * D, m2, mask=in_d)


@triton.jit
def _chan_merge(n, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.: (n, mean, M2) of a set merged with another's; an empty one changes nothing."""
    n_new = n + n_b
    frac = n_b / tl.maximum(n_new, 1.0)
    delta = mean_b - mean
    return n_new, mean + delta * frac, m2 + m2_b + delta * delta * n * frac


@triton.jit(do_not_specialize=_PER_CALL)
def _instance_merge(PART, MEAN, RSTD, D, S, eps, BLOCK_D: tl.constexpr):
    """Grid (B, cdiv(D, BLOCK_D)). Merges the S chunk partials into mean and rstd (B×D fp32)."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    n = tl.full((BLOCK_D,), 0.0, tl.float32)
    mean = tl.full((BLOCK_D,), 0.0, tl.float32)
    m2 = tl.full((BLOCK_D,), 0.0, tl.float32)
    for s in range(0, S):
        part = PART + ((b * S + s) * 3) * D + offs_d
        n_s = tl.load(part, mask=in_d, other=0.0)
        mean_s = tl.load(part + D, mask=in_d, other=0.0)
        m2_s = tl.load(part + 2 * D, mask=in_d, other=0.0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_s, mean_s, m2_s)
    var = m2 / tl.maximum(n, 1.0)  # biased, as F.instance_norm; empty sample → 0
    tl.store(MEAN + b * D + offs_d, mean, mask=in_d)
    tl.store(RSTD + b * D + offs_d, 1.0 / tl.sqrt(var + eps), mask=in_d)


@triton.jit(do_not_specialize=_PER_CALL)
def _instance_apply(X, MASK, MEAN, RSTD, OUT, T, D, sxb, sxt, sxd, scale,
                    HAS_MASK: tl.constexpr, ADD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B, cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)). out[b,t,d] (+)= (x·scale − mean)·rstd."""
    b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = offs_t < T
    in_d = offs_d < D
    inside = in_t[:, None] & in_d[None, :]
    keep = in_t
    if HAS_MASK:
        pad = tl.load(MASK + b * T + offs_t, mask=in_t, other=1)
        keep = keep & (pad == 0)
    mean = tl.load(MEAN + b * D + offs_d, mask=in_d, other=0.0)
    rstd = tl.load(RSTD + b * D + offs_d, mask=in_d, other=0.0)
    x = tl.load(X + b * sxb + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
                mask=keep[:, None] & in_d[None, :], other=0.0).to(tl.float32) * scale
    y = tl.where(keep[:, None], (x - mean[None, :]) * rstd[None, :], 0.0)
    out_ptrs = OUT + (b * T + offs_t[:, None]) * D + offs_d[None, :]
    if ADD:
        y += tl.load(out_ptrs, mask=inside, other=0.0)
    tl.store(out_ptrs, y, mask=inside)


@triton.jit(do_not_specialize=_PER_CALL)
def _row_norm(X, MASK, OUT, T, D, sxb, sxt, sxd, scale, eps,
              HAS_MASK: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
              BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Grid (B·T,). NORM 1: layer norm over D; NORM 0: identity. out row (+)= result."""
    row = tl.program_id(0)
    b = row // T
    t = row % T
    x_row = X + b * sxb + t * sxt
    out_row = OUT + row.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    # keep is a BLOCK_D vector: the interpreter types scalar comparisons as ints, not masks.
    keep = cols >= 0
    if HAS_MASK:
        keep = tl.load(MASK + row + cols * 0) == 0  # one byte, broadcast
    if ONE_BLOCK:
        in_d = cols < D
        x = tl.load(x_row + cols * sxd, mask=in_d & keep, other=0.0).to(tl.float32) * scale
        if NORM == 1:
            mean = tl.sum(x, axis=0) / D
            dev = tl.where(in_d, x - mean, 0.0)
            y = dev / tl.sqrt(tl.sum(dev * dev, axis=0) / D + eps)
        else:
            y = x
        y = tl.where(keep, y, 0.0)
        if ADD:
            y += tl.load(out_row + cols, mask=in_d, other=0.0)
        tl.store(out_row + cols, y, mask=in_d)
    else:
        mean = 0.0
        rstd = 1.0
        if NORM == 1:
            # Chan merge over column blocks, as in _instance_stats, so wide rows stay exact.
            n = 0.0
            m2 = 0.0
            for d0 in range(0, D, BLOCK_D):
                in_d = d0 + cols < D
                x = tl.load(x_row + (d0 + cols) * sxd, mask=in_d & keep, other=0.0).to(tl.float32) * scale
                n_blk = tl.sum(in_d.to(tl.float32), axis=0)
                mean_blk = tl.sum(x, axis=0) / n_blk
                dev = tl.where(in_d, x - mean_blk, 0.0)
                n_new = n + n_blk
                delta = mean_blk - mean
                mean += delta * n_blk / n_new
                m2 += tl.sum(dev * dev, axis=0) + delta * delta * n * n_blk / n_new
                n = n_new
            rstd = 1.0 / tl.sqrt(m2 / D + eps)
        for d0 in range(0, D, BLOCK_D):
            in_d = d0 + cols < D
            x = tl.load(x_row + (d0 + cols) * sxd, mask=in_d & keep, other=0.0).to(tl.float32) * scale
            y = tl.where(keep, (x - mean) * rstd, 0.0)
            if ADD:
                y += tl.load(out_row + d0 + cols, mask=in_d, other=0.0)
            tl.store(out_row + d0 + cols, y, mask=in_d)


def row_config(D: int) -> dict:
    """Block and warps of `_row_norm` for width D (the whole row in one block when it fits)."""
    block = min(triton.next_power_of_2(D), MAX_ROW_BLOCK)
    return dict(BLOCK_D=block, ONE_BLOCK=D <= block, num_warps=4 if block <= 1024 else 8)


def normalize_into(x_BTD: Tensor, norm: str | None, padding_mask: Tensor | None, scale: float,
                   out: Tensor, add: bool) -> None:
    """out (fp32 contiguous B×T×D) = or += norm(x_BTD · scale); see the module docstring."""
    B, T, D = x_BTD.shape
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != x_BTD.shape:
        raise ValueError("the running sum must be a contiguous fp32 tensor shaped like the layer output")
    if B * T * D == 0:
        return
    has_mask = padding_mask is not None
    # bool has no Triton pointer type; its bytes are 0/1, so read them as uint8.
    mask = padding_mask.contiguous().view(torch.uint8) if has_mask else out
    sxb, sxt, sxd = x_BTD.stride()
    if norm == "instance":
        st = STATS_TILE
        assert st["T_CHUNK"] % st["BLOCK_T"] == 0, "a chunk is whole time tiles"
        chunks = triton.cdiv(T, st["T_CHUNK"])
        part = torch.empty((B, chunks, 3, D), device=x_BTD.device, dtype=torch.float32)
        _instance_stats[(B, triton.cdiv(D, st["BLOCK_D"]), chunks)](
            x_BTD, mask, part, T, D, sxb, sxt, sxd, scale, HAS_MASK=has_mask, T_CHUNK=st["T_CHUNK"],
            BLOCK_T=st["BLOCK_T"], BLOCK_D=st["BLOCK_D"], num_warps=st["num_warps"])
        mean = torch.empty((B, D), device=x_BTD.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _instance_merge[(B, triton.cdiv(D, MERGE_BLOCK_D))](part, mean, rstd, D, chunks, EPS,
                                                             BLOCK_D=MERGE_BLOCK_D, num_warps=4)
        ap = APPLY_TILE
        grid = (B, triton.cdiv(T, ap["BLOCK_T"]), triton.cdiv(D, ap["BLOCK_D"]))
        _instance_apply[grid](
            x_BTD, mask, mean, rstd, out, T, D, sxb, sxt, sxd, scale, HAS_MASK=has_mask, ADD=add,
            BLOCK_T=ap["BLOCK_T"], BLOCK_D=ap["BLOCK_D"], num_warps=ap["num_warps"])
        return
    _row_norm[(B * T,)](x_BTD, mask, out, T, D, sxb, sxt, sxd, scale, EPS, HAS_MASK=has_mask,
                        ADD=add, NORM=NORM_CODE[norm], **row_config(D))


class _Recorder:
    """Stands in for one kernel while `record_launches` runs: `kernel[grid](...)` is recorded."""

    def __init__(self, fn, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


_KERNELS = ("_instance_stats", "_instance_merge", "_instance_apply", "_row_norm")


def record_launches(x_BTD: Tensor, norm: str | None, padding_mask: Tensor | None, scale: float,
                    out: Tensor, add: bool) -> list[tuple]:
    """(kernel, args, kwargs) of every launch `normalize_into` makes for these arguments,
    built by it, run nowhere: what the GPU-compile check specialises and compiles."""
    module = globals()
    real = {name: module[name] for name in _KERNELS}
    launches: list[tuple] = []
    module.update({name: _Recorder(fn, launches) for name, fn in real.items()})
    try:
        normalize_into(x_BTD, norm, padding_mask, scale, out, add)
    finally:
        module.update(real)
    return launches


# The teacher's target calls of every preset: (presets, D, T, extra tokens, layer norm, final
# norm, padded). A layer output is a B×(E+T)×D bf16 block output seen without its E extra
# (CLS) tokens; the first of the top-K layers writes the fp32 sum, the others add into it, and
# finalize reads the sum with scale 1/K. Padded (variable-length) modalities run with and
# without a mask. tests/test_kernels_compile.py checks these against d2v's presets.
PRESET_TARGETS = (
    ("audio_base audio_base_v2", 768, 999, 0, "instance", None, True),
    ("audio_large audio_large_v2", 1024, 999, 0, "instance", None, True),
    ("audio_tiny audio_tiny_v2", 64, 149, 0, "instance", None, True),
    ("image_base", 768, 196, 1, "layer", "layer", False),
    ("image_large image_large_phase2", 1024, 196, 1, "layer", "layer", False),
    ("image_tiny", 64, 64, 1, "layer", "layer", False),
    ("image_base_v2", 768, 196, 1, "instance", "layer", False),
    ("image_large_v2", 1024, 196, 1, "instance", "layer", False),
    ("image_tiny_v2", 64, 64, 1, "instance", "layer", False),
    ("text_base", 768, 512, 0, "layer", None, True),
    ("text_large", 1024, 512, 0, "layer", None, True),
    ("text_tiny", 64, 128, 0, "layer", None, True),
    ("text_base_v2", 768, 512, 0, "instance", None, True),
    ("text_tiny_v2", 64, 128, 0, "instance", None, True),
    ("text_large_v2", 1024, 512, 0, "layer", "instance", True),
)
# Widths no preset uses: the one-block row at 2048 and the looped (multi-block) row at 8192.
OTHER_WIDTHS = (2048, 8192)


def _target_launches(D: int, T: int, extra: int, layer_norm: str | None, final_norm: str | None,
                     padded: bool, top_k: int = 2) -> list[tuple]:
    B = 2
    mask = torch.zeros(B, T, dtype=torch.bool) if padded else None
    layer = torch.empty(B, extra + T, D, dtype=torch.bfloat16)[:, extra:]
    acc = torch.empty(B, T, D, dtype=torch.float32)
    launches = record_launches(layer, layer_norm, mask, 1.0, acc, add=False)
    launches += record_launches(layer, layer_norm, mask, 1.0, acc, add=True)
    launches += record_launches(acc, final_norm, mask, 1.0 / top_k, torch.empty_like(acc), add=False)
    return launches


def _specs() -> list[dict]:
    """What the GPU-compile check compiles (tests/test_kernels_compile.py): the launches of
    every preset's target calls, recorded lazily (inputs are built only when compiling)."""
    specs = []
    for presets, D, T, extra, layer_norm, final_norm, padded in PRESET_TARGETS:
        for mask in ((True, False) if padded else (False,)):
            specs.append(dict(label=f"D={D} {layer_norm}/{final_norm}{' mask' if mask else ''}", used_by=presets,
                              launches=lambda D=D, T=T, extra=extra, ln=layer_norm, fn=final_norm, mask=mask:
                              _target_launches(D, T, extra, ln, fn, mask)))
    for D in OTHER_WIDTHS:
        specs.append(dict(label=f"D={D} layer/None mask", used_by=f"width {D}, no preset",
                          launches=lambda D=D: _target_launches(D, 999, 0, "layer", None, True)))
    return specs


GPU_COMPILE_SPECS = _specs()
