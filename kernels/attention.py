"""`kernels.attention`: the one attention entry point, dispatching between implementations
(docs/method.md §5).

Legend: B batch, H heads, Tq/Tk query/key length, Dh head width.
Contract: q, k, v are B×H×T×Dh (SDPA layout); key_padding_mask is B×Tk bool with True at
padded keys; bias is an additive float tensor broadcastable to B×H×Tq×Tk (its gradient is
returned); alibi is `Alibi(slopes_H, scale_H, positions_BT)` (gradient of scale_H returned);
returns B×H×Tq×Dh with softmax scale 1/sqrt(Dh) unless `scale` is given. A query whose keys
are all padded outputs 0 on every path.

Candidates: the Triton kernel (`attention_flash`), xformers' memory_efficient_attention (when
installed) and PyTorch SDPA (with the cuDNN backend first on Hopper). On a GPU, the first call
in each shape bucket times every eligible candidate (forward, plus backward when gradients are
needed) and caches the fastest. On CPU SDPA runs without timing. `D2V_KERNELS=off` forces the
PyTorch reference; `D2V_KERNELS=triton` or `force_backend("triton")` force the Triton kernels,
also for CPU tensors under TRITON_INTERPRET=1 (set before triton is imported; tests do this).
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention_reference import Alibi, alibi_bias, attention_reference

BACKENDS = ("triton", "xformers", "sdpa", "reference")

# timer(name, run) -> milliseconds; run() does one forward (and backward) of that candidate.
Timer = Callable[[str, Callable[[], object]], float]
_timer: Timer | None = None
_choices: dict[tuple, str] = {}
_forced: str | None = None


def set_timer(timer: Timer | None) -> None:
    """Replace the candidate timer (None restores CUDA-event timing); clears cached choices."""
    global _timer
    _timer = timer
    _choices.clear()


def clear_cache() -> None:
    _choices.clear()


def cached_choices() -> dict[tuple, str]:
    return dict(_choices)


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run every call inside the block on one backend, bypassing eligibility and timing."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _on_gpu(q: Tensor) -> bool:
    return q.is_cuda


@functools.cache  # a failing import is retried by Python on every call otherwise
def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def _fully_padded(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else key_padding_mask.all(-1)


def _zero_dead_rows(o: Tensor, dead_B: Tensor | None) -> Tensor:
    return o if dead_B is None else o.masked_fill(dead_B[:, None, None, None], 0.0)


def _dense_mask(q: Tensor, tk: int, key_padding_mask, bias, alibi, dtype) -> Tensor | None:
    """Additive B×H×Tq×Tk (or broadcastable) mask for libraries without in-kernel options.
    Fully padded rows are left unmasked (finite softmax, finite gradients) and zeroed after."""
    B, H, Tq, _ = q.shape
    mask = None
    if alibi is not None:
        mask = alibi_bias(alibi, B, Tq, tk, q.device)
    if bias is not None:
        mask = bias if mask is None else mask + bias
    if key_padding_mask is not None:
        live_pad = key_padding_mask & ~key_padding_mask.all(-1, keepdim=True)
        pad = torch.zeros((B, 1, 1, tk), dtype=dtype, device=q.device)
        pad = pad.masked_fill(live_pad[:, None, None, :], float("-inf"))
        mask = pad if mask is None else mask + pad
    return None if mask is None else mask.to(dtype)


def _sdpa_context(q: Tensor):
    # cuDNN attention is 1.7-2.3x faster than FLASH on Hopper but not first in torch's default
    # order (ds_anchors.md 4); the priority list still falls back where cuDNN can't run.
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)
    return contextlib.nullcontext()


def _run_sdpa(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    mask = _dense_mask(q, k.shape[2], key_padding_mask, bias, alibi, q.dtype)
    with _sdpa_context(q):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return _zero_dead_rows(o, _fully_padded(key_padding_mask))


def _run_xformers(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    import xformers.ops as xops

    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    attn_bias = None
    dense = _dense_mask(q, Tk, key_padding_mask, bias, alibi, q.dtype)
    if dense is not None:
        # xformers wants a tensor bias whose key axis is stored padded to a multiple of 8
        # (xformers#683); write into such storage and pass the Tk-wide view.
        storage = torch.zeros((B, H, Tq, -(-Tk // 8) * 8), dtype=q.dtype, device=q.device)
        attn_bias = storage[..., :Tk]
        attn_bias.copy_(dense.expand(B, H, Tq, Tk))
    o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        attn_bias=attn_bias, p=dropout_p, scale=scale)
    return _zero_dead_rows(o.transpose(1, 2), _fully_padded(key_padding_mask))


def _run_triton(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    from kernels.attention_flash import flash_attention

    return flash_attention(q, k, v, key_padding_mask=key_padding_mask, bias=bias, alibi=alibi,
                           dropout_p=dropout_p, scale=scale)


def _run_reference(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    return attention_reference(q, k, v, key_padding_mask=key_padding_mask, bias=bias, alibi=alibi,
                               dropout_p=dropout_p, scale=scale)


RUNNERS: dict[str, Callable[..., Tensor]] = {
    "triton": _run_triton, "xformers": _run_xformers, "sdpa": _run_sdpa, "reference": _run_reference}


def candidates(q: Tensor, k: Tensor, *, bias=None, alibi=None) -> list[str]:
    """Eligible backends for these inputs, in tie-break order."""
    from kernels.attention_flash import HEAD_DIMS

    names = []
    if not _on_gpu(q):
        return ["sdpa"]
    if q.shape[-1] in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        names.append("triton")
    # xformers can't take ALiBi's kept positions or return a learned scale's gradient, and
    # its tensor-bias gradient is not relied on.
    bias_grad = bias is not None and bias.requires_grad
    if alibi is None and not bias_grad and _xformers_available():
        names.append("xformers")
    names.append("sdpa")
    return names


def _bucket(q, k, v, key_padding_mask, bias, alibi, dropout_p) -> tuple:
    def round_up(t: int) -> int:
        return max(64, 1 << (t - 1).bit_length())

    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, bias, alibi.scale_H if alibi else None))
    return (q.device.type, q.dtype, q.shape[-1], round_up(q.shape[2]), round_up(k.shape[2]),
            key_padding_mask is not None, bias is not None, bias is not None and bias.requires_grad,
            alibi is not None, alibi is not None and alibi.positions_BT is not None,
            dropout_p > 0.0, grad)


def _cuda_time(run: Callable[[], object], reps: int = 3) -> float:
    run()  # compile / warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _timed_call(name, q, k, v, key_padding_mask, bias, alibi, dropout_p, scale) -> Callable[[], object]:
    """One forward (and backward if the real call needs gradients) on detached copies, so
    timing leaves no trace in the caller's graph or .grad fields."""
    def leaf(x):
        return None if x is None else x.detach().requires_grad_(x.requires_grad)

    qq, kk, vv, bb = leaf(q), leaf(k), leaf(v), leaf(bias)
    aa = None if alibi is None else Alibi(alibi.slopes_H, leaf(alibi.scale_H), alibi.positions_BT)

    def run():
        o = RUNNERS[name](qq, kk, vv, key_padding_mask, bb, aa, dropout_p, scale)
        leaves = [x for x in (qq, kk, vv, bb, aa.scale_H if aa else None) if x is not None and x.requires_grad]
        if leaves and torch.is_grad_enabled():
            torch.autograd.grad(o, leaves, torch.ones_like(o))
        return o
    return run


