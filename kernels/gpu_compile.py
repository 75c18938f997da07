"""Compile Triton kernels for A100 (sm_80) and H100 (sm_90) without a GPU and read their
resource usage from the cubin (docs/method.md §5, "Without a GPU").

API (shared by every kernel module):
* A kernel module declares `GPU_COMPILE_SPECS`: a list of dicts, one per production
  configuration, with keys `fn` (the @triton.jit function), `signature` ({arg: "*bf16" | "*fp32"
  | "*u8" | "i32" | "fp32" ...} for the non-constexpr arguments), `constexprs` ({name: value}),
  `num_warps`, `num_stages`, and optionally `label` (a short tag for the table).
* `discover()` imports every module of the `kernels` package and returns those that have specs;
  a new kernel module is picked up without editing this file.
* `compile_spec(spec, cc) -> Resources`: compiles for GPUTarget("cuda", cc, 32) and parses
  `cuobjdump --dump-resource-usage` (the binary the triton wheel bundles) for REG, STACK, LOCAL
  and SHARED; the compiled metadata on a driverless machine has no register or spill counts.
* `check(res)` raises ResourceError on spills (LOCAL or STACK > 0: local-memory traffic) or
  on shared memory (static + dynamic) above `SHARED_LIMIT[cc]`, the per-block opt-in maximum.
* `python -m kernels.gpu_compile [--markdown PATH] [--json] [--module NAME]... [--list]` compiles
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


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _parse_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}} from cuobjdump's output."""
    usage = {}
    for name, fields in _RESOURCE_LINE.findall(text):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    return usage


def compile_spec(spec: dict, cc: int, module: str = "") -> Resources:
    """Compile one GPU_COMPILE_SPECS entry for sm_<cc> and read its resources from the cubin."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: kernels were decorated for the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
    options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", str(cubin)],
                              check=True, capture_output=True, text=True).stdout
    name = compiled.metadata.name
    usage = _parse_usage(text).get(name)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource line for {name}:\n{text}")
    return Resources(
        module=module, name=name, label=spec.get("label", ""), cc=cc,
        registers=usage.get("REG", 0), stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
        shared_bytes=usage.get("SHARED", 0) + int(compiled.metadata.shared),
        num_warps=spec["num_warps"], num_stages=spec["num_stages"],
        blocks={k: v for k, v in spec["constexprs"].items() if k.startswith("BLOCK")})


def check(res: Resources) -> None:
    """Raise ResourceError when `res` spills or exceeds the shared-memory limit of its cc."""
    where = f"{res.module}.{res.name} {res.label} sm_{res.cc} {res.blocks} warps={res.num_warps}"
    if res.local or res.stack:
        raise ResourceError(f"{where}: spills (LOCAL={res.local} B, STACK={res.stack} B per thread)")
    if res.shared_bytes > SHARED_LIMIT[res.cc]:
        raise ResourceError(f"{where}: {res.shared_bytes} B shared > {SHARED_LIMIT[res.cc]} B limit")


def discover() -> dict[str, list[dict]]:
    """{module name: GPU_COMPILE_SPECS} for every module of the kernels package that has specs."""
    import kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "gpu_compile":
            continue
        module = importlib.import_module(f"kernels.{info.name}")
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
    return [compile_spec(spec, cc, module) for module, specs in found.items() for spec in specs for cc in ccs]


def markdown(results: list[Resources]) -> str:
    lines = [
        "# Kernel resources on A100 (sm_80) and H100 (sm_90)",
        "",
        "Generated by `python -m kernels.gpu_compile --markdown kernels/RESOURCES.md` (no GPU needed:",
        "triton.compile for the target, then the bundled `cuobjdump --dump-resource-usage`).",
        "`tests/test_kernels_compile.py` recompiles and checks the live numbers: no spills",
        f"(LOCAL/STACK = 0) and shared memory within {SHARED_LIMIT[80] // 1024} KB (sm_80) / "
        f"{SHARED_LIMIT[90] // 1024} KB (sm_90) per block.",
        "",
        "| module | kernel | config | sm | regs | stack | local | shared B | warps | stages | blocks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        blocks = " ".join(f"{k}={v}" for k, v in r.blocks.items())
        lines.append(f"| {r.module.split('.')[-1]} | {r.name} | {r.label} | {r.cc} | {r.registers} | {r.stack} "
                     f"| {r.local} | {r.shared_bytes} | {r.num_warps} | {r.num_stages} | {blocks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", metavar="PATH", help="write the resource table here")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--module", action="append", help="only this module (repeatable), e.g. kernels.targets_triton")
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
