"""A run knows what it is: its checkpoints record the model's structure, the data (patterns and a
digest of what prepare wrote), the batching and seed, the world size and ZeRO stage; a resume
compares them before any engine exists, applies and logs what keeps the position meaningful and
refuses the rest, naming what changed and how to branch."""
import json
import os
import sys

import pytest

from launch import ROOT, launcher_env

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from cluster_common import cluster_config, dump_state, max_state_diff  # noqa: E402


def _template(name="cpu.json"):
    from d2v.config import load_template

    return load_template(os.path.join(ROOT, "ds_configs", name))


def _cfg(out, data, *extra):
    from d2v.config import resolve

    return resolve("image_tiny", overrides=[f"train.out_dir={out}", f"data.train_shards={data}", "data.num_workers=0",
                                            "train.max_steps=2", "train.save_every=2", "train.threads=2",
                                            "train.log_every=1", *extra])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """image_tiny on the demo images, stopped 2 batches into its first epoch."""
    from d2v.data.demo_image import build_image_demo
    from d2v.train.launch import build_run

    base = tmp_path_factory.mktemp("identity")
    patterns = build_image_demo(str(base / "image"))["patterns"]
    out = str(base / "run")
    run = build_run(_cfg(out, patterns["train"]), _template(), console=False)
    run.train()
    run.close()
    return out, patterns


def test_the_checkpoint_records_what_the_run_is(image_run):
    out, patterns = image_run
    with open(os.path.join(out, "checkpoints", "step_00000002", "d2v_state.json")) as f:
        state = json.load(f)
    ident = state["identity"]
    assert ident["data"]["train_shards"] == patterns["train"] and len(ident["data"]["digest"]) == 16
    assert (ident["world_size"], ident["zero_stage"], ident["precision"]) == (1, 0, "bf16")
    assert state["batches_consumed"] == 2 and state["epoch"] == 0


@pytest.mark.parametrize("change,what", [
    ("other_data", "trained on other data"),
    ("train.micro_batch_size=16", "train.micro_batch_size 32 -> 16 changes the batches of epoch 0"),
    ("train.seed=7", "train.seed 1 -> 7 changes the batches"),
    ("model.depth=3", "the model is another one (model.depth 4 -> 3"),
    ("zero2", "written under ZeRO stage 0, this run is stage 2"),
])
def test_a_resume_that_would_continue_another_run_is_refused_before_any_engine(image_run, change, what,
                                                                              monkeypatch):
    import d2v.train.run as run_module
    from d2v.train.identity import RunMismatch
    from d2v.train.launch import build_run

    out, patterns = image_run
    data = patterns["valid"] if change == "other_data" else patterns["train"]
    extra = [change] if "=" in change else []
    monkeypatch.setattr(run_module, "Trainer", None)  # building an engine would fail here: refused first
    with pytest.raises(RunMismatch, match="belongs to another run") as err:
        build_run(_cfg(out, data, *extra), _template("zero2.json" if change == "zero2" else "cpu.json"),
                  resume="auto", console=False)
    assert what in str(err.value) and "--out" in str(err.value)


def test_a_change_that_keeps_the_position_is_applied_and_logged(image_run, tmp_path, capsys):
    import shutil

    from d2v.train.launch import build_run

    out, patterns = image_run
    branch = tmp_path / "branch"
    shutil.copytree(out, branch)
    # the same shards under another spelling, a new peak LR and a longer run
    moved = os.path.relpath(patterns["train"], os.getcwd())
    run = build_run(_cfg(str(branch), moved, "optim.lr=1e-4", "train.max_steps=3"), _template(), resume="auto")
    assert run.trainer.step == 2
    run.train()
    run.close()
    logged = capsys.readouterr().out
    assert "resume from step_00000002: optim.lr 0.001 -> 0.0001" in logged
    assert "train.max_steps 2 -> 3" in logged and "(the same shards and sidecars)" in logged


def test_zero_1_to_2_at_the_same_world_size_goes_through_the_universal_form(tmp_path):
    """Every weight and Adam moment comes back exactly under the other stage."""
    from d2v.train.launch import build_run

    out = str(tmp_path / "zero1")
    run = build_run(cluster_config(out, 3), _template("zero1.json"), console=False)
    run.train()
    saved = dump_state(run.trainer)
    run.close()
    run = build_run(cluster_config(out, 4), _template("zero2.json"), resume="auto", console=False)
    assert run.trainer.zero_stage == 2 and max_state_diff(dump_state(run.trainer), saved) == 0.0
    run.train()
    assert run.trainer.step == 4
    run.close()


# -- nothing non-finite is called good ------------------------------------------------------------

