"""Compile Triton kernels for A100 (sm_80) and H100 (sm_90) without a GPU and read their
resource usage from the cubin (docs/method.md §5, "Without a GPU").

API (shared by every kernel module):
* A kernel module declares `GPU_COMPILE_SPECS`: a list of dicts, either
  - launch specs (what runs): `label`, `used_by` (who makes the call, e.g. preset names) and
    `launches`, a callable returning [(kernel, args, kwargs)] exactly as the module's launchers
    pass them (built from stand-in CPU tensors). The signature, constexprs and specialisation
    attributes (`tt.divisibility` 16 on pointers and ints divisible by 16, ints equal to 1 as
    constants, as the JIT does at launch) come from Triton's own binder for those arguments
    (`runtime_specialisation`), so the check and the runtime cannot drift; or
  - signature specs: `fn`, `signature` ({arg: "*bf16" | "i32" ...}), `constexprs`, `num_warps`,
    `num_stages`, optional `label`; compiled without specialisation attributes (marked so in
    the table).
* `discover()` imports every module of the `kernels` package and returns those that have specs;
  a new kernel module is picked up without editing this file.
* `units(module, specs, cc)` turns specs into compile units, merging launches that compile to
  the same binary; `compile_unit(unit) -> Resources` compiles for GPUTarget("cuda", cc, 32) and
  parses `cuobjdump --dump-resource-usage` (the binary the triton wheel bundles) for REG, STACK,
  LOCAL and SHARED; the compiled metadata on a driverless machine has no register or spill counts.
* `check(res)` raises ResourceError on spills (LOCAL or STACK > 0: local-memory traffic) or
  on shared memory (static + dynamic) above `SHARED_LIMIT[cc]`, the per-block opt-in maximum.
* `python -m d2v.kernels.gpu_compile [--markdown PATH] [--json] [--module NAME]... [--list]` compiles
  every spec (or those of the named modules), prints the table (or JSON), writes PATH
  (kernels/RESOURCES.md) and exits 1 if any check fails.

@triton.jit picks interpreter mode when its module is imported, so this must run in a process
without TRITON_INTERPRET=1; tests call it in a subprocess (tests/kernel_utils.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CCS = (80, 90)
# Largest shared memory one block may opt into (CUDA C Programming Guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_RESOURCE_LINE = re.compile(r"Function (\S+):\s*\n\s*(.*)")


class ResourceError(RuntimeError):
    """A kernel spills registers or needs more shared memory than the architecture has."""


@dataclasses.dataclass(frozen=True)
class Resources:
    module: str
    name: str
    label: str
    cc: int
    registers: int
    stack: int
    local: int  # bytes of local memory per thread: register spills
    shared_bytes: int  # static (cubin) + dynamic (launch) shared memory per block
    num_warps: int
    num_stages: int
    blocks: dict  # the BLOCK_* constexprs
    constexprs: str = ""  # every constexpr: NAME=value, True flags by name, False ones left out
    specialisation: str = "runtime"  # "runtime" (the JIT's attributes) or "none" (signature spec)
    used_by: str = ""


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _parse_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}} from cuobjdump's output."""
    usage = {}
    for name, fields in _RESOURCE_LINE.findall(text):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    return usage


def runtime_specialisation(fn, args: tuple, kwargs: dict, cc: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that `fn[grid](*args, **kwargs)` compiles with on
    sm_<cc>: the JIT's own binder (`create_function_from_signature`, as JITFunction.run builds
    it) and `_pack_args`, fed the real arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _constexpr_names(fn, constexprs: dict) -> dict:
    return {(fn.arg_names[k[0]] if isinstance(k, tuple) else k): v for k, v in constexprs.items()}


def units(module: str, specs: list[dict], cc: int) -> list[dict]:
    """Compile units for sm_<cc>: one per distinct (kernel, signature, constexprs, attributes,
    options); launches that compile alike are merged, their labels and users joined."""
    merged: dict[str, dict] = {}
    for spec in specs:
        if "launches" in spec:
            found = []
            for fn, args, kwargs in spec["launches"]():
                signature, constexprs, attrs, options = runtime_specialisation(fn, args, kwargs, cc)
                found.append(dict(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                                  options=options, specialisation="runtime"))
        else:
            found = [dict(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs={},
                          options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]),
                          specialisation="none")]
        for unit in found:
            key = repr((unit["fn"].__name__, sorted(unit["signature"].items()), sorted(map(repr, unit["constexprs"].items())),
                        sorted(map(repr, unit["attrs"].items())), sorted(map(repr, unit["options"].items()))))
            if key not in merged:
                merged[key] = dict(unit, module=module, cc=cc, labels=[], used_by=[])
            for field, value in (("labels", spec.get("label", "")), ("used_by", spec.get("used_by", ""))):
                if value and value not in merged[key][field]:
                    merged[key][field].append(value)
    return list(merged.values())


