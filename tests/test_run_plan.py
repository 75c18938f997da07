"""The run config is resolved once, for the world size, before anything reads it; `python -m d2v
plan` says what a rank of an N-rank run trains, through the launcher's own steps."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from d2v.config import fill_ds_config, get_preset, list_presets, load_template, resolve
from d2v.config.batch_plan import plan_batch, run_config
from d2v.config.modalities import modality_spec
from d2v.config.schema import FrozenConfigError, is_frozen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_SIZES = (1, 2, 8, 16, 64, 512)


def test_the_run_config_is_frozen_and_the_input_untouched():
    cfg = resolve("image_base")
    run_cfg, plan = run_config(cfg, 32)
    assert is_frozen(run_cfg) and not is_frozen(cfg)
    assert cfg.train.micro_batch_size == 128 and run_cfg.train.micro_batch_size == plan.micro_batch == 64
    with pytest.raises(FrozenConfigError, match="TrainConfig.micro_batch_size"):
        run_cfg.train.micro_batch_size = 128
    with pytest.raises(FrozenConfigError):
        run_cfg.model.audio.conv_pos_depth = 3
    assert run_config(run_cfg, 32)[0] is run_cfg


def test_no_component_changes_the_run_config_while_a_run_trains(tmp_path):
    """Two updates through build_run with every section frozen: any write raises."""
    from d2v.train.launch import build_run

    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={tmp_path}", "train.max_steps=2", "train.save_every=0",
                                           "train.log_every=1", "train.precision=fp32"])
    run = build_run(cfg, load_template("cpu.json"), console=False)
    assert is_frozen(run.cfg) and run.trainer.cfg is run.cfg
    run.train()
    run.close()


def test_the_loader_of_a_launched_run_draws_the_planned_batch(tmp_path, monkeypatch):
    """image_base at 32 ranks plans 64 images per rank (the preset's per-GPU batch is 128): the
    stream built by build_run, the launcher's own path, must draw 64."""
    from d2v.data.demo_image import build_image_demo
    from d2v.train import distributed, launch

    patterns = build_image_demo(str(tmp_path / "image"))["patterns"]
    monkeypatch.setattr(distributed, "planned_world_size", lambda: 32)
    monkeypatch.setattr(launch, "Run", lambda cfg, template, make_stream, **kw: (cfg, make_stream, kw["batch_plan"]))
    cfg = resolve("image_base", overrides=[f"data.train_shards={patterns['train']}", "data.num_workers=0"])
    run_cfg, make_stream, plan = launch.build_run(cfg, load_template("zero2.json"))
    assert plan.micro_batch == 64 and plan.matches_reference and run_cfg.train.micro_batch_size == 64
    batch = make_stream(5, 32).next_batch()
    assert batch.batch_size == 64


@pytest.mark.parametrize("preset", [p for p in list_presets() if "tiny" not in p])
def test_every_preset_at_every_world_size_and_stage(preset):
    """The reference global batch wherever the world size divides it (else the plan says why),
    and a DeepSpeed JSON that agrees with the plan, for ZeRO 0-3."""
    base = get_preset(preset)
    for world in WORLD_SIZES:
        cfg, plan = run_config(base, world)
        ref = base.train.reference_batch
        total = plan.micro_batch * plan.grad_accum * world
        smallest = modality_spec(base.model.modality).smallest_per_rank_batch(base)
        if ref and ref % world == 0 and ref >= smallest * world:
            assert plan.matches_reference and total == ref, (preset, world, plan.message)
        elif ref:
            assert not plan.matches_reference, (preset, world, plan.message)
            assert "do not divide" in plan.message or "cannot be split" in plan.message, (preset, world, plan.message)
        for stage in range(4):
            template = load_template(f"zero{stage}.json" if stage else "cpu.json")
            ds = fill_ds_config(template, cfg, world, on_cpu=False)
            assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
                cfg.train.micro_batch_size, plan.grad_accum)
            assert ds["train_batch_size"] == cfg.train.micro_batch_size * plan.grad_accum * world


