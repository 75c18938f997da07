"""`kernels.attention`: the one attention entry point, dispatching between implementations
(docs/method.md §5).

Legend: B batch, H heads, Tq/Tk query/key length, Dh head width.
Contract: q, k, v are B×H×T×Dh (SDPA layout); key_padding_mask is B×Tk bool with True at
padded keys; bias is an additive float tensor broadcastable to B×H×Tq×Tk (its gradient is
returned); alibi is `Alibi(slopes_H, scale_H, positions_BT)` (gradient of scale_H returned);
returns B×H×Tq×Dh with softmax scale 1/sqrt(Dh) unless `scale` is given. A query whose keys
are all padded outputs 0 on every path.

Candidates: the Triton kernel (`attention_flash`), xformers' memory_efficient_attention (when
installed) and PyTorch SDPA. Nothing is ever timed inside a forward: the trainer calls
`plan(buckets, ...)` once at start-up (outside activation checkpointing and torch.compile),
which times the eligible candidates of each shape bucket, sums the times over ranks with the
caller's `reduce_times`, and installs the fastest, so every rank runs the same backend. A call
whose bucket was not planned takes `rule_choice` (SDPA: no timing, the same on every rank);
traced calls read the same table. On CPU SDPA runs. `D2V_KERNELS=off` forces the PyTorch
reference; `D2V_KERNELS=triton` or `force_backend("triton")` force the Triton kernels, also for
CPU tensors under TRITON_INTERPRET=1 (set before triton is imported; tests do this).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from d2v.kernels.attention_reference import Alibi, alibi_bias, alibi_slopes, attention_reference

BACKENDS = ("triton", "xformers", "sdpa", "reference")
# Timed in this order on every rank (ineligible ones as +inf), so that the lists handed to
# `reduce_times` line up element by element; also the tie-break order.
CANDIDATES = ("triton", "xformers", "sdpa")
# On a GPU the Triton kernels take fp16 and bf16, the dtypes the GPU-compile check proves free of
# spills (kernels/RESOURCES.md); their fp32 tiles spill up to 8.9 KB of stack per thread on sm_90,
# so fp32 runs SDPA. The interpreter (CPU tests) has no registers: fp32 is its exact dtype there.
TRITON_DTYPES = (torch.float16, torch.bfloat16)


def triton_dtypes() -> tuple[torch.dtype, ...]:
    return TRITON_DTYPES + ((torch.float32,) if os.environ.get("TRITON_INTERPRET") == "1" else ())

# timer(name, run) -> milliseconds; run() does one forward (and backward) of that candidate.
Timer = Callable[[str, Callable[[], object]], float]
# reduce_times(local) -> the element-wise sum of every rank's list (a collective in the trainer).
ReduceTimes = Callable[[list[float]], list[float]]
_timer: Timer | None = None
_forced: str | None = None


class Bucket(NamedTuple):
    """The shape class one backend choice covers. Lengths are rounded up to a power of two
    (at least 64); `bias_grad` / `alibi_grad` / `grad` mean a gradient is needed in this call."""

    dtype: torch.dtype
    head_dim: int
    tq: int
    tk: int
    padding: bool = False
    bias: bool = False
    bias_grad: bool = False
    alibi: bool = False
    alibi_positions: bool = False
    alibi_grad: bool = False
    dropout: bool = False
    grad: bool = False

    def describe(self) -> str:
        flags = [name for name in ("padding", "bias", "bias_grad", "alibi", "alibi_positions", "alibi_grad",
                                   "dropout", "grad") if getattr(self, name)]
        lengths = f"Tq<={self.tq}" if self.tq == self.tk else f"Tq<={self.tq} Tk<={self.tk}"
        return f"{str(self.dtype).removeprefix('torch.')} Dh={self.head_dim} {lengths} {' '.join(flags) or 'plain'}"


_plan: dict[Bucket, str] = {}
# Choices already timed in this process, by (bucket, heads, batch, device): a later plan() of the
# same shapes (another run in the same process, as in gpu-check) installs them without timing.
_timed: dict[tuple[Bucket, int, int, str], str] = {}


def set_timer(timer: Timer | None) -> None:
    """Default timer of `plan` (None restores CUDA-event timing)."""
    global _timer
    _timer = timer


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run every call inside the block on one backend, bypassing eligibility and the plan."""
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


def _capability(q: Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device)


@functools.cache  # a failing import is retried by Python on every call otherwise
def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _triton_head_dims() -> tuple[int, ...]:
    from d2v.kernels.attention_flash import HEAD_DIMS

    return HEAD_DIMS


def length_bucket(t: int) -> int:
    """t rounded up to a power of two, at least 64 (a loop, so traced lengths work too)."""
    bucket = 64
    while bucket < t:
        bucket *= 2
    return bucket


