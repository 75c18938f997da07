"""The import graph of d2v, read from the source (every import, also those inside
functions): no cycles, and dependencies point one way,

    d2v.kernels <- config/batch/shapes/safe_load <- masking, losses, data <- models, flops
            <- teacher <- task, interop <- train

with the applications (finetune, export, probes, memory estimates, the CLI) on top. Models never
import data, masking or DeepSpeed; data never imports models, the teacher, tasks or training."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Longest prefix wins; modules under no prefix are applications (may import any layer below them).
LAYERS = {
    "d2v.kernels": 0,
    "d2v.config": 1, "d2v.batch": 1, "d2v.shapes": 1, "d2v.safe_load": 1, "d2v.collectives": 1,
    "d2v.masking": 2, "d2v.losses": 2, "d2v.data": 2,
    "d2v.models": 3, "d2v.estimate.flops": 3,
    "d2v.teacher": 4,
    "d2v.task": 5, "d2v.interop": 5,
    "d2v.train": 6,
}
APPLICATION = 7
FORBIDDEN = {
    "d2v.models": ("d2v.data", "d2v.masking", "deepspeed"),
    "d2v.data": ("d2v.models", "d2v.teacher", "d2v.task", "d2v.train"),
}


def _modules() -> dict[str, str]:
    mods = {}
    for base in ("d2v",):
        for folder, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imported(path: str, name: str, mods: dict[str, str]) -> set[str]:
    """Module names imported by one file, external ones by their top-level package."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()

    def known(m: str) -> str | None:
        while m and m not in mods:
            m = m.rpartition(".")[0]
        return m or None

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(known(alias.name) or alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            if submodules:  # `from pkg import submodule`
                found.update(submodules)
            else:
                found.add(known(base) or base.partition(".")[0])
    found.discard(name)
    return found


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best is not None else APPLICATION


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported(path, name, mods) for name, path in mods.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle.
    internal = {n: {m for m in deps if m in graph and not _under(n, m)} for n, deps in graph.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(internal[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(internal):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dependencies_point_down_the_layers():
    graph = _graph()
    upward = sorted(f"{n} ({_layer(n)}) imports {m} ({_layer(m)})" for n, deps in graph.items() for m in deps
                    if m in graph and _layer(m) > _layer(n) and not _under(n, m))
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package):
    graph = _graph()
    bad = sorted(f"{n} imports {m}" for n, deps in graph.items() if _under(n, package)
                 for m in deps for f in FORBIDDEN[package] if _under(m, f))
    assert not bad, "\n".join(bad)


def test_kernels_import_only_torch_and_triton():
    """d2v.kernels stays a base any project could vendor: torch, triton, the optional xformers
    attention candidate and the standard library; nothing else of d2v (the layers) or of PyPI."""
    import sys

    graph = _graph()
    external = sorted({m for n, deps in graph.items() if _under(n, "d2v.kernels") for m in deps
                       if m not in graph and m not in sys.stdlib_module_names and m != "__future__"})
    assert external == ["torch", "triton", "xformers"], external


def test_the_graph_reader_sees_imports_inside_functions():
    graph = _graph()
    # d2v.export imports the trainer's checkpoint engine inside a function.
    assert "d2v.train.safe_checkpoint_engine" in graph["d2v.export"]
    assert "deepspeed" in graph["d2v.collectives"]


def _modality_branches(path: str, names: set[str]) -> list[str]:
    """`x == "audio"`, `x in ("image", "text")`, ... in one file: a comparison against a modality's name."""
    def names_modality(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_modality(e) for e in node.elts)
        return False

    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Compare) and any(names_modality(n) for n in [node.left, *node.comparators]):
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
        elif isinstance(node, ast.MatchValue) and names_modality(node.value):
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return found


def test_no_modality_branch_outside_the_specs():
    """What differs between modalities is a field of a per-modality table (the config spec in
    d2v/config/modalities.py, the data pipelines, the interop layouts...), never an if-chain on
    the modality's name: a new modality adds table entries, not branches."""
    from d2v.config.modalities import SPECS

    branches = [hit for path in _modules().values() for hit in _modality_branches(path, set(SPECS))]
    assert not branches, "modality if-chains (make them a field of the modality's table entry):\n" + "\n".join(branches)


def test_the_branch_reader_sees_comparisons_and_membership(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('if cfg.modality == "audio":\n    pass\nok = kind in ("image", "video")\nx = {"text": 1}["text"]\n')
    assert _modality_branches(str(f), {"audio", "image", "text"}) == [f"{os.path.relpath(str(f), ROOT)}:1",
                                                                       f"{os.path.relpath(str(f), ROOT)}:3"]


def test_only_the_config_layer_reads_the_version_switch():
    """Code outside d2v/config asks what the switch decides (model.drops_masked, model.clones, the
    mask kind's `clones`), never `model.v2.enabled` itself."""
    reads = []
    for name, path in _modules().items():
        if _under(name, "d2v.config"):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if (isinstance(node, ast.Attribute) and node.attr == "enabled" and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "v2"):
                reads.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not reads, "model.v2.enabled read outside d2v/config:\n" + "\n".join(reads)


def _optimizer_steps(path: str) -> list[str]:
    """Where a file builds a guarded update or steps a DeepSpeed engine (`<...>.engine.step()`,
    `engine.step()`)."""
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        engine_step = (isinstance(f, ast.Attribute) and f.attr == "step" and
                       ((isinstance(f.value, ast.Attribute) and f.value.attr == "engine") or
                        (isinstance(f.value, ast.Name) and f.value.id == "engine")))
        guarded = isinstance(f, ast.Name) and f.id == "GuardedUpdate"
        if engine_step or guarded:
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return found


def test_one_trainer_steps_every_job():
    """Pretraining and every downstream task are units of one trainer (d2v.train.stepper): no
    other module builds a guarded update or steps the engine, so every job gets the same skip,
    stop and accumulation rules."""
    owners = {"d2v.train.stepper", "d2v.train.guarded_update"}
    steps = [hit for name, path in _modules().items() if name not in owners for hit in _optimizer_steps(path)]
    assert not steps, "optimizer steps outside the one trainer:\n" + "\n".join(steps)
    assert _optimizer_steps(_modules()["d2v.train.stepper"])  # the reader sees the trainer's own step
