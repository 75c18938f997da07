"""One 2-rank DeepSpeed launch (CPU, gloo) of several pretraining scenarios (tests/dist/)."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(script: str, out: str, *extra: str, timeout: int = 900) -> list[dict]:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    # In-process tests of this session may have set a world-size-1 rendezvous in os.environ.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), os.path.join(ROOT, script), "--out", out, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_pretrain"))
    return out, launch_two_ranks("tests/dist/pretrain_scenarios.py", out, "--steps", "100")


def test_two_ranks_ran_and_loss_falls(ranks):
    out, results = ranks
    for r, res in enumerate(results):
        full = res["full"]
        assert full["rank"] == r and full["world_size"] == 2
        losses = full["losses"]
        assert len(losses) == 100
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
        assert min(full["target_std"]) > 0.1


def test_logs_and_checkpoints_appear(ranks):
    out, _ = ranks
    lines = [json.loads(line) for line in open(os.path.join(out, "full", "metrics.jsonl"))]
    train = [row for row in lines if row["split"] == "train"]
    assert [row["step"] for row in train] == list(range(10, 101, 10))
    for key in ("loss", "target_std", "pred_std", "mask_rate", "ema_decay", "lr", "grad_norm", "model_norm",
                "ema_norm", "samples_per_s"):
        assert key in train[0], key
    assert glob.glob(os.path.join(out, "full", "tensorboard", "events.out.tfevents.*"))
    ckpt = os.path.join(out, "full", "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step_00000100"
    tag = os.path.join(ckpt, "step_00000100")
    for name in ("COMPLETE", "teacher.pt", "rank_00000.pt", "rank_00001.pt", "d2v_state.json"):
        assert os.path.exists(os.path.join(tag, name)), name
    assert json.load(open(os.path.join(out, "full", "config.json")))["name"] == "audio_tiny"


def test_ranks_read_different_data(ranks):
    _, results = ranks
    a, b = (set(res["full"]["keys"]) for res in results)
    assert a and b and not (a & b)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(ranks):
    _, results = ranks
    for res in results:
        assert res["first_half"]["losses"] == res["full"]["losses"][:50]
        assert res["second_half"]["start"] == 50
        assert res["second_half"]["losses"] == res["full"]["losses"][50:]
        assert res["first_half"]["keys"] + res["second_half"]["keys"] == res["full"]["keys"]