def _plan(*args):
    proc = subprocess.run([sys.executable, "-m", "d2v", "plan", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_plan_command_json_keys_and_drawn_batches(tmp_path):
    from d2v.data.demo_image import build_image_demo

    patterns = build_image_demo(str(tmp_path / "image"))["patterns"]
    info = _plan("image_base", "--world-size", "32", "--rank", "3", "--zero", "2", "--data", patterns["train"],
                 "data.num_workers=0")
    for key in ("world_size", "rank", "global_batch", "reference_global_batch", "matches_reference", "micro_batch",
                "grad_accum", "ds_train_batch_size", "steps_per_epoch", "drawn_batches", "memory_per_rank_gb",
                "fits_device", "flops_per_update"):
        assert key in info, key
    assert (info["world_size"], info["rank"], info["matches_reference"]) == (32, 3, True)
    assert info["global_batch"] == {"value": 2048, "unit": "images"} == info["reference_global_batch"]
    assert info["micro_batch"] == {"value": 64, "unit": "images"} and info["ds_train_batch_size"] == 2048
    assert info["steps_per_epoch"] >= 1 and info["fits_device"]
    assert info["drawn_batches"] and all(b == {"samples": 64, "positions": 64 * 196} for b in info["drawn_batches"])
    want = plan_batch(get_preset("image_base"), 32)
    assert info["message"] == want.message


def test_plan_command_refuses_a_rank_outside_the_world_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "d2v", "plan", "image_base", "--world-size", "4", "--rank", "4"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_an_export_directory_continues_its_method_not_its_location(tmp_path):
    """`plan DIR` / `--preset DIR` start from the directory's own config; where that run wrote and
    what it read are not handed on (a new run must never write into the old one's directory)."""
    from d2v.config import apply_overrides, to_dict

    old = apply_overrides(get_preset("audio_tiny"), ["teacher.top_k=1", "masking.mask_prob=0.5",
                                                     "train.out_dir=/elsewhere/run", "data.train_shards=/x/a.tar"])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps(to_dict(old)))
    cfg = resolve(str(tmp_path / "export"), None, ["optim.lr=1e-4"])
    assert (cfg.teacher.top_k, cfg.masking.mask_prob, cfg.optim.lr) == (1, 0.5, 1e-4)
    assert (cfg.train.out_dir, cfg.data.train_shards) == (get_preset("audio_tiny").train.out_dir, "")
    info = _plan(str(tmp_path / "export"), "--world-size", "8")
    assert info["config"]["teacher"]["top_k"] == 1 and info["world_size"] == 8
    (tmp_path / "hf").mkdir()  # public transformers weights carry no d2v method
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "data2vec-audio"}))
    proc = subprocess.run([sys.executable, "-m", "d2v", "plan", str(tmp_path / "hf"), "--world-size", "2"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and "--init-from" in proc.stderr and "Traceback" not in proc.stderr


def _synthetic_index(lengths):
    """A ShardIndex as a sidecar of that many samples would give (the planner reads lengths only)."""
    from d2v.data.shards import ShardIndex

    per_shard = 1000
    cuts = range(0, len(lengths), per_shard)
    return ShardIndex(paths=[f"train-{i:06d}.tar" for i in range(len(cuts))],
                      keys=[[""] * len(lengths[c:c + per_shard]) for c in cuts],
                      lengths=[lengths[c:c + per_shard] for c in cuts])


# Realistic epochs: LibriSpeech 960 h (281,241 utterances, about 12.3 s each, 1-35 s), ImageNet-1k
# (1,281,167 images) and 1 M text blocks of 512 tokens (2 GB of text; the 20 GB corpus has 10 M,
# planned the same way, ten times slower).
SIDECARS = {
    "audio": lambda: (np.clip(np.random.default_rng(0).normal(12.3, 3.5, 281_241), 1, 35) * 16_000).astype(np.int64),
    "image": lambda: np.ones(1_281_167, np.int64),
    "text": lambda: np.full(1_000_000, 512, np.int64),
}


@pytest.mark.parametrize("modality", sorted(SIDECARS))
def test_at_every_world_size_every_rank_and_worker_has_batches(modality):
    from d2v.data.plan import train_plan
    from d2v.train.shard_streams import PIPELINES

    index = _synthetic_index(SIDECARS[modality]())
    for world in WORLD_SIZES:
        cfg, plan = run_config(get_preset(f"{modality}_base"), world)
        epoch = train_plan(index, PIPELINES[modality].batching(cfg), seed=cfg.train.seed, epoch=0,
                           world_size=world, workers=cfg.data.num_workers)
        shortest = min(len(s) for s in epoch.streams)
        assert shortest > 0, (modality, world)
        assert epoch.steps_per_epoch == cfg.data.num_workers * shortest  # every rank runs this many
        if not modality_spec(cfg.model.modality).varies_in_length:
            assert {len(b.items) for s in epoch.streams for b in s} == {plan.micro_batch}, (modality, world)
        # What a rank leaves out so that ranks stay in step: budgeted audio streams even out their
        # batch counts by splitting batches, so nothing (it was up to 2.6 % at 64 ranks and 9 % at
        # 512); fixed-size batches come from equal slices, at most one batch per worker apart.
        dropped = max(epoch.dropped_batches(r) for r in range(world))
        assert dropped <= (0 if modality_spec(cfg.model.modality).varies_in_length else cfg.data.num_workers), (
            modality, world, dropped)
