"""Collectives: one module issues them all, on the process group's device (unit layer, no launch).

On a CPU the process group is gloo and every tensor is a host tensor, so a collective handed a
CPU tensor works here and fails under NCCL. These tests make that failure class visible on a
CPU: nothing outside `d2v/collectives.py` calls a collective, the module's device choice follows
the backend, and with the group's device forced to a non-host device every collective receives
tensors on that device only.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from d2v import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVE_NAMES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "barrier", "monitored_barrier",
    "send", "recv", "isend", "irecv", "inference_all_reduce", "all_reduce_coalesced"}
DIST_MODULES = {"deepspeed.comm", "torch.distributed"}


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names a file binds to deepspeed.comm / torch.distributed (import ... as dist, from ... import)."""
    names = {"dist"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("deepspeed", "torch") and any(a.name in ("comm", "distributed") for a in node.names):
                names.update(a.asname or a.name for a in node.names if a.name in ("comm", "distributed"))
            if node.module in DIST_MODULES:
                for a in node.names:
                    if a.name in COLLECTIVE_NAMES:
                        names.add("<direct>")
    return names


def collective_calls(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    aliases = _dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVE_NAMES:
            base = ast.unparse(node.func.value)
            if base in aliases or base in ("torch.distributed", "deepspeed.comm"):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    if "<direct>" in aliases:
        found.append(f"{os.path.relpath(path, ROOT)}: imports a collective from torch.distributed/deepspeed.comm")
    return found


def library_files() -> list[str]:
    out = []
    for top in ("d2v", "launchers", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


def test_no_collective_outside_the_collectives_module():
    offenders = []
    for path in library_files():
        if path.endswith(os.path.join("d2v", "collectives.py")):
            continue
        offenders += collective_calls(path)
    assert not offenders, "collectives must go through d2v/collectives.py:\n" + "\n".join(offenders)


def test_the_scan_finds_a_raw_collective(tmp_path):
    """The scan itself can fail: a hand-written all-reduce in the old style is found."""
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        import torch
        def f(world_size):
            import deepspeed.comm as dist
            t = torch.tensor([1.0])
            dist.all_reduce(t)
            torch.distributed.barrier()
    """))
    assert len(collective_calls(str(bad))) == 2


@pytest.mark.parametrize("name, expect", [
    ("nccl", "cuda"), ("gloo", "cpu"), ("mpi", "cpu"), ("none", "cpu"), ("cuda:gloo", "cuda"),
    ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl", "cuda"), ("cpu:gloo", "cpu")])
def test_the_group_device_follows_the_backend(monkeypatch, name, expect):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    device = collectives.device_for_backend(name)
    assert device.type == expect
    if expect == "cuda":
        assert device.index == 3  # the device this rank bound, not cuda:0


class _Stop(Exception):
    pass


class _RecordingDist:
    """Stands in for deepspeed.comm: records the device of every tensor a collective receives."""

    class ReduceOp:
        SUM, MAX, MIN = "sum", "max", "min"

    def __init__(self):
        self.devices = []

    def _record(self, *tensors):
        self.devices += [t.device.type for t in tensors]
        raise _Stop

    def all_reduce(self, t, op=None):
        self._record(t)

    def all_gather_into_tensor(self, out, local):
        self._record(out, local)

    def barrier(self):
        raise _Stop


@pytest.fixture
def foreign_group(monkeypatch):
    """A 2-rank group whose device is not the host ("meta" stands in for a GPU here)."""
    fake = _RecordingDist()
    monkeypatch.setattr(collectives, "_dist", lambda: fake)
    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(collectives, "group_device", lambda: torch.device("meta"))
    return fake


@pytest.mark.parametrize("call", [
    lambda: collectives.all_reduce_values([1.0, 2.0]),
    lambda: collectives.all_reduce_mean({"a": 1.0}),
    lambda: collectives.any_rank(True),
    lambda: collectives.all_reduce_(torch.ones(3)),
    lambda: collectives.all_gather_into_(torch.zeros(4), torch.ones(2)),
    lambda: collectives.count_normalizer()(7),
    lambda: collectives.agree_and_read(collectives.to_group_device([0.0, 1.0], torch.float32), torch.ones(2)),
], ids=["values", "mean", "any_rank", "tensor", "gather", "normalizer", "decision"])
def test_every_collective_gets_tensors_on_the_group_device(foreign_group, call):
    with pytest.raises(_Stop):
        call()
    assert foreign_group.devices and set(foreign_group.devices) == {"meta"}, foreign_group.devices


def test_a_single_process_needs_no_group():
    assert collectives.world_size() == 1 or collectives.is_initialized()
    assert collectives.all_reduce_values([1.5, 2.0]) == [1.5, 2.0]
    assert collectives.any_rank(False) is False
    assert collectives.count_normalizer()(0) == 1.0  # never a division by zero
    flags, local = collectives.agree_and_read(torch.tensor([0.0, 1.0]), torch.tensor([2.5, 3.0]))
    assert flags == [0.0, 1.0] and local == [2.5, 3.0]


def test_a_cuda_only_group_refuses_host_tensors_as_nccl_does(tmp_path):
    """`cuda:gloo` on this CPU build has NCCL's device map: the old code's host tensor fails in
    it, and d2v's device choice for that group is the CUDA device."""
    script = textwrap.dedent(f"""
        import torch, torch.distributed as td
        from d2v import collectives
        td.init_process_group("cuda:gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        try:
            td.all_reduce(torch.tensor([1.0]))
            print("accepted")
        except RuntimeError as e:
            print("refused:", "cpu" in str(e).lower())
        torch.cuda.current_device = lambda: 0
        print("device:", collectives.group_device().type)
        td.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert "refused: True" in out.stdout, out.stdout + out.stderr
    assert "device: cuda" in out.stdout, out.stdout + out.stderr