def bucket_of(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              bias: Tensor | None = None, alibi: Alibi | None = None, dropout_p: float = 0.0) -> Bucket:
    """The bucket of one call, with gradients judged by the current grad mode."""
    grad_mode = torch.is_grad_enabled()
    bias_grad = grad_mode and bias is not None and bias.requires_grad
    alibi_grad = grad_mode and alibi is not None and alibi.scale_H.requires_grad
    grad = bias_grad or alibi_grad or (grad_mode and any(x.requires_grad for x in (q, k, v)))
    return Bucket(q.dtype, q.shape[-1], length_bucket(q.shape[2]), length_bucket(k.shape[2]),
                  padding=key_padding_mask is not None, bias=bias is not None, bias_grad=bias_grad,
                  alibi=alibi is not None, alibi_positions=alibi is not None and alibi.positions_BT is not None,
                  alibi_grad=alibi_grad, dropout=dropout_p > 0.0, grad=grad)


# A backend is eligible for a bucket only if it returns every gradient the call needs and
# supports its inputs; each rule names the backend it excludes and why. SDPA is always
# eligible (its own backends are restricted per call, see SDPA_RULES).
class Rule(NamedTuple):
    backend: str
    excludes: Callable[[Bucket], bool]
    why: str


ELIGIBILITY: tuple[Rule, ...] = (
    Rule("triton", lambda b: b.head_dim not in _triton_head_dims(), "Triton kernels exist for head dims 64, 80, 128"),
    Rule("triton", lambda b: b.dtype not in triton_dtypes(),
         "Triton kernels take fp16 and bf16 (fp32 only under the interpreter: its GPU tiles spill)"),
    Rule("xformers", lambda b: not _xformers_available(), "xformers is not installed"),
    Rule("xformers", lambda b: b.alibi, "xformers takes no kept positions and returns no ALiBi-scale gradient"),
    Rule("xformers", lambda b: b.bias_grad, "xformers' tensor-bias gradient is not relied on"),
)


def ineligible(bucket: Bucket) -> dict[str, list[str]]:
    """{backend: reasons} for the candidates the rules exclude from `bucket`."""
    out: dict[str, list[str]] = {}
    for rule in ELIGIBILITY:
        if rule.excludes(bucket):
            out.setdefault(rule.backend, []).append(rule.why)
    return out


def eligible(bucket: Bucket) -> list[str]:
    """Eligible candidates for `bucket`, in tie-break order."""
    excluded = ineligible(bucket)
    return [name for name in CANDIDATES if name not in excluded]


def candidates(q: Tensor, k: Tensor, *, bias=None, alibi=None) -> list[str]:
    """Eligible backends for these inputs, in tie-break order (SDPA only on CPU)."""
    if not _on_gpu(q):
        return ["sdpa"]
    return eligible(bucket_of(q, k, k, None, bias, alibi))


class SdpaCall(NamedTuple):
    """What SDPA's backend rules look at: whether an additive mask is passed and needs a
    gradient, whether any gradient is needed, and the real (unrounded) lengths."""

    mask: bool
    mask_grad: bool
    grad: bool
    tq: int
    tk: int


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


class SdpaRule(NamedTuple):
    backend: SDPBackend
    excludes: Callable[[SdpaCall, tuple[int, int]], bool]
    why: str


SDPA_RULES: tuple[SdpaRule, ...] = (
    SdpaRule(SDPBackend.CUDNN_ATTENTION, lambda c, version: c.mask_grad,
             "cuDNN's backward returns no gradient for the mask (learned bias, ALiBi scale)"),
    SdpaRule(SDPBackend.CUDNN_ATTENTION,
             lambda c, version: (c.mask and c.grad and version >= (2, 11)
                                 and (c.tq % 128 == 64 or c.tk % 128 == 64)),
             "PyTorch >= 2.11 cuDNN gives NaN grad_q on H100/H200 with a mask when T % 128 == 64"),
    SdpaRule(SDPBackend.FLASH_ATTENTION, lambda c, version: c.mask, "FlashAttention takes no tensor mask"),
)
# cuDNN first on Hopper: 1.7-2.3x faster than FLASH there but not first in torch's default order
# (ds_anchors.md 4); elsewhere torch's order.
_HOPPER_ORDER = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)
_DEFAULT_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                  SDPBackend.CUDNN_ATTENTION)


def sdpa_backends(call: SdpaCall, *, hopper: bool, torch_version: tuple[int, int] | None = None
                  ) -> list[SDPBackend] | None:
    """SDPA backends allowed for `call` in priority order, or None to leave torch's choice."""
    version = _torch_version() if torch_version is None else torch_version
    excluded = {rule.backend for rule in SDPA_RULES if rule.excludes(call, version)}
    if not excluded and not hopper:
        return None
    return [b for b in (_HOPPER_ORDER if hopper else _DEFAULT_ORDER) if b not in excluded]


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


