"""Fused target kernels (docs/method.md §5): Triton interpreter parity against a float64 reference
written here, dispatch rules, custom-op checks and torch.compile tracing.

Fresh random inputs each run (the seed is in every failure message); outputs come from
torch.empty under deterministic mode, i.e. NaN-filled, so an element a kernel forgets to write
fails. Shapes are tiny (the interpreter runs ~1 ms per program) and odd (T=37, D=48/96) so
every tile boundary is masked.
"""
from __future__ import annotations

import random

import pytest
import torch

from d2v import kernels
import d2v.kernels.targets as kt
from d2v.kernels import targets_reference as ref
from kernel_utils import interpreted, nan_poison

NORMS = ["instance", "layer", None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32 arithmetic on exactly representable inputs
EPS = 1e-5


@pytest.fixture(scope="module")
def tt():
    with interpreted("d2v.kernels.targets_triton") as (module,):
        yield module


@pytest.fixture
def triton_path(tt, monkeypatch):
    monkeypatch.setenv("D2V_KERNELS", "triton")
    with nan_poison():
        yield tt


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def norm64(x, norm, pad):
    """Float64 reference, written independently of kernels/ and d2v/: loops over samples."""
    x = x.double()
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        keep = torch.ones(x.shape[1], dtype=torch.bool) if pad is None else ~pad[b]
        rows = x[b, keep]  # valid frames × D
        if norm == "instance" and rows.shape[0]:
            mu = rows.mean(0)
            rows = (rows - mu) / torch.sqrt(((rows - mu) ** 2).mean(0) + EPS)
        elif norm == "layer":
            mu = rows.mean(1, keepdim=True)
            rows = (rows - mu) / torch.sqrt(((rows - mu) ** 2).mean(1, keepdim=True) + EPS)
        out[b, keep] = rows
    return out


def padding(B, T, gen):
    lengths = torch.randint(1, T, (B,), generator=gen)
    lengths[0] = T - 3  # ends inside a tile
    return torch.arange(T)[None, :] >= lengths[:, None]


def layer_output(B, T, D, dtype, gen, strided=False):
    """Values with an offset per channel (instance norm must remove it) in `dtype`."""
    x = torch.randn(B, T, D, generator=gen) * 2 + torch.randn(1, 1, D, generator=gen) * 3
    if strided:  # a B×T×D view of a B×D×T tensor: the kernels must honour strides
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype)


def assert_close(got, want, gen, what, **tol):
    err = (got.double() - want).abs().max().item()
    assert torch.allclose(got.double(), want, **(tol or TOL)), f"{what}: max err {err:.3g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("D", [48, 96])
def test_accumulate_matches_float64(triton_path, gen, dtype, norm, padded, D):
    B, T = 2, 37
    x = layer_output(B, T, D, dtype, gen, strided=D == 96)
    pad = padding(B, T, gen) if padded else None
    acc0 = torch.randn(B, T, D, generator=gen)
    if pad is not None:
        acc0.masked_fill_(pad[..., None], 0.0)  # a running sum is 0 at padded frames
    acc = acc0.clone()
    got = kernels.accumulate(acc, x, layer_norm=norm, padding_mask=pad)
    assert got is acc
    assert_close(acc, acc0.double() + norm64(x, norm, pad), gen, f"accumulate {dtype} {norm}")
    first = kernels.accumulate(None, x, layer_norm=norm, padding_mask=pad)
    assert first.dtype == torch.float32 and first.is_contiguous()
    assert_close(first, norm64(x, norm, pad), gen, f"accumulate(None) {dtype} {norm}")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_finalize_matches_float64(triton_path, gen, norm, padded):
    B, T, D, K = 2, 37, 48, 3
    pad = padding(B, T, gen) if padded else None
    acc = torch.randn(B, T, D, generator=gen) * K + 5.0
    want = norm64(acc / K, norm, pad)
    out = kernels.finalize(acc, top_k=K, final_norm=norm, padding_mask=pad)
    # A padded row may keep 1-3 frames; there instance norm divides differences of nearly equal
    # fp32 values by a deviation close to sqrt(eps), which amplifies their rounding (seen: 3.3e-5).
    assert_close(out, want, gen, f"finalize {norm}", atol=1e-4, rtol=1e-4)
    if pad is not None:
        assert (out[pad] == 0).all()


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_instance_statistics_merge_time_tiles(triton_path, gen, padded, monkeypatch):
    """T=150 spans three time tiles whose means differ (a trend), on a 1e3 offset: the tile and
    chunk merges must add the between-tile variance; sum/sum-of-squares in fp32 would lose it."""
    T = 150
    x = 1e3 + torch.linspace(0, 3, T)[None, :, None] + torch.randn(2, T, 48, generator=gen)
    pad = padding(2, T, gen) if padded else None
    if padded:
        pad[1] = torch.arange(T) >= 100  # sample 1's last chunk below is all padding
    want = norm64(x, "instance", pad)
    out = kernels.finalize(x, top_k=1, final_norm="instance", padding_mask=pad)
    assert_close(out, want, gen, "offset 1e3 + trend", atol=5e-4, rtol=0)
    # Several time chunks (the last one fully padded when padded): the chunk merge.
    monkeypatch.setitem(triton_path.STATS_TILE, "T_CHUNK", 64)
    out = kernels.finalize(x, top_k=1, final_norm="instance", padding_mask=pad)
    assert_close(out, want, gen, "three time chunks", atol=5e-4, rtol=0)