def test_an_update_that_breaks_the_weights_stops_the_run_without_a_checkpoint(tmp_path):
    """optim.lr=1e30 is a finite setting whose first update leaves NaN/inf weights: the next
    decision sees it on every rank, and nothing is saved as a "last good" state."""
    from d2v.config import resolve
    from d2v.train.launch import build_run
    from d2v.train.loop import NonFiniteError

    out = str(tmp_path / "run")
    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={out}", "train.max_steps=6", "train.micro_batch_size=2",
                                           "optim.lr=1e30", "optim.schedule=constant", "optim.warmup_steps=0"])
    run = build_run(cfg, _template(), console=False)
    with pytest.raises(NonFiniteError, match="step itself broke them.*nothing was saved.*none"):
        run.train()
    run.close()
    assert not os.path.isdir(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("part", ["optimizer", "teacher"])
def test_a_save_writes_only_a_finite_state(tmp_path, part):
    import torch

    from d2v.config import resolve
    from d2v.train.launch import build_run
    from d2v.train.loop import NonFiniteError

    out = str(tmp_path / "run")
    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={out}", "train.max_steps=2", "train.save_every=1",
                                           "train.micro_batch_size=2"])
    run = build_run(cfg, _template(), console=False)
    run.train(max_steps=1)
    with torch.no_grad():
        if part == "teacher":
            run.trainer.teacher.ema_parameters()[0].view(-1)[0] = float("nan")
        else:
            opt = run.trainer.engine.optimizer
            opt = getattr(opt, "optimizer", opt)
            next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="last good checkpoint is step_00000001"):
        run.save()
    run.close()
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000001"]


def _garble_payloads(pattern):
    """Every image of the shards overwritten in place with bytes no decoder reads (sizes kept)."""
    import tarfile

    import numpy as np

    from d2v.data.shards import expand_pattern

    for path in expand_pattern(pattern):
        stat = os.stat(path)
        with tarfile.open(path) as tar:
            spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith((".png", ".jpg"))]
        with open(path, "r+b") as f:
            for offset, size in spans:
                f.seek(offset)
                f.write(np.random.default_rng(offset).integers(0, 256, size, dtype=np.uint8).tobytes())
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_validation_with_no_readable_sample_is_an_error(image_run, tmp_path):
    from d2v.train.launch import build_run
    from d2v.train.loop import NoDataError

    _, patterns = image_run
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(os.path.dirname(patterns["valid"]), shards)
    valid = str(shards / os.path.basename(patterns["valid"]))
    _garble_payloads(valid)
    run = build_run(_cfg(str(tmp_path / "run"), patterns["train"], f"data.val_shards={valid}", "train.val_every=1",
                         "train.max_steps=1"), _template(), console=False)
    with pytest.raises(NoDataError, match=r"validation at step 1 found no readable sample .*corrupt_samples"):
        run.train()
    run.close()


# -- a run holds its directory ---------------------------------------------------------------------

