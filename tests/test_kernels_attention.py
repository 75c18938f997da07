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

from d2v import kernels
from kernel_utils import interpreted, nan_poison
from d2v.kernels.attention_reference import Alibi, alibi_bias, alibi_slopes, attention_reference

# The package exports the function `attention`, which shadows the module of the same name.
dispatch = importlib.import_module("d2v.kernels.attention")


@pytest.fixture(scope="module")
def interp():
    """The Triton kernels under the interpreter (kernels.attention_flash looks its kernels up
    on kernels.attention_triton, which `interpreted` reloads)."""
    with interpreted("d2v.kernels.attention_triton"):
        yield importlib.import_module("d2v.kernels.attention_flash")


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
    # T % 128 == 64: the lengths where PyTorch >= 2.11's cuDNN SDPA returns NaN grad_q with a mask.
    "cross_pad_64x192":     (64, 192, 64, ("bias_row", "pad")),
}
MIXED_DTYPE_CASES = {"pad_bias_192": (192, 192, 64, ("pad", "bias_shared"))}


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


@pytest.mark.parametrize("case", list(MIXED_DTYPE_CASES))
def test_triton_bias_dtype_other_than_q_matches_float64_reference(case, interp, nan_fill):
    """fp16 q/k/v with an fp32 bias (an fp32 table under autocast) at T % 128 == 64: the bias
    gradient comes back in the bias's dtype and every gradient matches the float64 reference."""
    tq, tk, dh, options = MIXED_DTYPE_CASES[case]
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = _inputs(tq, tk, dh, options, gen)
    do = torch.randn(B, H, tq, dh, generator=gen)
    dtypes = [torch.float16] * 3 + [torch.float32]
    leaves = [t.detach().to(dt).requires_grad_() for t, dt in zip(_leaves(x), dtypes)]
    o = interp.flash_attention(**_with_leaves(x, leaves))
    grads = torch.autograd.grad(o, leaves, do.half())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    o_ref = attention_reference(**_with_leaves(x, ref_leaves))
    grads_ref = torch.autograd.grad(o_ref, ref_leaves, do.half().double())
    assert grads[3].dtype == torch.float32 and o.dtype == torch.float16
    for name, g, r in zip(("out", *GRAD_NAMES), (o, *grads), (o_ref, *grads_ref)):
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel < 2e-3, f"seed {seed} {case} {name}: relative error {rel:.1e}"


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
    """Returns fixed milliseconds per candidate; `run_it` also runs the candidate, as the CUDA
    timer does (forward + autograd.grad), so timing inside a checkpointed forward would show."""

    def __init__(self, ms, run_it=False):
        self.ms, self.calls, self.run_it = ms, [], run_it

    def __call__(self, name, run):
        self.calls.append(name)
        if self.run_it:
            run()
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
    dispatch.reset_plan()
    yield ran
    dispatch.reset_plan()
    dispatch.set_timer(None)


def _plan(buckets, timer, **kw):
    return dispatch.plan(buckets, num_heads=2, batch=2, device="cpu", timer=timer, **kw)


def test_plan_installs_fastest_and_calls_never_time(fake_gpu):
    timer = _FakeTimer({"triton": 2.0, "xformers": 1.0, "sdpa": 3.0}, run_it=True)
    buckets = dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=200, grad=(True, False))
    assert sorted({b.tq for b in buckets}) == [64, 128, 256] and len(buckets) == 6
    table = _plan(buckets, timer)
    assert set(table.values()) == {"xformers"} and len(timer.calls) == 3 * len(buckets)
    assert dispatch.planned() == table
    assert len(dispatch.describe_plan()) == 6 and dispatch.describe_plan()[0].endswith(": xformers")
    timer.calls.clear()
    fake_gpu.clear()
    q = torch.randn(2, 2, 120, 64, requires_grad=True)
    dispatch.attention(q, q, q).sum().backward()
    with torch.no_grad():
        dispatch.attention(q, q, q)
    assert timer.calls == [] and fake_gpu == ["xformers", "xformers"]
    dispatch.reset_plan()
    assert dispatch.planned() == {}