def _choose(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale) -> str:
    names = candidates(q, k, bias=bias, alibi=alibi)
    if len(names) == 1:
        return names[0]
    key = _bucket(q, k, v, key_padding_mask, bias, alibi, dropout_p)
    if torch.compiler.is_compiling():
        # No timing inside a trace: use what eager calls measured, else SDPA.
        return _choices.get(key, "sdpa")
    if key not in _choices:
        timer = _timer or (lambda name, run: _cuda_time(run))
        times = {}
        # Timing draws dropout seeds; keep the caller's RNG stream as if it had not happened.
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            for name in names:
                try:
                    times[name] = timer(name, _timed_call(name, q, k, v, key_padding_mask, bias, alibi,
                                                          dropout_p, scale))
                except Exception:  # a candidate that fails on this shape is just not chosen
                    continue
        _choices[key] = min(times, key=times.get) if times else "sdpa"
    return _choices[key]


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
              bias: Tensor | None = None, alibi: Alibi | None = None, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    args = (q, k, v, key_padding_mask, bias, alibi, float(dropout_p), scale)
    mode = os.environ.get("D2V_KERNELS", "auto").lower()
    if mode == "off":
        return _run_reference(*args)
    name = _forced or ("triton" if mode == "triton" else _choose(*args))
    return RUNNERS[name](*args)
