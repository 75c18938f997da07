"""Attention kernels (docs/method.md §5): Triton interpreter parity against float64 references,
dropout-mask rebuild, dispatch with an injected timer, custom-op checks.

Interpreter parity runs in fp32 (tl.dot on bf16 is wrong in the interpreter) on tiny shapes.
Fresh random inputs each run; torch's deterministic mode fills every torch.empty with NaN, so
any output or gradient element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import kernels
from kernel_utils import interpreted, nan_poison
from kernels.attention_reference import Alibi, alibi_bias, alibi_slopes, attention_reference

# The package exports the function `attention`, which shadows the module of the same name.
dispatch = importlib.import_module("kernels.attention")


@pytest.fixture(scope="module")
def interp():
    """The Triton kernels under the interpreter (kernels.attention_flash looks its kernels up
    on kernels.attention_triton, which `interpreted` reloads)."""
    with interpreted("kernels.attention_triton"):
        yield importlib.import_module("kernels.attention_flash")


@pytest.fixture
def nan_fill():
    """torch.empty* return NaN-filled memory: any element a kernel forgets to write fails."""
    with nan_poison():
        yield


B, H = 2, 2
TOLERANCE = dict(atol=5e-5, rtol=1e-4)


def _inputs(tq, tk, dh, options, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(q=randn(B, H, tq, dh), k=randn(B, H, tk, dh), v=randn(B, H, tk, dh))
    if "pad" in options:
        lengths = torch.randint(1, tk, (B,), generator=gen)
        lengths[0] = tk - 3  # padding that ends inside a tile
        x["key_padding_mask"] = torch.arange(tk)[None, :] >= lengths[:, None]
    if "dead_row" in options:
        x["key_padding_mask"] = torch.zeros(B, tk, dtype=torch.bool)
        x["key_padding_mask"][1] = True  # every key of sample 1 padded
    if "bias_shared" in options:
        x["bias"] = randn(1, H, tq, tk)  # relative position bias shared over the batch
    if "bias_full" in options:
        x["bias"] = randn(B, H, tq, tk)
    if "bias_row" in options:
        x["bias"] = randn(B, 1, 1, tk)
    if "alibi" in options or "alibi_pos" in options:
        pos = None
        if "alibi_pos" in options:  # kept positions of a masked sequence: gaps between them
            pos = torch.stack([torch.randperm(3 * tq, generator=gen)[:tq].sort().values for _ in range(B)])
        x["alibi"] = Alibi(alibi_slopes(H), torch.rand(H, generator=gen) + 0.5, pos)
    return x


def _leaves(x):
    """Differentiable inputs, in a fixed order: q, k, v, [bias], [alibi scale]."""
    out = [x["q"], x["k"], x["v"]]
    if "bias" in x:
        out.append(x["bias"])
    if "alibi" in x:
        out.append(x["alibi"].scale_H)
    return out


def _with_leaves(x, leaves):
    y = dict(x, q=leaves[0], k=leaves[1], v=leaves[2])
    i = 3
    if "bias" in x:
        y["bias"], i = leaves[i], i + 1
    if "alibi" in x:
        a = x["alibi"]
        y["alibi"] = Alibi(a.slopes_H.to(leaves[i].dtype), leaves[i], a.positions_BT)
    return y


def _run(fn, x, dtype, do, input_dtype=torch.float32, **kw):
    """Forward and gradients in `dtype`, from inputs first rounded to `input_dtype`."""
    leaves = [t.detach().to(input_dtype).to(dtype).requires_grad_() for t in _leaves(x)]
    o = fn(**_with_leaves(x, leaves), **kw)
    grads = torch.autograd.grad(o, leaves, do.to(input_dtype).to(dtype))
    return o, grads


GRAD_NAMES = ("dq", "dk", "dv", "dbias", "dscale")
PARITY_CASES = {
    "plain":                (37, 37, 64, ()),
    "pad_129":              (129, 129, 64, ("pad",)),
    "pad_dh80":             (37, 37, 80, ("pad",)),
    "bias_shared_dh80":     (37, 37, 80, ("bias_shared",)),
    "bias_full_pad":        (37, 37, 64, ("bias_full", "pad")),
    "bias_row_cross":       (29, 45, 64, ("bias_row",)),
    "alibi":                (37, 37, 80, ("alibi",)),
    "alibi_positions_pad":  (37, 37, 64, ("alibi_pos", "pad")),
    "alibi_bias_pad_129":   (129, 129, 64, ("alibi_pos", "bias_shared", "pad")),
    "dead_row":             (37, 37, 64, ("dead_row", "bias_shared")),
}


def _max_errors(o, grads, o_ref, grads_ref, names):
    errs = {"out": (o.double() - o_ref).abs().max().item()}
    errs.update({n: (g.double() - r).abs().max().item() for n, g, r in zip(names, grads, grads_ref)})
    return errs


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_triton_matches_float64_reference(case, interp, nan_fill):
    tq, tk, dh, options = PARITY_CASES[case]
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(tq, tk, dh, options, gen)
    do = torch.randn(B, H, tq, dh, generator=gen)
    o, grads = _run(interp.flash_attention, x, torch.float32, do)
    o_ref, grads_ref = _run(attention_reference, x, torch.float64, do)
    names = [n for n in GRAD_NAMES if n[1:] in ("q", "k", "v") or (n == "dbias" and "bias" in x)
             or (n == "dscale" and "alibi" in x)]
    print(case, {n: f"{e:.1e}" for n, e in _max_errors(o, grads, o_ref, grads_ref, names).items()})
    torch.testing.assert_close(o.double(), o_ref, **TOLERANCE, msg=lambda m: f"seed {seed} out: {m}")
    for name, g, r in zip(names, grads, grads_ref):
        torch.testing.assert_close(g.double(), r, **TOLERANCE, msg=lambda m: f"seed {seed} {case} {name}: {m}")
    if "dead_row" in options:
        assert (o[1] == 0).all() and all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("case", ["pad_dh80", "alibi_bias_pad_129"])
def test_triton_fp16_matches_float64_reference(case, interp, nan_fill):
    """fp16 storage, fp32 statistics: the error is fp16 rounding of P and of the outputs.
    (bf16 can't be checked here: the interpreter's tl.dot on bf16 is wrong, triton#11584.)"""
    tq, tk, dh, options = PARITY_CASES[case]
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(tq, tk, dh, options, gen)
    do = torch.randn(B, H, tq, dh, generator=gen)
    o, grads = _run(interp.flash_attention, x, torch.float16, do)
    o_ref, grads_ref = _run(attention_reference, x, torch.float64, do, input_dtype=torch.float16)
    names = [n for n in GRAD_NAMES if n[1:] in ("q", "k", "v") or (n == "dbias" and "bias" in x)
             or (n == "dscale" and "alibi" in x)]
    print(case, "fp16", {n: f"{e:.1e}" for n, e in _max_errors(o, grads, o_ref, grads_ref, names).items()})
    for name, g, r in zip(("out", *names), (o, *grads), (o_ref, *grads_ref)):
        err = (g.double() - r).abs()
        if name == "dscale":
            # d scale_h = slope_h·Σ dS_ij·(-dist_ij) cancels (Σ_j dS_ij = 0) while the kernel's
            # delta = rowsum(o·do) uses the fp16-rounded o, as FlashAttention does: judge the
            # error against the sum of the terms' magnitudes, not the small result.
            ratio = (err / _alibi_grad_magnitude(x, do, torch.float16)).max().item()
            print(f"  dscale error / Σ|terms| {ratio:.1e}")
            assert ratio <= 1e-3, f"seed {seed} dscale: error {ratio:.1e} of the terms' magnitude"
        else:
            rel = (err.norm() / r.norm()).item()
            assert rel < 2e-3, f"seed {seed} {name}: relative error {rel:.1e}"


def _alibi_grad_magnitude(x, do, input_dtype):
    """slope_h·Σ_{b,i,j} |dS_ij|·dist_ij in float64: dS is the gradient of an added zero bias."""
    leaves = [t.detach().to(input_dtype).double() for t in _leaves(x)]
    y = _with_leaves(x, leaves)
    B_, H_, tq, _ = y["q"].shape
    zero = torch.zeros(B_, H_, tq, y["k"].shape[2], dtype=torch.float64, requires_grad=True)
    y["bias"] = zero if "bias" not in y else y["bias"] + zero
    o = attention_reference(**y)
    (ds,) = torch.autograd.grad(o, zero, do.to(input_dtype).double())
    a = y["alibi"]
    dist = -alibi_bias(Alibi(torch.ones(H_), torch.ones(H_), a.positions_BT), B_, tq, tq).double()
    return (ds.abs() * dist).sum((0, 2, 3)) * a.slopes_H.double()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_rebuilt_keep_mask(p, interp, nan_fill):
    tq = tk = 37
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(tq, tk, 64, ("pad", "bias_shared", "alibi"), gen)
    do = torch.randn(B, H, tq, 64, generator=gen)
    philox, offset = int(torch.randint(0, 2 ** 30, (1,), generator=gen)), 11
    o, grads = _run(interp.flash_attention, x, torch.float32, do, dropout_p=p, seed=philox, rng_offset=offset)
    keep = interp.dropout_keep_mask(philox, offset, B, H, tq, tk, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    o_ref, grads_ref = _run(attention_reference, x, torch.float64, do, dropout_p=p, keep_mask=keep)
    names = ("dq", "dk", "dv", "dbias", "dscale")
    print(f"dropout p={p}", {n: f"{e:.1e}" for n, e in _max_errors(o, grads, o_ref, grads_ref, names).items()})
    torch.testing.assert_close(o.double(), o_ref, **TOLERANCE, msg=lambda m: f"seed {seed} out: {m}")
    for name, g, r in zip(names, grads, grads_ref):
        torch.testing.assert_close(g.double(), r, **TOLERANCE, msg=lambda m: f"seed {seed} {name}: {m}")
    # A different offset is a different mask: the counter really reaches the RNG.
    assert (interp.dropout_keep_mask(philox, offset + 1, B, H, tq, tk, p) != keep).any()


def test_dropout_seed_follows_torch_manual_seed(interp):
    q = torch.randn(1, 1, 33, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(interp.flash_attention(q, q, q, dropout_p=0.3))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], interp.flash_attention(q, q, q, dropout_p=0.3))


def test_alibi_slopes_standard_rule():
    torch.testing.assert_close(alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    s12 = alibi_slopes(12)  # 8 from the power-of-2 rule, then every other slope of 16
    torch.testing.assert_close(s12[8:], 2.0 ** -torch.tensor([0.5, 1.5, 2.5, 3.5]))
    assert len(alibi_slopes(16)) == 16 and alibi_slopes(16)[0] == 2.0 ** -0.5


def test_alibi_bias_uses_kept_positions():
    pos = torch.tensor([[0, 3, 4]])
    bias = alibi_bias(Alibi(torch.tensor([0.5]), torch.tensor([2.0]), pos), 1, 3, 3)
    torch.testing.assert_close(bias[0, 0], -torch.tensor([[0.0, 3, 4], [3, 0, 1], [4, 1, 0]]))


def test_dispatch_paths_agree_on_cpu(interp):
    """SDPA (CPU default), the reference (D2V_KERNELS=off) and Triton (forced) agree, padding
    with a fully padded sample and ALiBi included; no path gives NaN."""
    gen = torch.Generator().manual_seed(0)
    x = _inputs(37, 37, 64, ("dead_row", "alibi_pos"), gen)
    x["key_padding_mask"][0, -5:] = True
    o_sdpa = kernels.attention(**x)
    with dispatch.force_backend("triton"):
        o_triton = kernels.attention(**x)
    os.environ["D2V_KERNELS"] = "off"
    try:
        o_ref = kernels.attention(**x)
    finally:
        os.environ.pop("D2V_KERNELS")
    for o in (o_sdpa, o_triton):
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    assert (o_ref[1] == 0).all()


class _FakeTimer:
    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, name, run):
        self.calls.append(name)
        return self.ms[name]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be on a GPU with xformers; runners record calls and return the reference."""
    ran = []
    monkeypatch.setattr(dispatch, "_on_gpu", lambda q: True)
    monkeypatch.setattr(dispatch, "_xformers_available", lambda: True)
    for name in ("triton", "xformers", "sdpa"):
        def runner(*args, _name=name):
            ran.append(_name)
            return dispatch._run_reference(*args)
        monkeypatch.setitem(dispatch.RUNNERS, name, runner)
    yield ran
    dispatch.set_timer(None)


def test_dispatch_times_once_per_bucket_and_caches_fastest(fake_gpu):
    timer = _FakeTimer({"triton": 2.0, "xformers": 1.0, "sdpa": 3.0})
    dispatch.set_timer(timer)
    q = torch.randn(2, 2, 100, 64)
    dispatch.attention(q, q, q)
    assert sorted(timer.calls) == ["sdpa", "triton", "xformers"] and fake_gpu == ["xformers"]
    dispatch.attention(torch.randn(2, 2, 120, 64), q, q)  # same bucket (T rounds up to 128)
    assert len(timer.calls) == 3 and fake_gpu == ["xformers"] * 2
    timer.ms = {"triton": 0.5, "xformers": 1.0, "sdpa": 3.0}
    dispatch.attention(torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64))
    assert len(timer.calls) == 6 and fake_gpu[-1] == "triton"
    assert sorted(dispatch.cached_choices().values()) == ["triton", "xformers"]


def test_dispatch_never_tries_ineligible(fake_gpu):
    timer = _FakeTimer({"triton": 1.0, "xformers": 0.1, "sdpa": 3.0})
    dispatch.set_timer(timer)
    q = torch.randn(2, 2, 40, 64)
    pos = torch.arange(40).repeat(2, 1)
    dispatch.attention(q, q, q, alibi=Alibi(alibi_slopes(2), torch.ones(2, requires_grad=True), pos))
    assert "xformers" not in timer.calls and fake_gpu == ["triton"]
    timer.calls.clear()
    dispatch.attention(q, q, q, bias=torch.zeros(1, 2, 40, 40, requires_grad=True))
    assert "xformers" not in timer.calls
    timer.calls.clear()
    dispatch.attention(torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32))
    assert "triton" not in timer.calls  # head dim 32 has no Triton config


def test_dispatch_does_not_time_while_compiling(fake_gpu, monkeypatch):
    timer = _FakeTimer({"triton": 1.0, "xformers": 2.0, "sdpa": 3.0})
    dispatch.set_timer(timer)
    q = torch.randn(2, 2, 40, 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dispatch.attention(q, q, q)
    assert timer.calls == [] and fake_gpu == ["sdpa"]  # nothing measured yet: SDPA
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    dispatch.attention(q, q, q)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dispatch.attention(q, q, q)
    assert fake_gpu == ["sdpa", "triton", "triton"]  # the eager measurement is reused


def test_dispatch_on_cpu_uses_sdpa_without_timing(monkeypatch):
    timer = _FakeTimer({})
    dispatch.set_timer(timer)
    try:
        q = torch.randn(1, 2, 20, 64)
        torch.testing.assert_close(dispatch.attention(q, q, q), attention_reference(q, q, q), atol=1e-5, rtol=1e-5)
        assert timer.calls == []
    finally:
        dispatch.set_timer(None)


def test_custom_ops_opcheck(interp):
    gen = torch.Generator().manual_seed(1)
    x = _inputs(33, 33, 64, ("pad", "bias_shared", "alibi_pos"), gen)
    a = x["alibi"]
    q, k, v, bias = (x[n].requires_grad_() for n in ("q", "k", "v", "bias"))
    scale_h = a.scale_H.requires_grad_()
    args = (q, k, v, x["key_padding_mask"], bias, a.slopes_H, scale_h, a.positions_BT, 0.2,
            torch.tensor([5, 0]), 0.125)
    torch.library.opcheck(torch.ops.d2v_kernels.flash_attention_fwd.default, args)
    o, lse = torch.ops.d2v_kernels.flash_attention_fwd(*args)
    # The backward op has no autograd of its own (no double backward): detached inputs.
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in (
        torch.randn_like(o), q, k, v, o, lse, *args[3:], True, True))
    torch.library.opcheck(torch.ops.d2v_kernels.flash_attention_bwd.default, bwd_args)


def test_torch_compile_traces_through_custom_op(interp):
    q = torch.randn(1, 2, 33, 64, requires_grad=True)

    def f(q):  # dropout: the seed drawn inside must not break the graph or specialize it
        return interp.flash_attention(q, q, q, dropout_p=0.1).sum()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    torch.manual_seed(0)
    out = compiled(q)
    out.backward()
    torch.manual_seed(0)
    torch.testing.assert_close(out, f(q.detach()))
    compiled(q)  # a fresh seed: same graph, no recompile
    assert len(graphs) == 1 and q.grad.isfinite().all()