def test_a_second_plan_of_the_same_shapes_times_nothing(fake_gpu):
    """gpu-check builds several runs in one process: buckets timed once (same heads, batch and
    device) keep their choice without timing or a collective; a new batch size is timed."""
    timer = _FakeTimer({"triton": 2.0, "xformers": 1.0, "sdpa": 3.0})
    buckets = dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=200, grad=(True, False))
    first = _plan(buckets, timer)
    timer.calls.clear()
    reduced = []
    again = _plan(buckets, timer, reduce_times=lambda xs: reduced.append(xs) or xs)
    assert again == first and timer.calls == [] and reduced == []
    more = dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=500, grad=(True, False))
    _plan(more, timer)
    assert len(timer.calls) == 3 * (len(more) - len(buckets))  # only the new lengths
    dispatch.plan(buckets, num_heads=2, batch=4, device="cpu", timer=timer)
    assert len(timer.calls) == 3 * (len(more) - len(buckets)) + 3 * len(buckets)  # another batch: timed


def test_unplanned_bucket_takes_the_rule_without_timing(fake_gpu):
    timer = _FakeTimer({"triton": 0.1, "xformers": 0.2, "sdpa": 3.0})
    dispatch.set_timer(timer)  # a default timer must not be used outside plan()
    _plan(dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=64), timer)
    timer.calls.clear()
    q = torch.randn(2, 2, 300, 64)  # bucket 512: not planned
    dispatch.attention(q, q, q)
    assert timer.calls == [] and fake_gpu[-1] == "sdpa" == dispatch.rule_choice(dispatch.bucket_of(q, q, q))
    assert dispatch.bucket_of(q, q, q) not in dispatch.planned()


def test_ranks_choose_the_same_backend_from_summed_times(fake_gpu):
    """Two simulated ranks whose own timings disagree: with a summing reduce_times both install
    the backend with the smallest total; without it each would pick its own."""
    buckets = dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=64, padding=True)
    timers = [_FakeTimer({"triton": 1.0, "xformers": 2.0, "sdpa": 9.0}),   # rank 0: Triton
              _FakeTimer({"triton": 5.0, "xformers": 1.5, "sdpa": 9.0})]   # rank 1: xformers
    def alone(timer):
        seen = []
        dispatch.reset_plan()
        table = _plan(buckets, timer, reduce_times=lambda xs: seen.append(list(xs)) or xs)
        return table, seen[0]

    (table0, times0), (table1, times1) = alone(timers[0]), alone(timers[1])
    assert table0 != table1  # alone, the ranks disagree
    chosen = []
    for timer, other in ((timers[0], times1), (timers[1], times0)):
        dispatch.reset_plan()
        chosen.append(_plan(buckets, timer, reduce_times=lambda xs, other=other: [a + b for a, b in zip(xs, other)]))
    assert chosen[0] == chosen[1] and set(chosen[0].values()) == {"xformers"}  # 3.5 < 6.0


def test_plan_gives_inf_to_ineligible_and_failing_candidates(fake_gpu):
    """Every rank hands reduce_times one slot per candidate, eligible or not, in one order."""
    def timer(name, run):
        if name == "xformers":
            raise RuntimeError("no kernel for this shape")
        return {"triton": 4.0, "sdpa": 3.0}[name]

    seen = []
    bucket = dispatch.Bucket(torch.float32, 32, 64, 64, grad=True)  # head dim 32: no Triton
    table = _plan([bucket], timer, reduce_times=lambda xs: (seen.append(xs), xs)[1])
    assert seen == [[float("inf"), float("inf"), 3.0]] and table == {bucket: "sdpa"}
    dispatch.reset_plan()
    with pytest.raises(ValueError, match="element-wise"):
        _plan([bucket], timer, reduce_times=lambda xs: xs[:1])


