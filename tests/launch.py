"""Shared helpers of the tests that start processes: the repository root, a free rendezvous port,
and a 2-rank DeepSpeed launch on CPU (gloo) that returns each rank's JSON report."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment for a launched run, without the rank variables that in-process
    runs of this session set (their MASTER_PORT is held by this process)."""
    return {**{k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}, "DS_ACCELERATOR": "cpu", **extra}


def launch_two_ranks(script: str, out: str, *extra: str, timeout: int = 900) -> list[dict]:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    # In-process tests of this session may have set a world-size-1 rendezvous in os.environ.
    env = launcher_env(PYTHONPATH=ROOT)
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(ROOT, script), "--out", out,
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
