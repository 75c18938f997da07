"""Cluster operations: resharded resume, export, fault-safe saves, NaN skips,
preemption and bad-input errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from cluster_common import ROOT, cluster_config, dump_state, max_state_diff, zero3_template  # noqa: E402
from launch import free_port as _port, launch_two_ranks  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def resharding(tmp_path_factory):
    """A 1-rank ZeRO-3 checkpoint, then one 2-rank launch that resumes it and writes its own."""
    from d2v.train.launch import build_run

    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("cluster")
    one = str(base / "one_rank")
    run = build_run(cluster_config(one, 6), zero3_template(), console=False)
    run.train()
    saved_on_one = dump_state(run.trainer)
    run.close()
    out = str(base / "launch")
    os.makedirs(out)
    launch_two_ranks("tests/dist/cluster_scenarios.py", out, "--from-one-rank", one)
    return base, saved_on_one, out


def test_one_to_two_ranks_restores_everything_exactly(resharding):
    _, saved_on_one, out = resharding
    resumed = torch.load(os.path.join(out, "resumed_on_two.pt"), weights_only=False)
    assert resumed["step"] == 6
    assert max_state_diff(resumed, saved_on_one) == 0.0


def test_two_to_one_rank_restores_everything_exactly(resharding):
    from d2v.train.launch import build_run

    _, _, out = resharding
    saved_on_two = torch.load(os.path.join(out, "saved_on_two.pt"), weights_only=False)
    t0 = time.perf_counter()
    run = build_run(cluster_config(os.path.join(out, "two_ranks"), 6), zero3_template(), resume="auto", console=False)
    print(f"\n2 -> 1 resume (conversion to the universal form included): {time.perf_counter() - t0:.1f} s")
    resumed = dump_state(run.trainer)
    assert resumed["step"] == 6
    assert max_state_diff(resumed, saved_on_two) == 0.0
    run.train(max_steps=8)  # and training goes on
    assert run.trainer.step == 8
    run.close()


def test_export_from_zero3_loads_into_one_process_with_identical_outputs(resharding, tmp_path):
    from d2v.data.synthetic import synthetic_batch
    from d2v.export import export_checkpoint, load_exported
    from d2v.models import build_model

    _, _, out = resharding
    saved = torch.load(os.path.join(out, "saved_on_two.pt"), weights_only=False)
    info = export_checkpoint(os.path.join(out, "two_ranks"), str(tmp_path / "export"), tag="step_00000006")
    assert info["step"] == 6 and info["world_size"] == 2
    student, teacher, cfg = load_exported(str(tmp_path / "export"))
    reference = build_model(cfg)
    reference.load_state_dict({k: v[0] for k, v in saved["student"].items()})
    batch = synthetic_batch(cfg, 2, seed=5, index=0)
    student.eval(), reference.eval()
    with torch.no_grad():
        a = student(batch.source, batch.mask, batch.source_lengths).prediction
        b = reference(batch.source, batch.mask, batch.source_lengths).prediction
    assert torch.equal(a, b)
    assert all(torch.equal(teacher[k], saved["teacher"][k]) for k in saved["teacher"])


def _cpu_run(out, *overrides, resume="none", stream_wrapper=None):
    from d2v.config import load_template, resolve
    from d2v.train.launch import build_run

    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={out}", "train.log_every=2", "train.save_every=0",
                                            *overrides])
    run = build_run(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), resume=resume, console=False)
    if stream_wrapper is not None:
        run.stream = stream_wrapper(run.stream)
    return run


class InjectedFault(RuntimeError):
    pass


def test_every_injected_save_fault_leaves_a_loadable_checkpoint(tmp_path):
    from d2v.train.checkpoint import SAVE_STAGES, tag_for

    run = _cpu_run(tmp_path / "faults")
    run.train(max_steps=2)
    previous = run.checkpointer.latest_tag()
    assert previous == tag_for(2)
    outcomes = {}
    for stage in SAVE_STAGES:
        run.trainer.train_step([run.stream.next_batch()])

        def fault(name, stage=stage):
            if name == stage:
                raise InjectedFault(stage)

        run.checkpointer.fault_hook = fault
        with pytest.raises(InjectedFault):
            run.save()
        run.checkpointer.fault_hook = None
        latest = run.checkpointer.latest_tag()
        # Before `latest` is replaced the previous checkpoint stays current; after, the new one.
        expected = tag_for(run.trainer.step) if stage == "prune" else previous
        assert latest == expected, stage
        state, side = run.checkpointer.load(run.trainer.engine, run.trainer.teacher, latest)
        assert state["step"] == int(latest.split("_")[1]) and side is not None
        run.trainer.step = state["step"]
        outcomes[stage] = latest
        previous = latest
    print("\nfault stage -> checkpoint loaded afterwards:", outcomes)
    run.save()  # a clean save after all the failed ones, leftovers removed
    names = os.listdir(run.checkpointer.root)
    assert not any(n.endswith(".partial") for n in names)
    run.close()


class PoisonedStream:
    """Turns the waveforms of chosen batches into NaN (a corrupt input that got through)."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.count = inner, bad, 0

    def next_batch(self):
        batch = self.inner.next_batch()
        if self.bad(self.count):
            batch.source[:] = float("nan")
        self.count += 1
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_injected_nan_is_skipped_on_every_rank_and_counted(tmp_path):
    run = _cpu_run(tmp_path / "nan", stream_wrapper=lambda s: PoisonedStream(s, lambda i: i == 2))
    run.train(max_steps=2)
    before = [p.detach().clone() for p in run.trainer.student.parameters()]
    teacher_before = [p.clone() for p in run.trainer.teacher.ema_parameters()]
    m = run.trainer.train_step([run.stream.next_batch()])  # batch 2: NaN
    assert m.values["skipped"] == 1.0 and run.trainer.skipped_steps == 1 and run.trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, run.trainer.student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, run.trainer.teacher.ema_parameters()))
    summary = run.train(max_steps=5)
    assert summary.steps == 5 and summary.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in run.trainer.student.parameters())
    run.close()
    rows = [json.loads(line) for line in open(tmp_path / "nan" / "metrics.jsonl")]
    assert rows[-1]["skipped_steps"] == 1.0