def test_plan_runs_real_candidates_on_its_stand_in_inputs(monkeypatch):
    """The GPU branch forced on CPU with the real runners: the stand-in inputs of every option
    go through forward and backward of each candidate that runs on CPU tensors."""
    monkeypatch.setattr(dispatch, "_on_gpu", lambda q: True)
    monkeypatch.setattr(dispatch, "_capability", lambda q: (9, 0))
    ran = []

    def timer(name, run):
        out = run()
        ran.append(name)
        assert out.isfinite().all()
        return 1.0 if name == "sdpa" else 2.0

    buckets = [*dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=64, padding=True, bias=True,
                                     bias_grad=True, dropout=True),
               *dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=64, padding=True, alibi=True,
                                     alibi_positions=(True, False), alibi_grad=(True, False), grad=(True, False))]
    dispatch.reset_plan()
    try:
        table = _plan(buckets, timer)
    finally:
        dispatch.reset_plan()
    assert len(table) == 7 and set(table.values()) == {"sdpa"} and ran.count("sdpa") == 7


def test_checkpointed_encoder_forward_never_times(fake_gpu):
    """Activation checkpointing recomputes each block in backward; a measurement inside the
    forward (forward + autograd.grad of the candidates) changed what was saved between the two
    runs (CheckpointError). Planned before, the checkpointed step never calls the timer."""
    from d2v.models.blocks import TransformerBlock
    from d2v.models.encoder import Encoder

    torch.manual_seed(0)
    blocks = [TransformerBlock(128, 2, 256, layer_norm_first=False, eps=1e-5, dropout=0.0,
                               attention_dropout=0.0, activation_dropout=0.0) for _ in range(2)]
    encoder = Encoder(blocks).train()
    encoder.checkpoint_blocks = True
    timer = _FakeTimer({"triton": 1.0, "xformers": 2.0, "sdpa": 3.0}, run_it=True)
    dispatch.set_timer(timer)
    x = torch.randn(2, 70, 128, requires_grad=True)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, 50:] = True
    _plan(dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=70, padding=True), None)
    assert timer.calls and set(dispatch.planned().values()) == {"triton"}
    timer.calls.clear()
    fake_gpu.clear()
    encoder(x, pad).sum().backward()
    assert timer.calls == []
    assert fake_gpu == ["triton"] * 4  # 2 blocks, forward + recompute, the planned backend
    assert x.grad.isfinite().all()


def test_compiled_calls_read_the_planned_table(fake_gpu):
    timer = _FakeTimer({"triton": 1.0, "xformers": 2.0, "sdpa": 3.0})
    _plan(dispatch.buckets_for(dtype=torch.float32, head_dim=64, max_len=64, grad=False), timer)
    timer.calls.clear()
    dispatch.set_timer(timer)

    def f(q):
        return dispatch.attention(q, q, q).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    fake_gpu.clear()
    compiled(torch.randn(2, 2, 40, 64))
    assert fake_gpu == ["triton"] and timer.calls == []  # planned bucket, chosen while tracing
    compiled(torch.randn(2, 2, 300, 64))  # an unplanned bucket retraces to the rule
    assert fake_gpu[-1] == "sdpa" and timer.calls == []
    torch._dynamo.reset()


def test_plan_refuses_inside_compile(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="outside torch.compile"):
        dispatch.plan([], num_heads=1, batch=1, device="cpu")


