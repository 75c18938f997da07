"""EMA teacher (docs/method.md §3.1 step 5): schedule, fp32 update, copies, no gradients."""
import pytest
import torch

from d2v.config import get_preset, resolve
from d2v.models import build_model
from d2v.teacher import Teacher, ema_decay


def test_schedule_values():
    args = dict(start=0.999, end=0.9999, anneal_steps=30_000)
    assert ema_decay(0, **args) == pytest.approx(0.999)
    assert ema_decay(15_000, **args) == pytest.approx(0.99945)
    assert ema_decay(30_000, **args) == pytest.approx(0.9999)
    assert ema_decay(60_000, **args) == pytest.approx(0.9999)
    assert ema_decay(5, start=0.99, end=1.0, anneal_steps=0) == 1.0


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).abs()


def _perturb(student):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_one_update_is_exact_in_fp32_and_copies_are_copies():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    _perturb(student)
    before = {n: p.detach().double().clone() for n, p in teacher.model.named_parameters()}
    sp = dict(student.named_parameters())
    tau = teacher.update(0)
    assert tau == pytest.approx(cfg.teacher.ema_start)
    for name, t in teacher.model.named_parameters():
        assert t.dtype == torch.float32
        if name in teacher.copy_names:
            assert torch.equal(t, sp[name].detach())
        else:
            src = sp[name].detach().double()
            want = before[name] + (1 - tau) * (src - before[name])
            err = (t.double() - want).abs()
            # One fp32 ulp at the operands' scale: where t ~ -(1-tau)(s-t) the result nears 0
            # and its own ulp is far below the rounding of any fp32 evaluation of t + w(s-t).
            scale = torch.maximum(before[name].abs(), src.abs()).float()
            assert (err <= _ulp(scale).double()).all(), f"{name}: {err.max()}"
    assert teacher.copy_names and all(n.startswith("encoder.pos_conv") for n in teacher.copy_names)
    assert all(n.startswith(("encoder.layer_norm", "encoder.blocks")) for n in teacher.ema_names)


def test_teacher_has_no_cnn_head_or_mask_embedding_and_gets_no_gradient():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    names = [n for n, _ in teacher.named_parameters()]
    assert names and not any(n.startswith(("model.frontend", "model.head", "model.mask_embedding")) for n in names)
    assert all(not p.requires_grad for p in teacher.parameters())
    feats = student.features(torch.randn(2, 16_000))
    y = teacher.targets(feats.x)
    assert y.shape == feats.x.shape and not y.requires_grad
    loss = (student.head(student.encode(feats.x)) - y).square().mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.frontend.conv_layers[0].conv.weight.grad is not None
    teacher.train()
    assert not teacher.model.training  # always eval