def test_too_many_nans_in_a_row_stop_with_a_usable_checkpoint(tmp_path):
    from d2v.train.loop import NonFiniteError

    run = _cpu_run(tmp_path / "nans", "train.max_consecutive_skips=3",
                   stream_wrapper=lambda s: PoisonedStream(s, lambda i: i >= 3))
    with pytest.raises(NonFiniteError, match="step_00000003"):
        run.train(max_steps=10)
    run.close()
    resumed = _cpu_run(tmp_path / "nans", resume="auto")
    assert resumed.trainer.step == 3
    assert all(torch.isfinite(p).all() for p in resumed.trainer.student.parameters())
    resumed.close()


def test_bad_input_is_refused_before_any_work(tmp_path):
    from d2v.config import DeepSpeedConfigError, resolve
    from d2v.train.ds_checks import check_pinned_memory
    from d2v.train.launch import build_run

    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="overlap_comm"):
        build_run(cfg, {"zero_optimization": {"stage": 2, "overlap_com": True}})
    cfg.train.global_batch_size = 7
    with pytest.raises(DeepSpeedConfigError, match="global_batch_size"):
        build_run(cfg, {"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="ulimit -l"):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, hard))
        try:
            check_pinned_memory({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}}},
                                cuda=True)
        finally:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    # A resume directory written by another preset.
    run = _cpu_run(tmp_path / "audio")
    run.train(max_steps=1)
    run.close()
    other = resolve("image_tiny", overrides=[f"train.out_dir={tmp_path / 'audio'}"])
    with pytest.raises(ValueError, match="preset 'audio_tiny'"):
        build_run(other, {"zero_optimization": {"stage": 0}}, resume="auto")


def _launch_pretrain(out, *overrides, resume="none"):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), os.path.join(ROOT, "launchers", "pretrain.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--preset", "audio_tiny", "--out", str(out),
           "--resume", resume, "train.log_every=1", *overrides]
    # A session of its own: the signal goes to the launcher and both ranks, as a scheduler sends it.
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _logged_steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"split": "train"' in line]


def test_sigterm_to_a_two_rank_run_checkpoints_and_resume_continues(tmp_path):
    from d2v.train.preemption import EXIT_PREEMPTED

    out = tmp_path / "preempted"
    proc = _launch_pretrain(out, "train.max_steps=100000", "train.save_every=0")
    deadline = time.time() + 240
    while time.time() < deadline and len(_logged_steps(out)) < 5:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.5)
    t_signal = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)  # EOF once every process of the job closed its stdout
    while True:  # and wait until the ranks themselves are gone
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        except ProcessLookupError:
            break
    t_exit = time.time() - t_signal
    # The deepspeed runner itself dies of the SIGTERM (under srun the ranks' own code, 75, is the
    # task's exit code); rank 0 reports the preemption exit it takes.
    assert proc.returncode in (EXIT_PREEMPTED, -signal.SIGTERM), output[-4000:]
    assert f"exit {EXIT_PREEMPTED} (resume with --resume auto)" in output, output[-4000:]
    latest = open(out / "checkpoints" / "latest").read().strip()
    step = int(latest.split("_")[1])
    assert step >= 5 and os.path.exists(out / "checkpoints" / latest / "COMPLETE")
    assert f"preempted at step {step}" in output
    print(f"\nSIGTERM -> checkpoint {latest} and exit {proc.returncode} in {t_exit:.1f} s")

    resumed = _launch_pretrain(out, f"train.max_steps={step + 3}", "train.save_every=0", resume="auto")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-4000:]
    steps = _logged_steps(out)
    assert steps[-3:] == [step + 1, step + 2, step + 3]


def test_slurm_and_openmpi_environments_map_to_ranks(monkeypatch):
    from d2v.train.distributed import map_launcher_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-001")
    monkeypatch.setenv("MASTER_PORT", "23456")
    map_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        map_launcher_env()
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4"


@pytest.mark.parametrize("name", ["../other/checkpoints/step_00000006", "/abs/step_00000006",
                                  "step_00000006/../step_00000003", "step_00000006.partial", ".."])
def test_a_tag_is_a_plain_name_inside_the_runs_checkpoints(tmp_path, name):
    """`latest`, --resume and export --tag name a folder of this run's checkpoints/, nothing else."""
    from d2v.export import resolve_tag_dir
    from d2v.train.checkpoint import Checkpointer
    from d2v.train.loop import plan_resume

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00000006").mkdir(parents=True)
    (ckpt / "step_00000006" / "COMPLETE").write_text("")
    (ckpt / "latest").write_text(name)
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        Checkpointer(str(ckpt), rank=0, world_size=1).latest_tag()
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        resolve_tag_dir(str(tmp_path))
    with pytest.raises(ValueError, match="--tag"):
        resolve_tag_dir(str(tmp_path), name)
    (ckpt / "latest").write_text("step_00000006")
    with pytest.raises(ValueError, match="--resume"):
        plan_resume(Checkpointer(str(ckpt), rank=0, world_size=1), name, "audio_tiny", str(tmp_path), 1)
