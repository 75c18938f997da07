"""GPU-compile checks without a GPU (docs/method.md §5): every entry of every kernel module's
GPU_COMPILE_SPECS is compiled for sm_80 and sm_90 at its production block sizes; a spill
(LOCAL or STACK > 0) or shared memory over the per-block limit fails, and kernels/RESOURCES.md
must match the live numbers (regenerate: python -m d2v.kernels.gpu_compile --markdown kernels/RESOURCES.md).

The compile runs in a subprocess without TRITON_INTERPRET (tests/kernel_utils.py), so this
module can share a pytest session with the interpreter tests.
"""
from __future__ import annotations

import importlib
import os
import re

import pytest

from kernel_utils import REPO, gpu_compile_results
from d2v.kernels.gpu_compile import CCS, SHARED_LIMIT, ResourceError, Resources, _parse_usage, check

SPEC_MODULES = sorted(f"d2v.kernels.{p.stem}" for p in (REPO / "d2v" / "kernels").glob("*.py")
                      if re.search(r"^GPU_COMPILE_SPECS\s*=", p.read_text(), re.M))
_RESULTS: dict[str, tuple[int, list[dict], str]] = {}


def results_for(module: str) -> tuple[int, list[dict], str]:
    if module not in _RESULTS:  # one subprocess per module, shared by the tests below
        _RESULTS[module] = gpu_compile_results([module])
    return _RESULTS[module]


def test_targets_module_declares_specs():
    assert "d2v.kernels.targets_triton" in SPEC_MODULES


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_specs_compile_without_spills_or_excess_shared(module):
    rc, records, stderr = results_for(module)
    assert records, f"{module}: nothing compiled\n{stderr[-4000:]}"
    problems = [f"{r['name']} {r['label']} sm_{r['cc']}: local={r['local']} stack={r['stack']} shared={r['shared_bytes']}"
                for r in records
                if r["local"] or r["stack"] or r["shared_bytes"] > SHARED_LIMIT[r["cc"]]]
    assert not problems, "\n".join(problems)
    assert rc == 0, stderr[-4000:]
    per_cc = {cc: sum(r["cc"] == cc for r in records) for cc in CCS}
    assert len(set(per_cc.values())) == 1, f"every spec compiles for every cc: {per_cc}"
    assert all(0 < r["registers"] <= 255 for r in records)


