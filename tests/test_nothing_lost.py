"""Nothing lost, nobody in: a run never replaces results silently, fails before it trains on what
it can know at start (patterns, undersized validation sets, shards that changed since prepare),
stops with an error when no real data is left, counts every sample it loses, reports a full
disk as one, and leaves with exit 75 when signalled while it is still starting."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from launch import ROOT, launcher_env


def _template():
    from d2v.config import load_template

    return load_template(os.path.join(ROOT, "ds_configs", "cpu.json"))


def _cfg(preset, out_dir, *extra):
    from d2v.config import resolve

    return resolve(preset, overrides=[f"train.out_dir={out_dir}", "train.log_every=2", "train.threads=2", *extra])


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


# -- results are never replaced -----------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step synthetic audio_tiny run with checkpoints at steps 2 and 4."""
    from d2v.train.launch import build_run

    out = str(tmp_path_factory.mktemp("four"))
    run = build_run(_cfg("audio_tiny", out, "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2"),
                    _template(), console=False)
    run.train()
    run.close()
    return out


def test_resuming_an_older_tag_is_refused_and_the_branch_it_suggests_works(four_steps, tmp_path):
    from d2v.train.launch import build_run

    ckpt = os.path.join(four_steps, "checkpoints")
    before = {n: _md5(os.path.join(ckpt, "step_00000004", n)) for n in os.listdir(os.path.join(ckpt, "step_00000004"))}
    cfg = _cfg("audio_tiny", four_steps, "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2",
               "optim.lr=1e-4")
    with pytest.raises(FileExistsError, match="older than step_00000004") as err:
        build_run(cfg, _template(), resume="step_00000002", console=False)
    assert "NEW/checkpoints" in str(err.value) and "--resume step_00000002" in str(err.value)
    with pytest.raises(FileExistsError, match="--resume auto"):
        build_run(cfg, _template(), resume="none", console=False)  # a fresh run over finished results
    # The branch the message describes: the old tag copied into a new run directory.
    branch = tmp_path / "branch"
    os.makedirs(branch / "checkpoints")
    shutil.copytree(os.path.join(ckpt, "step_00000002"), branch / "checkpoints" / "step_00000002")
    run = build_run(_cfg("audio_tiny", str(branch), "train.max_steps=4", "train.save_every=2",
                         "train.micro_batch_size=2", "optim.lr=1e-4"), _template(), resume="step_00000002",
                    console=False)
    summary = run.train()
    run.close()
    assert summary.steps == 4 and open(branch / "checkpoints" / "latest").read().strip() == "step_00000004"
    assert {n: _md5(os.path.join(ckpt, "step_00000004", n)) for n in before} == before  # the original is untouched
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step_00000004"