def compile_unit(unit: dict) -> Resources:
    """Compile one unit for its cc and read its resources from the cubin."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: kernels were decorated for the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget

    fn, cc = unit["fn"], unit["cc"]
    src = triton.compiler.ASTSource(fn=fn, signature=unit["signature"], constexprs=unit["constexprs"],
                                    attrs=unit["attrs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=unit["options"])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", str(cubin)],
                              check=True, capture_output=True, text=True).stdout
    name = compiled.metadata.name
    usage = _parse_usage(text).get(name)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource line for {name}:\n{text}")
    constexprs = _constexpr_names(fn, unit["constexprs"])
    return Resources(
        module=unit["module"], name=name, label="; ".join(unit["labels"]), cc=cc,
        registers=usage.get("REG", 0), stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
        shared_bytes=usage.get("SHARED", 0) + int(compiled.metadata.shared),
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        blocks={k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
        constexprs=" ".join(k if v is True else f"{k}={v}" for k, v in constexprs.items() if v is not False),
        specialisation=unit["specialisation"], used_by="; ".join(unit["used_by"]))


def compile_spec(spec: dict, cc: int, module: str = "") -> list[Resources]:
    """Resources of every distinct compile unit of one spec on sm_<cc>."""
    return [compile_unit(unit) for unit in units(module, [spec], cc)]


def check(res: Resources) -> None:
    """Raise ResourceError when `res` spills or exceeds the shared-memory limit of its cc."""
    where = f"{res.module}.{res.name} {res.label} sm_{res.cc} {res.blocks} warps={res.num_warps}"
    if res.local or res.stack:
        raise ResourceError(f"{where}: spills (LOCAL={res.local} B, STACK={res.stack} B per thread)")
    if res.shared_bytes > SHARED_LIMIT[res.cc]:
        raise ResourceError(f"{where}: {res.shared_bytes} B shared > {SHARED_LIMIT[res.cc]} B limit")


def discover() -> dict[str, list[dict]]:
    """{module name: GPU_COMPILE_SPECS} for every module of the kernels package that has specs."""
    from d2v import kernels
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "gpu_compile":
            continue
        module = importlib.import_module(f"d2v.kernels.{info.name}")
        specs = getattr(module, "GPU_COMPILE_SPECS", None)
        if specs:
            found[module.__name__] = list(specs)
    return found


def compile_all(modules: list[str] | None = None, ccs: tuple[int, ...] = CCS) -> list[Resources]:
    """Resources of every spec of `modules` (module names; default: all discovered) × ccs."""
    found = discover()
    if modules:
        missing = set(modules) - set(found)
        if missing:
            raise ValueError(f"no GPU_COMPILE_SPECS in {sorted(missing)}; modules with specs: {sorted(found)}")
        found = {m: found[m] for m in modules}
    todo = [unit for module, specs in found.items() for cc in ccs for unit in units(module, specs, cc)]
    return compile_units(todo)


_TODO: list[dict] = []  # the units a forked worker compiles, by index (a JITFunction does not pickle)


def _compile_index(i: int) -> Resources:
    return compile_unit(_TODO[i])


def compile_units(todo: list[dict], workers: int | None = None) -> list[Resources]:
    """compile_unit over `todo`, in order, on one process per core: LLVM and ptxas run on one
    thread each, and a full table is a few hundred units."""
    workers = min(len(todo), workers or len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [compile_unit(unit) for unit in todo]
    global _TODO
    _TODO = todo
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_compile_index, range(len(todo)), chunksize=1)
    finally:
        _TODO = []


def markdown(results: list[Resources]) -> str:
    lines = [
        "# Kernel resources on A100 (sm_80) and H100 (sm_90)",
        "",
        "Generated by `python -m d2v.kernels.gpu_compile --markdown kernels/RESOURCES.md` (no GPU needed:",
        "triton.compile for the target, then the bundled `cuobjdump --dump-resource-usage`).",
        "Rows with specialisation `runtime` are built with the runtime specialisation: the",
        "signature, constexprs and `tt.divisibility`/constant attributes Triton's JIT derives from",
        "the arguments the launchers pass for each preset's call (one row per distinct binary, its",
        "users listed); `none` rows are signature specs compiled without attributes.",
        "`tests/test_kernels_compile.py` recompiles and checks the live numbers: no spills",
        f"(LOCAL/STACK = 0) and shared memory within {SHARED_LIMIT[80] // 1024} KB (sm_80) / "
        f"{SHARED_LIMIT[90] // 1024} KB (sm_90) per block.",
        "",
        "| module | kernel | config | sm | regs | stack | local | shared B | warps | stages | constexprs | specialisation | used by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.module.split('.')[-1]} | {r.name} | {r.label} | {r.cc} | {r.registers} | {r.stack} "
                     f"| {r.local} | {r.shared_bytes} | {r.num_warps} | {r.num_stages} | {r.constexprs} "
                     f"| {r.specialisation} | {r.used_by} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", metavar="PATH", help="write the resource table here")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--module", action="append", help="only this module (repeatable), e.g. d2v.kernels.targets_triton")
    parser.add_argument("--list", action="store_true", help="print the modules that declare specs and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{m}: {len(s)} specs" for m, s in discover().items()))
        return 0
    results = compile_all(args.module)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
    else:
        print(markdown(results))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    failures = []
    for r in results:
        try:
            check(r)
        except ResourceError as err:
            failures.append(str(err))
    for msg in failures:
        print(f"FAIL {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