def test_a_second_run_in_a_held_directory_is_refused_with_one_line(tmp_path):
    import subprocess

    from d2v.train.run_lock import RunLock

    out = tmp_path / "run"
    held = RunLock(str(out))
    held.acquire()  # a live run (this process) holds the directory
    try:
        proc = subprocess.run([sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/cpu.json",
                               "--preset", "audio_tiny", "--out", str(out), "train.max_steps=1"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=launcher_env())
    finally:
        held.release()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"pid {os.getpid()}" in proc.stderr and "is in use by another run" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_killed_runs_lock_is_taken_over_and_a_live_remote_one_is_not(tmp_path):
    import subprocess
    import time

    from d2v.train.run_lock import LOCK_NAME, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a run killed with -9 on this host: its pid is gone
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": 0}))
    mine = RunLock(str(tmp_path))
    assert "is gone" in mine.acquire()
    mine.release()
    assert not lock.exists()
    # another host's run: alive while its heartbeat is fresh, taken over once it is stale
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(FileExistsError, match="pid 1 on elsewhere"):
        RunLock(str(tmp_path), stale_after_s=60).acquire()
    old = time.time() - 600
    os.utime(lock, (old, old))
    other = RunLock(str(tmp_path), stale_after_s=60)
    assert "heartbeat stopped" in other.acquire()
    other.release()


def test_a_read_only_out_is_refused_before_any_engine(tmp_path, monkeypatch):
    import d2v.train.run as run_module
    import d2v.train.run_lock as run_lock
    from d2v.config import resolve
    from d2v.train.launch import build_run

    def read_only(path, *a, **k):  # what a read-only mount answers (root would write anyway)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(run_lock.os, "makedirs", read_only)
    monkeypatch.setattr(run_module, "Trainer", None)
    with pytest.raises(ValueError, match="cannot be written .Permission denied.: give the run a writable --out"):
        build_run(resolve("audio_tiny", overrides=[f"train.out_dir={tmp_path}/run"]), _template(), console=False)


def test_a_busy_master_port_is_one_line_with_the_flag_to_set(tmp_path):
    import socket
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run([sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/cpu.json",
                               "--preset", "audio_tiny", "--out", str(tmp_path / "run"), "train.max_steps=1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"MASTER_PORT {port}" in proc.stderr and "--master_port" in proc.stderr


# A launcher: starts one rank as deepspeed's does (LOCAL_RANK set), waits until it trains, then dies
# alone, as `kill PID` of the launcher or a container stop leaves it.
_LAUNCHER = """
import os, subprocess, sys, time
out, log = sys.argv[1], sys.argv[2]
rank = subprocess.Popen([sys.executable, "launchers/pretrain.py", "--ds_config", "ds_configs/cpu.json",
                         "--preset", "audio_tiny", "--out", out, "train.max_steps=100000", "train.save_every=100000",
                         "train.log_every=1", "train.micro_batch_size=2"],
                        env={**os.environ, "LOCAL_RANK": "0"}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
open(os.path.join(os.path.dirname(log), "rank.pid"), "w").write(str(rank.pid))
while not os.path.exists(os.path.join(out, "metrics.jsonl")):
    time.sleep(0.2)
os._exit(0)
"""


def test_the_launchers_death_is_a_preemption(tmp_path):
    import subprocess
    import time

    out, log = str(tmp_path / "run"), str(tmp_path / "rank.log")
    subprocess.run([sys.executable, "-c", _LAUNCHER, out, log], cwd=ROOT, timeout=300,
                   env=launcher_env())
    pid = int((tmp_path / "rank.pid").read_text())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(pid, 9)
        pytest.fail("the rank trained on after its launcher died")
    text = open(log).read()
    assert "exit 75" in text and "the launcher is gone" in text, text[-2000:]
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    assert os.path.exists(os.path.join(out, "checkpoints", latest, "COMPLETE"))


# -- one line per error, from every entry point --------------------------------------------------

ENTRY_POINTS = {
    "export": lambda t: ["-m", "d2v", "export", str(t / "empty"), str(t / "out")],
    "import-fairseq": lambda t: ["-m", "d2v", "import-fairseq", str(t / "missing.pt"), str(t / "out")],
    "describe": lambda t: ["-m", "d2v", "describe", "no_such_preset"],
    "probe": lambda t: ["-m", "d2v", "probe", str(t / "empty"), "--data", "x.tar", "--val-data", "y.tar"],
    "plan": lambda t: ["-m", "d2v", "plan", "audio_tiny", "--world-size", "2", "train.max_steps=1e999"],
    "prepare": lambda t: ["-m", "d2v.data.prepare", "image", str(t / "missing"), str(t / "out")],
    "pretrain": lambda t: ["-m", "d2v.launchers.pretrain", "--ds_config", "cpu.json", "--config",
                           str(t / "bad.yaml"), "--out", str(t / "run")],
    "finetune": lambda t: ["-m", "d2v.launchers.finetune", "--ds_config", "cpu.json", "--task", "image_cls",
                           "--init", str(t / "empty"), "--out", str(t / "ft")],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_says_bad_input_in_one_line(entry, tmp_path):
    import subprocess

    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("optim: !!python/object/apply:os.system ['touch pwned']\n")
    proc = subprocess.run([sys.executable, *ENTRY_POINTS[entry](tmp_path)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300, env=launcher_env(PYTHONPATH=ROOT))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    """The metrics file cannot grow: the launcher says where, in one line (exit 2), not a traceback."""
    import errno

    import d2v.train.metrics as metrics
    import d2v.train.preemption as preemption
    from d2v.launchers import pretrain

    for name in ("watch_launcher", "exit_on_signal_during_startup", "release_build_locks_at_startup_exit"):  # process-wide
        monkeypatch.setattr(preemption, name, lambda: None)
    class FullFile:
        name = str(tmp_path / "run" / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    real_init = metrics.MetricsSink.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        if getattr(self, "_jsonl", None) is not None:
            self._jsonl.close()
            self._jsonl = FullFile()

    monkeypatch.setattr(metrics.MetricsSink, "__init__", init)
    rc = pretrain.main(["--ds_config", "cpu.json", "--preset", "audio_tiny", "--out", str(tmp_path / "run"),
                        "train.max_steps=2", "train.log_every=1", "train.micro_batch_size=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: cannot append step 1's metrics to" in err and "No space left" in err, err