def test_a_full_disk_is_reported_as_a_full_disk(four_steps, tmp_path, monkeypatch):
    import d2v.train.checkpoint as checkpoint
    from d2v.train.launch import build_run

    run = build_run(_cfg("audio_tiny", four_steps, "train.max_steps=6", "train.micro_batch_size=2"), _template(),
                    resume="auto", console=False)

    def no_space(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says on a full disk

    monkeypatch.setattr(checkpoint, "atomic_torch_save", no_space)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(OSError, match="no space left on the device") as err:
        run.train(max_steps=5)  # the run's final save hits the full disk
    assert "latest still names step_00000004" in str(err.value)
    monkeypatch.undo()
    run.close()
    assert open(os.path.join(four_steps, "checkpoints", "latest")).read().strip() == "step_00000004"
    # Any other write error is not dressed up as a full disk.
    assert not checkpoint.disk_full(RuntimeError("iostream error"), str(tmp_path))


# -- fail before work starts ----------------------------------------------------------------------

def _image_tree(root, per_class=12):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


@pytest.fixture
def image_shards(tmp_path):
    from d2v.data.prepare_image import prepare_image

    _image_tree(tmp_path / "tree")
    report = prepare_image(str(tmp_path / "tree"), str(tmp_path / "shards"), samples_per_shard=4, val_fraction=0.25)
    return tmp_path / "shards", report["patterns"]


def _image_cfg(out_dir, patterns, *extra):
    return _cfg("image_tiny", str(out_dir), f"data.train_shards={patterns['train']}",
                f"data.val_shards={patterns.get('valid') or ''}", "train.micro_batch_size=4", *extra)


def test_patterns_and_undersized_validation_sets_fail_before_any_engine(image_shards, tmp_path, monkeypatch):
    from d2v.train import launch

    shards, patterns = image_shards
    built = []
    monkeypatch.setattr(launch, "Run", lambda *a, **k: built.append(1))
    with pytest.raises(FileNotFoundError, match="matches no existing shard"):
        launch.build_run(_image_cfg(tmp_path / "r1", {**patterns, "valid": str(shards / "nothing-{0..3}.tar")}),
                         _template())
    assert not built
    monkeypatch.undo()
    from d2v.config import resolve
    from d2v.train.shard_streams import shard_stream_factories

    # 6 validation images make one batch of 4: enough for one rank, not for two.
    cfg = _image_cfg(tmp_path / "r2", patterns)
    _, make_val = shard_stream_factories(cfg)
    assert len(list(make_val(0, 1))) == 1 and make_val(0, 1).left_out == 2  # the last 2 fill no batch
    with pytest.raises(ValueError, match="fewer than one per rank for 2 ranks"):
        make_val(1, 2)
    # And the run builds its validation loader at start, so it fails there, not at step val_every.
    cfg = resolve("image_tiny", overrides=[f"train.out_dir={tmp_path / 'r3'}", f"data.train_shards={patterns['train']}",
                                           f"data.val_shards={patterns['valid']}", "train.micro_batch_size=8",
                                           "train.val_every=50", "train.max_steps=100"])
    with pytest.raises(ValueError, match="fewer than one per rank"):
        launch.build_run(cfg, _template(), console=False)
    assert not os.path.exists(tmp_path / "r3" / "metrics.jsonl")


@pytest.mark.parametrize("damage", ["truncated", "emptied", "replaced"])
def test_a_shard_that_changed_since_prepare_fails_before_training(image_shards, damage):
    from d2v.data.shards import expand_pattern, load_index

    shards, patterns = image_shards
    paths = expand_pattern(patterns["train"])
    victim = paths[1]
    data = open(victim, "rb").read()
    new = {"truncated": data[: len(data) // 4], "emptied": b"", "replaced": open(paths[0], "rb").read() + b"\0" * 512}
    with open(victim, "wb") as f:
        f.write(new[damage])
    with pytest.raises(ValueError, match=f"shard {victim} is {len(new[damage])} bytes but .*lengths.json records "
                                         f"{len(data)}"):
        load_index(paths)


def _drop_sizes(shards):
    """A sidecar without byte sizes (written by another tool): damage is found while reading."""
    path = shards / "lengths.json"
    table = json.load(open(path))
    table.pop("sizes")
    json.dump(table, open(path, "w"))


def test_a_damaged_shard_found_while_reading_counts_every_sample_lost(image_shards):
    from d2v.data.loader import TrainLoader
    from d2v.data.plan import BatchingOptions
    from d2v.data.shards import expand_pattern, load_index
    from d2v.train.shard_streams import PIPELINES

    shards, patterns = image_shards
    _drop_sizes(shards)
    paths = expand_pattern(patterns["train"])
    data = open(paths[2], "rb").read()
    with open(paths[2], "wb") as f:
        f.write(data[: len(data) // 2])
    cfg = _image_cfg(shards, patterns)
    index = load_index(paths)
    options = BatchingOptions.fixed(4, 64)
    loader = TrainLoader(index, options, PIPELINES["image"].maker(cfg, True), seed=3)
    delivered = sum(batch.batch_size for batch in loader)  # one epoch
    plan = loader.plan(0)
    planned = sum(len(b.items) for b in plan.stream(0, 0))
    assert loader.bad_shards == {2} and loader.stats["missing"] > 0
    assert delivered + loader.stats["missing"] + loader.stats.get("corrupt", 0) == planned
    # Counted once per shard, however many epochs meet it.
    list(loader)
    assert len(loader.bad_shards) == 1


def test_a_run_on_only_unreadable_data_stops_with_an_error(image_shards, tmp_path):
    from d2v.train.launch import build_run
    from d2v.train.loop import NoDataError

    shards, patterns = image_shards
    _drop_sizes(shards)
    from d2v.data.shards import expand_pattern

    for path in expand_pattern(patterns["train"]):
        open(path, "wb").close()
    run = build_run(_image_cfg(tmp_path / "run", {"train": patterns["train"]}, "train.max_steps=20",
                               "train.max_consecutive_skips=3"), _template(), console=False)
    weights = [p.detach().clone() for p in run.trainer.student.parameters()]
    with pytest.raises(NoDataError, match="3 updates in a row .* no readable sample"):
        run.train()
    run.close()
    assert run.trainer.step == 0  # nothing was applied: fillers only
    assert all(torch.equal(a, b) for a, b in zip(weights, run.trainer.student.parameters()))
    assert run.stream.counters()["bad_shards"] == len(expand_pattern(patterns["train"]))


# -- resume is exact inside an epoch ----------------------------------------------------------------

def _text_shards(root):
    from d2v.data.prepare_text import prepare_text

    words = "the quick brown fox jumps over the lazy dog while python parses every source file".split()
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(120)))
    meta = prepare_text(str(root / "corpus.txt"), str(root / "text"), vocab_size=60, block_size=32,
                        samples_per_shard=40, val_fraction=0.1)
    return meta["patterns"], [f"model.text.vocab_size={meta['vocab_size']}"]


def _audio_shards(root):
    import soundfile

    from d2v.data.prepare_audio import prepare_audio

    rng = np.random.default_rng(0)
    for spk in ("1", "2"):
        d = root / "wav" / spk / "1"
        d.mkdir(parents=True)
        for i in range(12):
            t = np.arange(int(16_000 * rng.uniform(0.6, 1.2))) / 16_000
            wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
            soundfile.write(str(d / f"{spk}-1-{i:02d}.flac"), wav.astype(np.float32), 16_000)
    report = prepare_audio(str(root / "wav"), str(root / "audio"), samples_per_shard=6, val_speakers=["2"])
    patterns = {"train": report["totals"]["train"]["pattern"], "valid": report["totals"]["val"]["pattern"]}
    return patterns, ["data.min_sample_size=4000", "data.max_sample_size=16000", "data.max_samples_per_batch=40000"]


@pytest.mark.parametrize("preset", ["audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"])
def test_resume_inside_an_epoch_repeats_the_uninterrupted_run_for_2_0(preset, tmp_path, image_shards):
    """data2vec 2.0 with dropout and LayerDrop on, stopped after a save and a validation, inside
    an epoch: the resumed run's losses are the uninterrupted run's, bit for bit."""
    from d2v.train.launch import build_run

    if preset.startswith("image"):
        patterns, extra = image_shards[1], ["train.micro_batch_size=4"]
    elif preset.startswith("text"):
        patterns, extra = _text_shards(tmp_path)
        extra.append("train.micro_batch_size=4")
    else:
        patterns, extra = _audio_shards(tmp_path)
    common = [f"data.train_shards={patterns['train']}", f"data.val_shards={patterns['valid']}",
              "train.max_steps=9", "train.save_every=3", "train.val_every=3", "model.dropout=0.1",
              "model.layerdrop=0.3", "train.precision=fp32", *extra]

    def run(name, stop=None, resume="none"):
        r = build_run(_cfg(preset, str(tmp_path / name), *common), _template(), resume=resume, console=False)
        summary = r.train(max_steps=stop)
        r.close()
        return [h["loss"] for h in summary.history], r.stream.loader.steps_per_epoch

    full, per_epoch = run("full")
    stop = per_epoch + 1 if per_epoch < 7 else 4  # past a save and a validation, inside the second epoch
    first, _ = run("resumed", stop=stop)
    second, _ = run("resumed", resume="auto")
    assert stop % per_epoch != 0 and len(full) == 9
    assert first == full[:stop] and second == full[stop:]


def test_shards_from_another_tokenizer_fail_before_any_engine(tmp_path, monkeypatch):
    from d2v.train import launch

    patterns, _ = _text_shards(tmp_path)
    monkeypatch.setattr(launch, "Run", lambda *a, **k: pytest.fail("a run was built"))
    cfg = _cfg("text_tiny", str(tmp_path / "run"), f"data.train_shards={patterns['train']}")  # the preset's vocabulary
    with pytest.raises(ValueError, match="tokenizer/vocabulary mismatch.*model.text.vocab_size="):
        launch.build_run(cfg, _template())


# -- preemption while starting ---------------------------------------------------------------------

def test_a_signal_during_start_up_exits_75(tmp_path):
    env = launcher_env(PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--ds_config",
                             os.path.join(ROOT, "ds_configs", "cpu.json"), "--preset", "audio_tiny",
                             "--out", str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # inside the imports and the engine build (several seconds on a CPU)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "SIGTERM during start-up" in err


_HOLDS_A_BUILD_LOCK = """
import os, signal, sys
from d2v.train.preemption import exit_on_signal_during_startup, release_build_locks_at_startup_exit
exit_on_signal_during_startup()
release_build_locks_at_startup_exit()
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()  # as torch's JIT build of a DeepSpeed op holds it
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_signal_during_start_up_leaves_no_extension_build_lock(tmp_path):
    """A start-up exit inside DeepSpeed's JIT op load (it runs ninja under a lock file at every CPU
    start) must not leave the lock: every later start on the machine would wait for it forever."""
    lock = tmp_path / "lock"
    proc = subprocess.run([sys.executable, "-c", _HOLDS_A_BUILD_LOCK, str(lock)], cwd=ROOT, env=launcher_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75 and "SIGTERM during start-up" in proc.stderr, proc.stderr[-2000:]
    assert not lock.exists()


def test_a_start_up_error_is_one_message_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--ds_config",
                           os.path.join(ROOT, "ds_configs", "cpu.json"), "--preset", "image_tiny", "--data",
                           str(tmp_path / "train-{000000..000003}.tar"), "--out", str(tmp_path / "run")],
                          cwd=ROOT, env=launcher_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: shard pattern" in proc.stderr and "matches no existing shard" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_shard_two_ranks_find_damaged_is_counted_once(monkeypatch):
    """bad_shards in the log is the number of distinct damaged shards over all ranks: the ranks'
    per-shard flags are summed in the window's one collective (a peer rank simulated here)."""
    from d2v import collectives
    from d2v.train.loop import UpdateLoop
    from d2v.train.stepper import StepMetrics

    peer = {"counters": [3.0], "damaged": [1.0, 0.0, 1.0, 0.0]}  # the other rank met shards 0 and 2

    class Stream:
        def counters(self):
            return {"bad_shards": 2}

        def damaged_shards(self):
            return [1.0, 1.0, 0.0, 0.0]  # this rank met shards 0 and 1

    class Sink:
        rows = []

        def log(self, step, values, **kw):
            self.rows.append(values)

    def two_ranks(values, op="sum", dtype=None):
        other = [v for v in values[:-5]] + peer["counters"] + peer["damaged"]
        return [a + b for a, b in zip(values, other)]

    monkeypatch.setattr(collectives, "all_reduce_values", two_ranks)
    loop = UpdateLoop()
    loop.stream, loop.sink, loop.world_size, loop.console, loop.logged = Stream(), Sink(), 2, False, []
    loop.stepper = type("S", (), {"skipped_steps": 0})()
    loop._log_window(10, StepMetrics(10, 1.0, {"lr": 1e-3}), {"loss": 1.0}, {"samples": 4.0}, 1.0)
    assert loop.sink.rows[-1]["bad_shards"] == 3.0  # shards 0, 1, 2: not 2 + 2