def test_eligibility_rules(fake_gpu, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the rules of a GPU process
    base = dict(dtype=torch.bfloat16, head_dim=64, tq=1024, tk=1024, grad=True)
    B = dispatch.Bucket
    assert dispatch.eligible(B(**base)) == ["triton", "xformers", "sdpa"]
    # A learnable bias (BEiT) or ALiBi scale needs its gradient: xformers is not relied on.
    assert dispatch.eligible(B(**base, bias=True, bias_grad=True)) == ["triton", "sdpa"]
    assert dispatch.eligible(B(**base, alibi=True, alibi_grad=True)) == ["triton", "sdpa"]
    assert "xformers" in dispatch.ineligible(B(**base, alibi=True))
    assert dispatch.eligible(B(**{**base, "head_dim": 32})) == ["xformers", "sdpa"]
    assert dispatch.eligible(B(**{**base, "dtype": torch.float64})) == ["xformers", "sdpa"]
    # fp32 tiles spill on sm_90 (the compile check covers the dtypes Triton takes): SDPA runs fp32
    assert dispatch.eligible(B(**{**base, "dtype": torch.float32})) == ["xformers", "sdpa"]
    assert dispatch.eligible(B(**{**base, "dtype": torch.float16}))[0] == "triton"
    assert all(why for whys in dispatch.ineligible(B(**base, bias=True, bias_grad=True)).values() for why in whys)


def test_sdpa_backend_rules():
    S, call = torch.nn.attention.SDPBackend, dispatch.SdpaCall
    efficient_math = [S.EFFICIENT_ATTENTION, S.MATH]
    # No mask: torch's own order off Hopper, cuDNN first on Hopper.
    assert dispatch.sdpa_backends(call(False, False, True, 1000, 1000), hopper=False) is None
    assert dispatch.sdpa_backends(call(False, False, True, 1000, 1000), hopper=True)[0] == S.CUDNN_ATTENTION
    # A mask that needs a gradient: cuDNN returns none, FlashAttention takes no mask.
    for hopper in (False, True):
        assert dispatch.sdpa_backends(call(True, True, True, 1000, 1000), hopper=hopper) == efficient_math
    # A mask without gradient: cuDNN allowed on Hopper, except T % 128 == 64 with torch >= 2.11.
    assert dispatch.sdpa_backends(call(True, False, True, 1000, 1000), hopper=True,
                                  torch_version=(2, 13)) == [S.CUDNN_ATTENTION, *efficient_math]
    for tq, tk in ((192, 192), (64, 1000), (1000, 320)):
        assert dispatch.sdpa_backends(call(True, False, True, tq, tk), hopper=True,
                                      torch_version=(2, 11)) == efficient_math
        assert S.CUDNN_ATTENTION in dispatch.sdpa_backends(call(True, False, True, tq, tk), hopper=True,
                                                           torch_version=(2, 10))
        assert S.CUDNN_ATTENTION in dispatch.sdpa_backends(call(True, False, False, tq, tk), hopper=True,
                                                           torch_version=(2, 11))  # forward only


@pytest.mark.parametrize("case", ["bias_grad_192", "alibi_pad_192"])
def test_sdpa_on_gpu_branch_restricts_backends_and_matches_reference(case, monkeypatch):
    """The GPU branch of the SDPA runner, forced on CPU (SDPA's math backend runs): it passes
    the restricted backend list, and outputs and gradients (a float64 bias on float32 q, so the
    mask's dtype differs from q's) match the float64 reference at T % 128 == 64."""
    seen = []

    def spy(backends, set_priority=False):
        seen.append(list(backends))
        return torch.nn.attention.sdpa_kernel(backends, set_priority=set_priority)

    monkeypatch.setattr(dispatch, "_on_gpu", lambda q: True)
    monkeypatch.setattr(dispatch, "_capability", lambda q: (9, 0))
    monkeypatch.setattr(dispatch, "sdpa_kernel", spy)
    gen = torch.Generator().manual_seed(3)
    if case == "bias_grad_192":
        x = _inputs(192, 192, 64, ("pad", "bias_shared"), gen)
        x["bias"] = x["bias"].double()
    else:
        x = _inputs(192, 192, 64, ("pad", "alibi"), gen)
    do = torch.randn(B, H, 192, 64, generator=gen)
    leaves = [t.detach().clone().requires_grad_() for t in _leaves(x)]
    o = dispatch._run_sdpa(*_args(_with_leaves(x, leaves)))
    grads = torch.autograd.grad(o, leaves, do)
    o_ref, grads_ref = _run(attention_reference, x, torch.float64, do)
    S = torch.nn.attention.SDPBackend
    assert seen == [[S.EFFICIENT_ATTENTION, S.MATH]]
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    for g, r, leaf in zip(grads, grads_ref, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def _args(x):
    return (x["q"], x["k"], x["v"], x.get("key_padding_mask"), x.get("bias"), x.get("alibi"), 0.0, None)


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