def _table_rows(module: str) -> dict[tuple, tuple[int, int]]:
    """{(kernel, config, cc, constexprs): (registers, shared)} for `module` from kernels/RESOURCES.md."""
    rows = {}
    short = module.split(".")[-1]
    for line in (REPO / "kernels" / "RESOURCES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0] == short:
            key = (cells[1], cells[2], int(cells[3]), cells[10])
            assert key not in rows, f"two rows for {key}"
            rows[key] = (int(cells[4]), int(cells[7]))
    return rows


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_resources_table_matches_live_numbers(module):
    _, records, stderr = results_for(module)
    assert records, stderr[-4000:]
    live = {(r["name"], r["label"], r["cc"], r["constexprs"]): (r["registers"], r["shared_bytes"]) for r in records}
    assert len(live) == len(records), "two compile units share a table key"
    recorded = _table_rows(module)
    assert recorded == live, ("kernels/RESOURCES.md is stale; regenerate it with "
                              "`python -m d2v.kernels.gpu_compile --markdown kernels/RESOURCES.md`")


def test_every_row_is_built_with_the_runtime_specialisation():
    rows = [line for line in (REPO / "kernels" / "RESOURCES.md").read_text().splitlines()
            if line.startswith(("| attention_flash |", "| targets_triton |"))]
    assert rows and all(line.rstrip(" |").split("|")[-2].strip() == "runtime" for line in rows)
    assert "runtime specialisation" in (REPO / "kernels" / "RESOURCES.md").read_text()


class _Capture:
    """Stands in for kernels.attention_triton: records what the launchers pass at run time."""

    def __init__(self, module):
        self.module, self.launches = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        return type("Grid", (), {"__getitem__": lambda _, grid: (
            lambda *args, **kwargs: self.launches.append((fn, args, kwargs)))})()


def _attr_names(fn, attrs):
    return {fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v}


@pytest.mark.parametrize("H, options", [(12, ("pad", "dropout", "grad")), (16, ("alibi", "positions", "pad", "dropout", "grad")),
                                        (12, ("bias", "dropout", "grad"))])
def test_aot_units_specialise_like_the_runtime_launch(H, options, monkeypatch):
    """The check compiles, per preset call, the signature, constexprs and divisibility
    attributes that Triton's JIT derives from the arguments a real call passes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    import torch

    import d2v.kernels.attention_flash as af
    from d2v.kernels.gpu_compile import runtime_specialisation, units

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default; silences its warning
    T = 197 if "bias" in options else 999
    x = af.model_inputs(2, H, T, 64, torch.bfloat16, options)
    for name in ("q", "k", "v", "bias"):
        if name in x:
            x[name].requires_grad_()
    if "alibi" in x:
        x["alibi"].scale_H.requires_grad_()
    capture = _Capture(af._k)
    monkeypatch.setattr(af, "_k", capture)
    af.flash_attention(**x).sum().backward()
    assert [fn.__name__ for fn, _, _ in capture.launches] == ["_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
    monkeypatch.setattr(af, "_k", capture.module)

    spec = next(s for s in af.GPU_COMPILE_SPECS if s["label"].startswith(f"bf16 Dh=64 H={H} ")
                and set(s["label"].split()[-1].split("+")) == set(options) - {"grad"} and "student" in s["used_by"])
    for cc in CCS:
        planned = {(u["fn"].__name__, repr(sorted(u["signature"].items())), repr(sorted(u["constexprs"].items())),
                    repr(sorted(u["attrs"].items()))) for u in units("m", [spec], cc)}
        live = set()
        for fn, args, kwargs in capture.launches:
            signature, constexprs, attrs, _ = runtime_specialisation(fn, args, kwargs, cc)
            live.add((fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                      repr(sorted(attrs.items()))))
        assert planned == live
    fn, args, kwargs = capture.launches[0]
    _, _, attrs, _ = runtime_specialisation(fn, args, kwargs, 90)
    divisible = _attr_names(fn, attrs)
    # Pointers (16-byte aligned) and the D-wide row strides are divisible by 16; the head count
    # only when it is (16, not 12); per-call lengths and the seed are never specialised.
    assert {"Q", "K", "V", "O", "LSE", "sq_t", "sk_t", "so_t"} <= divisible
    assert ("H" in divisible) == (H % 16 == 0)
    assert not {"Tq", "Tk", "seed", "rng_offset", "skpm_b", "spos_b"} & divisible


def test_preset_calls_match_d2v_presets():
    """The launch table names every preset whose head dim has Triton kernels, with its heads
    and options; presets with other head dims (tiny: Dh 16) are absent."""
    from d2v.config.presets import get_preset, list_presets
    from d2v.kernels.attention_flash import HEAD_DIMS, PRESET_CALLS

    for name in list_presets():
        m = get_preset(name).model
        calls = [(H, opts) for users, H, _, opts in PRESET_CALLS if name in users.split()]
        if m.embed_dim // m.num_heads not in HEAD_DIMS:
            assert not calls, name
            continue
        assert m.embed_dim // m.num_heads == 64 and calls, name
        assert {H for H, _ in calls} == {m.num_heads}, name
        student = {o for _, opts in calls if "grad" in opts for o in opts}
        assert ("dropout" in student) == (m.attention_dropout > 0), name
        assert ("bias" in student) == (m.modality == "image" and not m.v2.enabled and m.image.rel_pos_bias), name
        assert ("alibi" in student) == bool(m.v2.enabled and m.v2.alibi), name


def test_target_calls_match_d2v_presets():
    from d2v.config.presets import get_preset, list_presets
    from d2v.kernels.targets_triton import PRESET_TARGETS

    for name in list_presets():
        cfg = get_preset(name)
        m, t = cfg.model, cfg.teacher
        rows = [row for row in PRESET_TARGETS if name in row[0].split()]
        assert len(rows) == 1, name
        _, D, _, extra, layer_norm, final_norm, padded = rows[0]
        cls = m.modality == "image" and (not m.v2.enabled or m.v2.cls_token)
        assert (D, extra, layer_norm, final_norm, padded) == (
            m.embed_dim, int(cls), t.layer_norm, t.final_norm, m.modality != "image"), name


@pytest.mark.parametrize("layer_norm, mask", [("instance", True), ("layer", False)])
def test_aot_target_units_specialise_like_the_runtime_launch(layer_norm, mask, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    import torch

    from d2v import kernels
    import d2v.kernels.targets_triton as tt
    from d2v.kernels.gpu_compile import runtime_specialisation, units

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.setenv("D2V_KERNELS", "triton")  # the Triton path for CPU tensors; nothing launches
    launches = []
    real = {name: getattr(tt, name) for name in ("_instance_stats", "_instance_merge", "_instance_apply", "_row_norm")}
    for name, fn in real.items():
        monkeypatch.setattr(tt, name, type("Grid", (), {"__getitem__": lambda _, grid, fn=fn: (
            lambda *args, **kwargs: launches.append((fn, args, kwargs)))})())
    D, T = 768, 999 if mask else 196
    extra = 0 if mask else 1
    padding = torch.zeros(2, T, dtype=torch.bool) if mask else None
    layer = torch.empty(2, extra + T, D, dtype=torch.bfloat16)[:, extra:]
    final_norm = None if mask else "layer"
    acc = kernels.accumulate(None, layer, layer_norm=layer_norm, padding_mask=padding)
    kernels.accumulate(acc, layer, layer_norm=layer_norm, padding_mask=padding)
    kernels.finalize(acc, top_k=2, final_norm=final_norm, padding_mask=padding)
    for name, fn in real.items():
        monkeypatch.setattr(tt, name, fn)

    spec = next(s for s in tt.GPU_COMPILE_SPECS
                if s["label"] == f"D={D} {layer_norm}/{final_norm}{' mask' if mask else ''}")
    for cc in CCS:
        planned = {(u["fn"].__name__, repr(sorted(u["signature"].items())), repr(sorted(u["constexprs"].items())),
                    repr(sorted(u["attrs"].items()))) for u in units("m", [spec], cc)}
        live = set()
        for fn, args, kwargs in launches:
            signature, constexprs, attrs, _ = runtime_specialisation(fn, args, kwargs, cc)
            live.add((fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                      repr(sorted(attrs.items()))))
        assert planned == live


def _resources(**over) -> Resources:
    base = dict(module="m", name="k", label="", cc=90, registers=64, stack=0, local=0, shared_bytes=1024,
                num_warps=4, num_stages=3, blocks={"BLOCK": 64})
    return Resources(**{**base, **over})


def test_check_rejects_spills_and_excess_shared():
    check(_resources())
    with pytest.raises(ResourceError, match="spills"):
        check(_resources(local=16))
    with pytest.raises(ResourceError, match="spills"):
        check(_resources(stack=8))
    check(_resources(cc=90, shared_bytes=SHARED_LIMIT[90]))
    with pytest.raises(ResourceError, match="shared"):
        check(_resources(cc=80, shared_bytes=SHARED_LIMIT[80] + 1))


def test_cuobjdump_output_is_parsed():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _k_a:\n"
            "  REG:40 STACK:0 SHARED:2048 LOCAL:8 CONSTANT[0]:400 TEXTURE:0\n"
            " Function _k_b:\n  REG:255 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:400\n")
    usage = _parse_usage(text)
    assert usage["_k_a"]["REG"] == 40 and usage["_k_a"]["LOCAL"] == 8 and usage["_k_a"]["SHARED"] == 2048
    assert usage["_k_b"]["STACK"] == 16


def test_every_dtype_the_gpu_path_takes_is_compiled():
    """The compile check covers each dtype the dispatcher hands the Triton kernels on a GPU."""
    dispatch = importlib.import_module("d2v.kernels.attention")
    af = importlib.import_module("d2v.kernels.attention_flash")
    compiled = {af.COMPILE_DTYPES[s["label"].split()[0]] for s in af.GPU_COMPILE_SPECS}
    assert compiled == set(dispatch.TRITON_DTYPES)
