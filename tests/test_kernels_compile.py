"""GPU-compile checks without a GPU (docs/method.md §5): every entry of every kernel module's
GPU_COMPILE_SPECS is compiled for sm_80 and sm_90 at its production block sizes; a spill
(LOCAL or STACK > 0) or shared memory over the per-block limit fails, and kernels/RESOURCES.md
must match the live numbers (regenerate: python -m kernels.gpu_compile --markdown kernels/RESOURCES.md).

The compile runs in a subprocess without TRITON_INTERPRET (tests/kernel_utils.py), so this
module can share a pytest session with the interpreter tests.
"""
from __future__ import annotations

import re

import pytest

from kernel_utils import REPO, gpu_compile_results
from kernels.gpu_compile import CCS, SHARED_LIMIT, ResourceError, Resources, _parse_usage, check

SPEC_MODULES = sorted(f"kernels.{p.stem}" for p in (REPO / "kernels").glob("*.py")
                      if re.search(r"^GPU_COMPILE_SPECS\s*=", p.read_text(), re.M))
_RESULTS: dict[str, tuple[int, list[dict], str]] = {}


def results_for(module: str) -> tuple[int, list[dict], str]:
    if module not in _RESULTS:  # one subprocess per module, shared by the tests below
        _RESULTS[module] = gpu_compile_results([module])
    return _RESULTS[module]


def test_targets_module_declares_specs():
    assert "kernels.targets_triton" in SPEC_MODULES


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
    """{(kernel, config, cc): (registers, shared)} for `module` from kernels/RESOURCES.md."""
    rows = {}
    short = module.split(".")[-1]
    for line in (REPO / "kernels" / "RESOURCES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] == short:
            rows[(cells[1], cells[2], int(cells[3]))] = (int(cells[4]), int(cells[7]))
    return rows


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_resources_table_matches_live_numbers(module):
    _, records, stderr = results_for(module)
    assert records, stderr[-4000:]
    live = {(r["name"], r["label"], r["cc"]): (r["registers"], r["shared_bytes"]) for r in records}
    recorded = _table_rows(module)
    assert recorded == live, ("kernels/RESOURCES.md is stale; regenerate it with "
                              "`python -m kernels.gpu_compile --markdown kernels/RESOURCES.md`")


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
