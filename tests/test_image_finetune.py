"""The image fine-tuning recipe on the DeepSpeed engine (README, fine-tuning): the optimizer's groups
carry the layer-wise LR scales through the schedule, the model gets drop path and fc_norm, and a
2-rank launch of launchers/finetune.py fine-tunes the built-in digits and reports top-1/top-5."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls, base in (("dark", 40), ("light", 200)):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(n):
                arr = np.clip(base + rng.integers(-30, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, cls, f"{i}.png"))
    return os.path.join(root, "train"), os.path.join(root, "val")


def test_recipe_run_keeps_layer_scales_through_the_schedule(tmp_path):
    from d2v.config import load_template
    from d2v.finetune.layer_decay import lr_scales
    from d2v.finetune.resolve import resolve_finetune
    from d2v.finetune.runner import FinetuneRun

    train, val = _tree(str(tmp_path / "img"))
    cfg, _ = resolve_finetune("image_cls", preset="image_tiny", overrides=[
        "finetune.recipe=vision_base_v1", f"finetune.train_data={train}", f"finetune.eval_data={val}",
        f"train.out_dir={tmp_path / 'run'}", "train.micro_batch_size=4", "train.global_batch_size=null",
        "train.max_steps=24", "optim.warmup_steps=3", "optim.lr=1e-3"])
    torch.set_num_threads(2)
    run = FinetuneRun(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True)
    model = run.model
    assert model.backbone.encoder.final_norm is None and model.head.norm is not None  # BEiT's mean pooling
    assert [b.drop_path for b in model.backbone.encoder.blocks] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])
    scales = lr_scales(4, 0.65)
    for _ in range(3):
        run.train_step([0, 1, 2, 3])
        groups = run.engine.optimizer.param_groups
        peak = groups[0]["lr"]  # the head's group comes first, at the schedule's LR
        assert peak == pytest.approx(run.scheduler.get_last_lr()[0]) and peak > 0
        for g in groups:
            assert g["lr"] == pytest.approx(peak * scales[g["layer"]])
    assert {g["layer"] for g in groups} == set(range(6))
    # a training batch is a function of (seed, update step, indices): a resumed run sees the same one
    batches = []
    for step in (7, 7, 8):
        run.task.begin_update(step)
        batches.append(run.task.batch("train", [0, 1, 2, 3]))
    assert torch.equal(batches[0].source, batches[1].source)
    assert torch.equal(batches[0].soft_targets, batches[1].soft_targets)
    assert not torch.equal(batches[0].source, batches[2].source)
    result = run.train()  # the rest of the updates, every technique on: dark and light patches still separate
    assert result["steps"] == 24 and result["metrics"] == {"accuracy": 1.0, "top5": 1.0}


def test_data2vec_2_recipe_leaves_the_embeddings_at_the_full_rate(tmp_path):
    from d2v.config import load_template
    from d2v.finetune.resolve import resolve_finetune
    from d2v.finetune.runner import FinetuneRun

    train, val = _tree(str(tmp_path / "img"))
    cfg, _ = resolve_finetune("image_cls", preset="image_tiny_v2", overrides=[
        "finetune.recipe=vision_base_v2", f"finetune.train_data={train}", f"finetune.eval_data={val}",
        f"train.out_dir={tmp_path / 'run'}", "train.micro_batch_size=4", "train.global_batch_size=null",
        "train.max_steps=4", "optim.warmup_steps=1"])
    torch.set_num_threads(2)
    run = FinetuneRun(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True)
    run.train_step([0, 1, 2, 3])
    lr = {g["layer"]: g["lr"] for g in run.engine.optimizer.param_groups}  # layer 0: embeddings, 1: the prenet
    peak = run.scheduler.get_last_lr()[0]
    assert lr[0] == pytest.approx(peak) and lr[1] == pytest.approx(peak * 0.65 ** 4) and lr[5] == pytest.approx(peak)
    assert [b.drop_path for b in run.model.backbone.encoder.prenet] == [0.0]
    assert run.model.backbone.encoder.blocks[-1].drop_path == pytest.approx(0.1)
    result = run.train()
    assert result["steps"] == 4 and 0.0 <= result["metrics"]["accuracy"] <= result["metrics"]["top5"] == 1.0


def test_two_rank_recipe_fine_tuning_on_the_digits(tmp_path):
    """vision_base_v1 at demo scale: every technique on, 2 ranks, digits from scikit-learn."""
    from launch import free_port

    from d2v.data.imagefolder import export_digits

    n_val = export_digits(str(tmp_path / "digits"))["val"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launchers", "finetune.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--task", "image_cls", "--preset", "image_tiny",
           "--train-data", str(tmp_path / "digits" / "train"), "--eval-data", str(tmp_path / "digits" / "val"),
           "--out", str(tmp_path / "run"), "--recipe", "vision_base_v1", "train.micro_batch_size=16",
           "train.global_batch_size=32", "train.max_steps=90", "optim.warmup_steps=9", "optim.lr=2e-3",
           "train.log_every=30", "finetune.eval_batch_size=64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    top1, top5 = result["metrics"]["accuracy"], result["metrics"]["top5"]
    # Reported, not asserted: at this scale the recipe's regularisation (crops down to 8 % of a 32x32 digit,
    # RandAugment, Mixup/CutMix, erasing) keeps a random-init model near chance (0.1 / 0.5) for 90 updates.
    print(f"digits, vision_base_v1 at demo scale, random init, 90 updates of 32: top-1 {top1:.3f}, top-5 {top5:.3f}")
    assert result["steps"] == 90 and result["eval_examples"] == n_val
    # counts summed over the ranks' strided shares: whole numbers of examples
    assert math.isclose(top1 * n_val, round(top1 * n_val)) and math.isclose(top5 * n_val, round(top5 * n_val))
    assert 0.0 <= top1 <= top5 <= 1.0
    saved = json.load(open(tmp_path / "run" / "finetune.json"))
    assert saved["config"]["finetune"]["recipe"] == "vision_base_v1"
    assert saved["config"]["finetune"]["image"]["layer_decay"] == 0.65


# -- linear probing, BEiT's protocol -----------------------------------------------------------------
def test_layer_features_are_cls_and_patch_mean_of_every_block():
    from d2v.config.presets import get_preset
    from d2v.finetune.linear_eval import LayerFeatures, epoch_lr
    from d2v.models import build_model

    torch.manual_seed(0)
    backbone = build_model(get_preset("image_tiny"))
    backbone.encoder.final_norm = None  # then the last block's output is what encode returns
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = LayerFeatures(backbone)(images)
    assert len(feats) == 4 and all(f.shape == (3, 128) for f in feats)
    with torch.no_grad():
        x = backbone.encode(backbone.features(images).x, keep_extra_tokens=True)
    assert torch.allclose(feats[-1], torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1), atol=1e-6)
    assert not torch.allclose(feats[0], feats[-1])
    # CosineAnnealingLR(T_max=100, eta_min=0) stepped per epoch
    assert epoch_lr(4e-3, 0, 100) == 4e-3 and epoch_lr(4e-3, 50, 100) == pytest.approx(2e-3)
    assert epoch_lr(4e-3, 99, 100) == pytest.approx(4e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))


def test_linear_eval_cli_trains_one_classifier_per_block(tmp_path, capsys):
    from d2v.finetune.linear_eval import main

    train, val = _tree(str(tmp_path / "img"))
    torch.set_num_threads(2)
    result = main(["--preset", "image_tiny", "--train-data", train, "--eval-data", val, "--epochs", "4",
                   "--batch-size", "8", "--lr", "1e-2", "--json"])
    assert json.loads(capsys.readouterr().out)["results"] == result["results"]
    arm = result["results"]["random init"]
    assert list(result["results"]) == ["random init"] and [r["layer"] for r in arm["layers"]] == [1, 2, 3, 4]
    assert arm["accuracy"] == 1.0 and arm["top5"] == 1.0  # dark against light: some block separates them
    assert result["protocol"]["optimizer"] == "adamw" and result["eval_examples"] == 8