def test_ema_stays_fp32_for_a_bf16_student():
    cfg = get_preset("audio_tiny")
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    student.to(torch.bfloat16)
    teacher.bind(student)
    t0 = {n: p.clone() for n, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    for step in range(3):
        teacher.update(step)
    for n, p in teacher.model.named_parameters():
        assert p.dtype == torch.float32
    moved = [n for n in teacher.ema_names if not torch.equal(t0[n], dict(teacher.model.named_parameters())[n])]
    assert len(moved) == len(teacher.ema_names)
    y = teacher.targets(student.features(torch.randn(1, 16_000, dtype=torch.bfloat16)).x, compute_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_tau_one_freezes():
    cfg = get_preset("audio_tiny")
    cfg.teacher.ema_start = cfg.teacher.ema_end = 1.0
    student = build_model(cfg)
    teacher = Teacher(student, cfg.teacher)
    before = {n: p.clone() for n, p in teacher.model.named_parameters()}
    _perturb(student)
    teacher.update(10)
    for n, p in teacher.model.named_parameters():
        if n in teacher.ema_names:
            assert torch.equal(p, before[n])


def test_misconfigured_scope_is_an_error():
    cfg = get_preset("audio_tiny")
    cfg.teacher.ema_modules = ("encoder.blocks",)
    with pytest.raises(ValueError, match="encoder.layer_norm"):
        Teacher(build_model(cfg), cfg.teacher)


# -- the offloaded teacher (teacher.offload=cpu) -----------------------------------------------

def _teacher_input(cfg, student, batch=2):
    """What the task feeds the teacher: the student's features, or the raw image for 'source'."""
    g = torch.Generator().manual_seed(1)
    if cfg.teacher.input == "source":
        return torch.randn(batch, 3, cfg.model.image.image_size, cfg.model.image.image_size, generator=g)
    if cfg.model.modality == "text":
        return student.features(torch.randint(5, 100, (batch, 24), generator=g)).x.detach()
    return student.features(torch.randn(batch, 8_000, generator=g)).x.detach()


def _pair(preset):
    """A resident and an offloaded teacher of the same student."""
    import copy

    cfg = get_preset(preset)
    torch.manual_seed(0)
    student = build_model(cfg)
    off_cfg = copy.deepcopy(cfg.teacher)
    off_cfg.offload = "cpu"
    resident = Teacher(student, cfg.teacher).place(torch.device("cpu"))
    offloaded = Teacher(student, off_cfg).place(torch.device("cpu"))
    return cfg, student, resident, offloaded


def _same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("preset", ["audio_tiny", "image_tiny", "text_tiny",
                                    "audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_offloaded_teacher_equals_the_resident_one_bitwise(preset, student_dtype):
    # Same device (CPU here): EMA, fp32 targets and the bf16 GEMM weights are bitwise equal
    # after updates, a checkpoint load and a replaced parameter. (On CUDA the host lerp differs
    # from the device lerp by at most one fp32 ulp of max(|teacher|, |student|); see
    # test_one_update_is_exact_in_fp32_and_copies_are_copies for that bound.)
    cfg, student, resident, offloaded = _pair(preset)
    x = _teacher_input(cfg, student)
    if cfg.teacher.input != "source":
        x = x.to(student_dtype)  # features come in the student's dtype
    student.to(student_dtype)
    resident.bind(student)
    offloaded.bind(student)

    def check(what):
        a32, b32 = resident.targets(x.float()), offloaded.targets(x.float())
        assert torch.equal(a32, b32), f"{what}, fp32: {(a32 - b32).abs().max()}"
        # Under bf16 autocast the offloaded teacher must multiply with exactly the weights autocast
        # casts for the resident one. The targets themselves are bitwise equal only where the CPU's
        # bf16 GEMMs do not depend on where their operands live (they differ on AVX512-BF16/AMX
        # CPUs, and on AVX2 ones after other tests ran in the process), and a one-ulp difference
        # grows through the later norms. So the two bf16 runs must agree at least as well as bf16
        # agrees with fp32 for this model and input (this machine's own bf16 noise).
        (a, wa), (b, wb) = _with_gemm_weights(resident, x), _with_gemm_weights(offloaded, x)
        assert len(wa) == len(wb) > 0
        for i, (u, v) in enumerate(zip(wa, wb)):
            assert u.dtype == v.dtype == torch.bfloat16 and torch.equal(u, v), f"{what}: GEMM weight {i} differs"
        diff, noise = (a - b).abs(), (a - a32).abs()
        assert float(diff.mean()) <= float(noise.mean()) and float(diff.max()) <= 0.25, \
            f"{what}, bf16: mean |diff| {float(diff.mean()):.3g} above bf16 noise {float(noise.mean()):.3g}"

    check("initial")
    for step in range(3):
        _perturb(student)
        assert resident.update(step) == offloaded.update(step)
        assert _same_params(resident, offloaded), f"EMA differs after update {step}"
        check(f"after update {step}")
    state = {n: p + 0.01 * torch.randn_like(p) for n, p in resident.export_state().items()}
    resident.load_state(state)
    offloaded.load_state(state)
    check("after load_state")
    p = next(offloaded.model.encoder.blocks[0].parameters())
    q = next(resident.model.encoder.blocks[0].parameters())
    with torch.no_grad():
        q.add_(1.0)
        p.data = p.data + 1.0  # replaced, not written in place
    check("after a replaced parameter")
    assert p.data.data_ptr() != 0 and _in_buffer(p.data, offloaded._host.master)


def _with_gemm_weights(teacher, x):
    """bf16 targets and, in call order, the weight every Linear/Conv multiplies with under autocast
    (an fp32 weight as autocast casts it: round to nearest even)."""
    seen = []

    def record(module, args):
        seen.append(module.weight.detach().to(torch.bfloat16).clone())

    gemms = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    handles = [m.register_forward_pre_hook(record) for m in teacher.model.modules() if isinstance(m, gemms)]
    try:
        return teacher.targets(x, compute_dtype=torch.bfloat16), seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("preset", ["image_tiny", "audio_tiny_v2", "image_tiny_v2"])
def test_an_offloaded_teacher_keeps_its_buffers_on_the_device_and_streams_every_parameter(preset):
    # Position tables, ALiBi slopes and index maps are read by every forward on the device (a host
    # buffer there is a device mismatch on CUDA); only parameters stay on the host and stream.
    from d2v.teacher.offload import streaming_units

    cfg, student, _, offloaded = _pair(preset)
    offloaded.place(torch.device("meta"))
    buffers = list(offloaded.model.buffers())
    assert buffers and all(b.device.type == "meta" for b in buffers)
    assert all(p.device.type == "cpu" for p in offloaded.model.parameters())
    units = streaming_units(offloaded.model)
    streamed = {id(p) for u in units for p in u.parameters()}
    assert streamed == {id(p) for p in offloaded.model.parameters()}
    if cfg.model.v2.enabled:
        enc = offloaded.model.encoder
        assert units[-len(enc.blocks):] == list(enc.blocks)
        assert all(b in units for b in enc.prenet) and (enc.alibi is None or enc.alibi in units)


def _in_buffer(t, buf):
    start, size = buf.data_ptr(), buf.numel() * buf.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + size


class _Event:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class RecordingCopies:
    """A CPU stand-in for CUDA streams that logs every ordering operation (copies run at once)."""

    def __init__(self):
        from d2v.teacher.offload import HostCopies

        self.plain = HostCopies()
        self.log = []
        self.pinned = []
        self.allocs = []

    def compute_stream(self):
        return "compute"

    def side_stream(self):
        return "copy"

    def event(self, name):
        return _Event(name)

    def record(self, event, stream):
        self.log.append(("record", stream, event.name))

    def wait(self, stream, event):
        self.log.append(("wait", stream, event.name))

    def synchronize(self, event):
        self.log.append(("sync", None, event.name))

    def copy(self, dst, src, stream):
        self.log.append(("copy", stream, (dst, src)))
        dst.copy_(src)

    def empty(self, numel, dtype, device, stream):
        # An allocation is a use on its stream: the caching allocator may hand out memory that
        # kernels queued there before it still read.
        t = torch.empty(numel, dtype=dtype, device=device)
        self.allocs.append((t, stream))
        self.log.append(("alloc", stream, (t,)))
        return t

    def host_buffer(self, numel, dtype):
        t = torch.empty(numel, dtype=dtype)
        self.pinned.append(t)
        return t

    def is_pinned(self, t):
        return any(_in_buffer(t, b) for b in self.pinned)


def unordered_first_writes(log):
    """Writes on one stream into a buffer allocated on another, with no wait (on the writing
    stream) for an event the allocating stream recorded after the allocation."""
    bad = []
    for k, (op, stream, what) in enumerate(log):
        if op != "copy":
            continue
        dst = what[0]
        allocs = [(a, s) for a, (o, s, w) in enumerate(log[:k]) if o == "alloc" and _in_buffer(dst, w[0])]
        if not allocs:
            continue
        a, home = allocs[-1]
        if home == stream:
            continue
        recorded = {w: r for r, (o, s, w) in enumerate(log[:k]) if o == "record" and s == home and r > a}
        if not any(o == "wait" and s == stream and w in recorded and recorded[w] < i
                   for i, (o, s, w) in enumerate(log[:k]) if i > a):
            bad.append(k)
    return bad


def test_the_first_write_reader_sees_a_missing_ordering():
    buf = torch.empty(4)
    log = [("alloc", "compute", (buf,)), ("copy", "copy", (buf[:2], buf[2:]))]
    assert unordered_first_writes(log) == [1]
    ordered = [log[0], ("record", "compute", "a"), ("wait", "copy", "a"), log[1]]
    assert unordered_first_writes(ordered) == []


def _instrument(teacher, log):
    """Logs the begin and end of each unit's own computation."""
    from d2v.teacher.offload import streaming_units

    for i, unit in enumerate(streaming_units(teacher.model)):
        def run(*args, _i=i, _f=unit.forward, **kw):
            log.append(("compute_begin", "compute", _i))
            out = _f(*args, **kw)
            log.append(("compute_end", "compute", _i))
            return out
        unit.forward = run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_streamer_orders_copies_events_and_slots_like_cuda_needs(dtype):
    import copy

    from d2v.teacher.offload import streaming_units

    cfg = get_preset("audio_tiny")
    torch.manual_seed(0)
    student = build_model(cfg)
    x = _teacher_input(cfg, student).to(dtype)
    student.to(torch.bfloat16)
    tcfg = copy.deepcopy(cfg.teacher)
    tcfg.offload = "cpu"
    rec = RecordingCopies()
    teacher = Teacher(student, tcfg)
    teacher.bind(student)
    teacher.place(torch.device("cpu"), copies=rec)
    units = streaming_units(teacher.model)
    _instrument(teacher, rec.log)
    teacher.targets(x, compute_dtype=dtype)
    teacher.update(0)
    pins = len(rec.pinned)
    assert pins == 2 + (dtype != torch.float32)  # master, student pull, compute-dtype shadow
    for step in range(1, 4):
        rec.log.clear()
        teacher.targets(x, compute_dtype=dtype)
        forward_log = list(rec.log)
        rec.log.clear()
        _perturb(student)
        teacher.update(step)
        update_log = list(rec.log)
    assert len(rec.pinned) == pins, "host buffers were pinned again"
    # Every host parameter is a view of the pinned master, aligned as fresh allocations are.
    assert all(rec.is_pinned(p.data) for p in teacher.model.parameters())
    host = teacher._host
    base = host.master.data_ptr()
    assert all((p.data.data_ptr() - base) % 512 == 0 for p in teacher.model.parameters())
    assert all(offset % 128 == 0 for entries in host.layout for _, _, offset in entries)  # in the slots

    log = forward_log
    pos = {}
    for k, (op, stream, what) in enumerate(log):
        key = (op, stream, what if not isinstance(what, tuple) else None)
        pos.setdefault(key, k)
    slots = [t for t, stream in rec.allocs[-4:]]
    assert all(stream == "compute" for _, stream in rec.allocs), "slots must be allocated on the compute stream"
    n = len(units)
    for i in range(n):
        begin = pos["compute_begin", "compute", i]
        # Block i waits for its own copy, and for nothing else since the previous unit ended.
        since = pos["compute_end", "compute", i - 1] if i else 0
        waits = [w for op, s, w in log[since:begin] if op == "wait" and s == "compute"]
        assert waits == [f"copied:{i}"], (i, waits)
        assert pos["record", "copy", f"copied:{i}"] < pos["wait", "compute", f"copied:{i}"]
        if i + 1 < n:  # block i+1's copy is queued before block i computes
            assert pos["record", "copy", f"copied:{i + 1}"] < begin
    # A slot takes unit j only after the unit before it in that slot finished on the compute stream.
    copies = [(k, s, dst, src) for k, (op, s, w) in enumerate(log) if op == "copy" for dst, src in [w]]
    assert copies and all(s == "copy" for _, s, _, _ in copies)
    for k, _, dst, src in copies:
        assert rec.is_pinned(src), "a host-to-device copy reads unpinned memory"
        slot = next(j for j, b in enumerate(slots) if _in_buffer(dst, b)) // 2
        unit = next(int(w.split(":")[1]) for op, s, w in log[k:] if op == "record" and s == "copy")
        assert unit % 2 == slot
        if unit >= 2:
            done = pos["record", "compute", f"done:{unit - 2}"]
            wait = pos["wait", "copy", f"done:{unit - 2}"]
            assert pos["compute_end", "compute", unit - 2] < done < wait < k
        # Weights autocast casts travel in the compute dtype, the rest in fp32.
        assert src.dtype in (dtype, torch.float32)
    streamed = sum(src.numel() * src.element_size() for _, _, _, src in copies)
    numel = sum(p.numel() for p in teacher.model.parameters())
    small = sum(p.numel() for p in teacher.model.parameters() if p.ndim == 1 and p.numel() == cfg.model.embed_dim)
    gaps = 2 * 128 * len(list(teacher.model.parameters()))  # at most the alignment gaps, in elements
    if dtype == torch.float32:
        assert 4 * numel <= streamed <= 4 * (numel + gaps)
    else:
        assert 2 * numel <= streamed <= 2 * (numel + small + gaps)  # only norms and such in fp32
    # The slots are allocated on the compute stream: the first copy into each waits for it.
    assert not unordered_first_writes(log), [log[k][:2] for k in unordered_first_writes(log)]
    # Every copy was waited for by the compute stream (which then releases the slots).
    assert {w for op, s, w in log if op == "wait" and s == "compute"} == {f"copied:{i}" for i in range(n)}

    # The update: one non-blocking copy per source into a pinned buffer, then one wait.
    pulls = [w for op, s, w in update_log if op == "copy"]
    assert len(pulls) == len(teacher.ema_names) + len(teacher.copy_names)
    assert all(rec.is_pinned(dst) for dst, _ in pulls)
    syncs = [w for op, _, w in update_log if op == "sync"]
    assert syncs.count("pulled") == 1 and all(s == "pulled" or s.startswith("copied:") for s in syncs)


@pytest.mark.parametrize("preset,precision", [("audio_tiny", "fp32"), ("audio_tiny_v2", "fp32"), ("audio_tiny", "bf16")])
def test_a_training_run_with_an_offloaded_teacher_matches_the_resident_one(preset, precision):
    # The trainer's own path: place before DeepSpeed, bind to the engine's module, targets under
    # autocast every micro-batch, the host EMA update after every step. fp32: bitwise. bf16: the
    # engine's bf16 student and the bf16 pull into the host update; the targets (hence losses and
    # EMA) agree as two bf16 runs of one model do, since the CPU's bf16 GEMMs need not be
    # independent of where their operands live (see the bitwise test above).
    import os

    from d2v.config import load_template
    from d2v.data.synthetic import synthetic_batch
    from d2v.train.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    template = load_template(os.path.join(root, "ds_configs", "zero1.json"))
    runs = {}
    for offload in ("none", "cpu"):
        cfg = resolve(preset, overrides=[f"train.precision={precision}", "train.micro_batch_size=2", "train.grad_accum=2",
                                         "model.dropout=0", "model.layerdrop=0", f"teacher.offload={offload}"])
        trainer = Trainer(cfg, template)
        losses = []
        for step in range(2):
            batch = synthetic_batch(cfg, 4, seed=7, index=step)
            losses.append(trainer.train_step([batch.rows(0, 2), batch.rows(2, 4)]).loss)
        runs[offload] = losses, trainer.teacher.export_state()
    (loss_a, ema_a), (loss_b, ema_b) = runs["none"], runs["cpu"]
    if precision == "fp32":
        assert loss_b == loss_a
        assert all(torch.equal(ema_b[n], t) for n, t in ema_a.items())
    else:
        assert loss_b == pytest.approx(loss_a, rel=2 ** -7)
        assert all(torch.allclose(ema_b[n], t, rtol=0, atol=1e-4) for n, t in ema_a.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["audio_tiny", "image_tiny"])
def test_on_cuda_the_streamed_teacher_equals_the_resident_one(preset):
    # Real streams, events and pinned copies. From the same weights the targets are bitwise
    # equal (same kernels: same dtypes, shapes and operand alignment); the host EMA update may
    # differ from the device one by one fp32 ulp of max(|teacher|, |student|) (FMA contraction).
    cfg, student, resident, offloaded = _pair(preset)
    x = _teacher_input(cfg, student)
    device = torch.device("cuda")
    student.to(device).to(torch.bfloat16)
    resident.place(device).bind(student)
    offloaded.place(device).bind(student)
    x = x.to(device) if cfg.teacher.input == "source" else x.to(device, torch.bfloat16)
    for step in range(3):
        for dtype in (None, torch.bfloat16):
            inputs = x.float() if dtype is None else x
            a, b = resident.targets(inputs, compute_dtype=dtype), offloaded.targets(inputs, compute_dtype=dtype)
            assert torch.equal(a, b), f"step {step}, compute {dtype}: {(a - b).abs().max()}"
        before = {n: p.detach().double().cpu() for n, p in resident.model.named_parameters()}
        _perturb(student)
        resident.update(step)
        offloaded.update(step)
        sp = dict(student.named_parameters())
        for (n, r), o in zip(resident.model.named_parameters(), offloaded.model.parameters()):
            assert o.device.type == "cpu" and o.is_pinned()
            scale = torch.maximum(before[n].abs(), sp[n].detach().double().cpu().abs()).float()
            assert ((r.double().cpu() - o.double()).abs() <= _ulp(scale).double()).all(), n
        offloaded.load_state(resident.export_state())  # the next step starts from the same weights


def test_the_replicated_ema_casts_a_bounded_chunk_at_a_time(monkeypatch):
    """A bf16 student's weights are cast to fp32 for the EMA chunk by chunk (no transient fp32
    copy of the whole student), with the same result as one cast of everything."""
    import d2v.teacher.core as core
    from d2v.config import get_preset
    from d2v.models import build_model

    cfg = get_preset("audio_tiny")
    torch.manual_seed(0)
    student = build_model(cfg).to(torch.bfloat16)
    whole, chunked = core.Teacher(student, cfg.teacher), core.Teacher(student, cfg.teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    whole.update(5)
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *a, **k):
        out = real_to(self, *a, **k)
        if out.dtype == torch.float32 and self.dtype == torch.bfloat16:
            casts.append(out.numel())
        return out

    monkeypatch.setattr(core, "EMA_CHUNK_ELEMENTS", 5_000)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    chunks = core.ema_chunks(chunked._ema_pairs)
    chunked.update(5)
    monkeypatch.undo()
    assert len(chunks) > 1 and all(sum(t.numel() for t, _ in c) <= 5_000 or len(c) == 1 for c in chunks)
    assert sum(casts) == sum(t.numel() for t, _ in chunked._ema_pairs)
    assert all(torch.equal(a, b) for a, b in zip(whole.ema_parameters(), chunked.ema_parameters()))