def _sdpa_context(q: Tensor, k: Tensor, mask: Tensor | None):
    if not _on_gpu(q):
        return contextlib.nullcontext()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, mask))
    call = SdpaCall(mask=mask is not None, mask_grad=mask is not None and mask.requires_grad, grad=grad,
                    tq=q.shape[2], tk=k.shape[2])
    allowed = sdpa_backends(call, hopper=_capability(q)[0] == 9)
    return contextlib.nullcontext() if allowed is None else sdpa_kernel(allowed, set_priority=True)


def _run_sdpa(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    mask = _dense_mask(q, k.shape[2], key_padding_mask, bias, alibi, q.dtype)
    with _sdpa_context(q, k, mask):
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
    from d2v.kernels.attention_flash import flash_attention

    return flash_attention(q, k, v, key_padding_mask=key_padding_mask, bias=bias, alibi=alibi,
                           dropout_p=dropout_p, scale=scale)


def _run_reference(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale):
    return attention_reference(q, k, v, key_padding_mask=key_padding_mask, bias=bias, alibi=alibi,
                               dropout_p=dropout_p, scale=scale)


RUNNERS: dict[str, Callable[..., Tensor]] = {
    "triton": _run_triton, "xformers": _run_xformers, "sdpa": _run_sdpa, "reference": _run_reference}


def rule_choice(bucket: Bucket) -> str:
    """The backend of a bucket nobody planned: PyTorch SDPA (with its backends restricted by
    SDPA_RULES), chosen without timing, so every rank and every trace agree."""
    return "sdpa"


def planned() -> dict[Bucket, str]:
    """The installed plan, {bucket: backend} (a copy, for logging and tests)."""
    return dict(_plan)


def describe_plan() -> list[str]:
    """One line per planned bucket, `<bucket>: <backend>`, for the run log."""
    return [f"{bucket.describe()}: {name}" for bucket, name in _plan.items()]


def reset_plan() -> None:
    """Forgets the installed plan and every timing behind it."""
    _plan.clear()
    _timed.clear()


def buckets_for(*, dtype: torch.dtype, head_dim: int, max_len: int, min_len: int = 1,
                padding: bool | Collection[bool] = False, bias: bool | Collection[bool] = False,
                bias_grad: bool | Collection[bool] = False, alibi: bool | Collection[bool] = False,
                alibi_positions: bool | Collection[bool] = False, alibi_grad: bool | Collection[bool] = False,
                dropout: bool | Collection[bool] = False, grad: bool | Collection[bool] = True) -> list[Bucket]:
    """The self-attention (Tq == Tk) buckets of a model: every length bucket from min_len to
    max_len × every combination of the flags, each a bool or a collection of bools (e.g.
    `grad=(True, False)` for a student that trains and a teacher that does not). Flags that
    need another (bias_grad needs bias and grad, alibi_* need alibi) are dropped otherwise."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"buckets_for needs 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")

    def options(flag) -> tuple[bool, ...]:
        return (bool(flag),) if isinstance(flag, bool) else tuple(dict.fromkeys(bool(f) for f in flag))

    lengths = []
    t = length_bucket(min_len)
    while True:
        lengths.append(t)
        if t >= max_len:
            break
        t *= 2
    out: dict[Bucket, None] = {}
    for t in lengths:
        for pad in options(padding):
            for b in options(bias):
                for bg in options(bias_grad):
                    for a in options(alibi):
                        for ap in options(alibi_positions):
                            for ag in options(alibi_grad):
                                for d in options(dropout):
                                    for g in options(grad):
                                        out[Bucket(dtype, head_dim, t, t, padding=pad, bias=b,
                                                   bias_grad=b and bg and g, alibi=a,
                                                   alibi_positions=a and ap, alibi_grad=a and ag and g,
                                                   dropout=d, grad=g)] = None
    return list(out)


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


def _timing_inputs(bucket: Bucket, batch: int, num_heads: int, device) -> tuple:
    """Stand-in inputs for one bucket at its longest length: q/k/v, a quarter of the keys of
    half the samples padded, a shared 1×H×T×T bias, ALiBi with kept positions, dropout 0.1."""
    B, H, Tq, Tk, Dh = batch, num_heads, bucket.tq, bucket.tk, bucket.head_dim

    def randn(*shape, grad):
        return torch.randn(*shape, device=device, dtype=bucket.dtype).requires_grad_(grad)

    q, k, v = randn(B, H, Tq, Dh, grad=bucket.grad), randn(B, H, Tk, Dh, grad=bucket.grad), \
        randn(B, H, Tk, Dh, grad=bucket.grad)
    kpm = None
    if bucket.padding:
        kpm = torch.zeros(B, Tk, dtype=torch.bool, device=device)
        kpm[: max(1, B // 2), Tk - Tk // 4:] = True
    bias = randn(1, H, Tq, Tk, grad=bucket.bias_grad) if bucket.bias else None
    alibi = None
    if bucket.alibi:
        positions = torch.arange(Tq, device=device).repeat(B, 1) if bucket.alibi_positions else None
        alibi = Alibi(alibi_slopes(H).to(device), torch.ones(H, device=device, requires_grad=bucket.alibi_grad),
                      positions)
    return q, k, v, kpm, bias, alibi, 0.1 if bucket.dropout else 0.0, None


def _timed_call(name, q, k, v, key_padding_mask, bias, alibi, dropout_p, scale) -> Callable[[], object]:
    """One forward, plus a backward when any input needs a gradient, of candidate `name`."""
    leaves = [x for x in (q, k, v, bias, alibi.scale_H if alibi else None) if x is not None and x.requires_grad]

    def run():
        o = RUNNERS[name](q, k, v, key_padding_mask, bias, alibi, dropout_p, scale)
        if leaves:
            torch.autograd.grad(o, leaves, torch.ones_like(o))
        return o
    return run


def plan(buckets: Iterable[Bucket], *, num_heads: int, batch: int | Callable[[Bucket], int],
         device: torch.device | str = "cuda", reduce_times: ReduceTimes | None = None,
         timer: Timer | None = None) -> dict[Bucket, str]:
    """Choose and install a backend for each bucket, the same on every rank.

    Call once at start-up on every rank with the same buckets (`buckets_for`), outside
    activation checkpointing and torch.compile. Each rank times every eligible candidate of
    every bucket on stand-in inputs (`batch` samples, or `batch(bucket)`, of `num_heads` heads
    on `device`; a failing or ineligible candidate counts +inf), `reduce_times` sums the list
    over ranks (one collective for the whole plan; None on a single process), and the smallest
    sum wins, ties in CANDIDATES order. A bucket this process already timed with the same heads,
    batch and device keeps that choice untimed; every rank has made the same calls before, so all
    ranks skip the same buckets (and the collective when nothing is left to time). Returns the
    installed {bucket: backend}."""
    if torch.compiler.is_compiling():
        raise RuntimeError("d2v.kernels.attention.plan times kernels: call it at start-up, outside torch.compile")
    buckets = list(dict.fromkeys(buckets))
    timer = timer or _timer or (lambda name, run: _cuda_time(run))
    device = torch.device(device)
    keys = {b: (b, num_heads, batch(b) if callable(batch) else batch, str(device)) for b in buckets}
    todo = [b for b in buckets if keys[b] not in _timed]
    local: list[float] = []
    # Timing draws random inputs and dropout seeds; leave the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for bucket in todo:
            names = eligible(bucket)
            n = keys[bucket][2]
            with torch.set_grad_enabled(bucket.grad):
                inputs = _timing_inputs(bucket, n, num_heads, device)
                for name in CANDIDATES:
                    if name not in names:
                        local.append(math.inf)
                        continue
                    try:
                        local.append(float(timer(name, _timed_call(name, *inputs))))
                    except Exception:  # a candidate that fails on this shape is just not chosen
                        local.append(math.inf)
    total = [float(x) for x in reduce_times(local)] if reduce_times is not None and todo else local
    if len(total) != len(local):
        raise ValueError(f"reduce_times returned {len(total)} values for {len(local)}: it must sum element-wise")
    width = len(CANDIDATES)
    for i, bucket in enumerate(todo):
        times = total[i * width:(i + 1) * width]
        best = min(range(width), key=lambda j: (times[j], j))
        _timed[keys[bucket]] = CANDIDATES[best] if math.isfinite(times[best]) else rule_choice(bucket)
    for bucket in buckets:
        _plan[bucket] = _timed[keys[bucket]]
    return {bucket: _plan[bucket] for bucket in buckets}


def _choose(q, k, v, key_padding_mask, bias, alibi, dropout_p, scale) -> str:
    """A table lookup, never a measurement: the same in eager, traced and recomputed calls."""
    if not _on_gpu(q):
        return "sdpa"
    key = bucket_of(q, k, v, key_padding_mask, bias, alibi, dropout_p)
    return _plan.get(key) or rule_choice(key)


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
              bias: Tensor | None = None, alibi: Alibi | None = None, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    args = (q, k, v, key_padding_mask, bias, alibi, float(dropout_p), scale)
    mode = os.environ.get("D2V_KERNELS", "auto").lower()
    if mode == "off":
        return _run_reference(*args)
    name = _forced or ("triton" if mode == "triton" else _choose(*args))
    return RUNNERS[name](*args)