def test_wide_rows_loop_over_column_blocks(triton_path, gen, monkeypatch):
    monkeypatch.setattr(triton_path, "MAX_ROW_BLOCK", 32)  # D=96 → three column blocks
    x = layer_output(2, 5, 96, torch.bfloat16, gen) + 50
    pad = padding(2, 5, gen)
    for norm in ("layer", None):
        acc = torch.randn(2, 5, 96, generator=gen).masked_fill_(pad[..., None], 0.0)
        want = acc.double() + norm64(x, norm, pad)
        kernels.accumulate(acc, x, layer_norm=norm, padding_mask=pad)
        assert_close(acc, want, gen, f"looped row {norm}", atol=1e-4, rtol=1e-5)


def test_fully_padded_sample_gives_zeros(triton_path, gen):
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1] = True
    x = layer_output(2, 9, 48, torch.float32, gen)
    for norm in NORMS:
        out = kernels.accumulate(None, x, layer_norm=norm, padding_mask=pad)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norms", [("instance", "instance"), ("layer", "layer"), ("layer", None)], ids=str)
def test_fused_targets_matches_list_form(triton_path, gen, dtype, norms):
    B, T, D, K = 2, 37, 48, 3
    layers = [layer_output(B, T, D, dtype, gen) for _ in range(K + 1)]
    pad = padding(B, T, gen)
    kw = dict(top_k=K, layer_norm=norms[0], final_norm=norms[1], padding_mask=pad)
    got = kernels.fused_targets(layers, **kw)
    want = norm64(sum(norm64(a, norms[0], pad) for a in layers[-K:]) / K, norms[1], pad)
    assert_close(got, want, gen, f"fused {norms}")
    assert_close(got, ref.fused_targets(layers, **kw).double(), gen, "vs kernels.targets_reference")


def test_dispatch_rules(tt, monkeypatch):
    x = torch.randn(1, 4, 8)
    monkeypatch.delenv("D2V_KERNELS", raising=False)
    assert kt.backend(x) == "reference"  # CPU tensors use the reference unless forced
    monkeypatch.setenv("D2V_KERNELS", "triton")
    assert kt.backend(x) == "triton"
    monkeypatch.setenv("D2V_KERNELS", "off")
    assert kt.backend(x) == "reference"

    def refuse(*args, **kwargs):
        raise AssertionError("D2V_KERNELS=off reached the Triton path")

    monkeypatch.setattr(tt, "normalize_into", refuse)
    kernels.fused_targets([x, x], top_k=2, layer_norm="instance", final_norm="layer")


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="target norm"):
        kernels.accumulate(None, x, layer_norm="batch")
    with pytest.raises(ValueError, match="acc must be fp32"):
        kernels.accumulate(torch.zeros(1, 4, 8, dtype=torch.bfloat16), x, layer_norm=None)
    with pytest.raises(ValueError, match="padding_mask"):
        kernels.accumulate(None, x, layer_norm=None, padding_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="top_k"):
        kernels.fused_targets([x], top_k=2, layer_norm=None, final_norm=None)


@pytest.mark.parametrize("path", ["triton", "off"])
def test_custom_ops_pass_opcheck(tt, monkeypatch, gen, path):
    monkeypatch.setenv("D2V_KERNELS", path)
    x = layer_output(2, 7, 16, torch.bfloat16, gen)
    pad = padding(2, 7, gen)
    acc = torch.randn(2, 7, 16, generator=gen)
    torch.library.opcheck(kt._accumulate_op, (acc, x, "instance", pad))
    torch.library.opcheck(kt._accumulate_op, (acc, x, None, None))
    torch.library.opcheck(kt._normalize_op, (acc, "layer", pad, 0.5))
    torch.library.opcheck(kt._normalize_op, (x, "instance", None, 1.0))


def test_torch_compile_traces_the_streaming_form(gen):
    def targets(a, b, pad):
        acc = kernels.accumulate(None, a, layer_norm="instance", padding_mask=pad)
        acc = kernels.accumulate(acc, b, layer_norm="instance", padding_mask=pad)
        return kernels.finalize(acc, top_k=2, final_norm="layer", padding_mask=pad)

    a, b = (layer_output(2, 9, 16, torch.float32, gen) for _ in range(2))
    pad = padding(2, 9, gen)
    compiled = torch.compile(targets, backend="aot_eager", fullgraph=True)
    assert_close(compiled(a, b, pad), targets(a, b, pad).double(), gen, "compiled")
