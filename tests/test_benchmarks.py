"""Benchmarks: FLOP counts by hand, and short runs of each script that write
a valid record (and a plot)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from d2v.config import get_preset
from d2v.estimate.flops import flops_per_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_image_flops_by_hand():
    cfg = get_preset("image_tiny")  # 32x32, patch 4: 64 patches + CLS, D=64, 4 blocks, FFN 128
    f = flops_per_sample(cfg)
    T, D, F = 65, 64, 128
    block = 8 * T * D * D + 4 * T * D * F + 4 * T * T * D
    assert f.feature_encoder == 2 * 3 * 4 * 4 * 64 * 64
    assert f.blocks == 4 * block
    assert f.head == 39 * 2 * D * D
    assert f.teacher_forward == f.blocks + f.feature_encoder  # the image teacher has its own patch embedding


def test_text_flops_by_hand():
    cfg = get_preset("text_tiny")  # 128 tokens, D=64, 2 blocks, FFN 128, 2-layer head
    f = flops_per_sample(cfg)
    T, D, F = 128, 64, 128
    assert f.blocks == 2 * (8 * T * D * D + 4 * T * D * F + 4 * T * T * D)
    masked = (1 - (1 - 0.35 / 4) ** 4) * T
    assert f.head == pytest.approx(masked * (2 * D * 2 * D + 2 * 2 * D * D))
    assert f.feature_encoder == 0 and f.teacher_forward == f.blocks


def test_base_flops_match_the_design_card():
    assert flops_per_sample(get_preset("image_base")).student_forward == pytest.approx(35e9, rel=0.03)
    assert flops_per_sample(get_preset("text_base")).student_forward == pytest.approx(97e9, rel=0.03)
    assert flops_per_sample(get_preset("audio_base"), 1.0).student_forward == pytest.approx(15e9, rel=0.1)


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset", ["audio_tiny", "image_tiny", "text_tiny"])
def test_throughput_writes_a_record(preset, tmp_path):
    proc = _run(["benchmarks/throughput.py", "--preset", preset, "--steps", "2", "--warmup", "1",
                 "--peak-tflops", "1.0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "throughput-*.json"))
    rec = json.load(open(path))
    for key in ("samples_per_s", "step_time_s", "tflops_per_rank", "mfu", "peak_memory_bytes", "split_s", "machine"):
        assert key in rec, key
    assert set(rec["split_s"]) == {"data", "student_fwd", "student_bwd", "teacher_fwd", "targets", "optimizer", "ema"}
    assert rec["mfu"] == pytest.approx(rec["tflops_per_rank"] / 1.0)
    assert rec["samples_per_s"] > 0 and rec["machine"]["commit"]


def test_scaling_writes_a_table_a_plot_and_a_record(tmp_path):
    proc = _run(["benchmarks/scaling.py", "--preset", "audio_tiny", "--world-sizes", "1,2", "--zero", "2",
                 "--steps", "1", "--warmup", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(tmp_path / "scaling-audio_tiny.png") > 1000
    md = open(tmp_path / "scaling-audio_tiny.md").read()
    assert "| 2 | 2 |" in md
    (path,) = glob.glob(str(tmp_path / "scaling-audio_tiny-*.json"))
    rec = json.load(open(path))
    assert [r["world_size"] for r in rec["rows"]] == [1, 2]
    assert rec["rows"][1]["comm_bytes_per_step"] > 0 == rec["rows"][0]["comm_bytes_per_step"]


def test_kernels_benchmark_writes_the_analytic_record(tmp_path):
    proc = _run(["benchmarks/kernels.py", "--reps", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "kernels-*.json"))
    rec = json.load(open(path))
    assert set(rec["groups"]) == {"targets", "attention"}
    assert all(row for rows in rec["groups"].values() for row in rows)


def test_data_loader_writes_a_record_and_a_plot(tmp_path):
    modalities = "image,text"
    try:
        import espeakng_loader  # noqa: F401

        modalities += ",audio"
    except ImportError:  # the speech demo needs the `demo` extra
        pass
    proc = _run(["benchmarks/data_loader.py", "--modalities", modalities, "--size", "tiny", "--workers", "0,1",
                 "--batches", "3", "--data-root", str(tmp_path / "demo"), "--audio-utterances", "16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(tmp_path / "data_loader-tiny.png") > 1000
    (path,) = glob.glob(str(tmp_path / "data_loader-*.json"))
    rows = json.load(open(path))["rows"]
    assert [(r["modality"], r["workers"]) for r in rows] == [(m, w) for m in modalities.split(",") for w in (0, 1)]
    for r in rows:
        assert r["samples"] >= 3 and r["samples_per_s"] > 0 and r["counters"]["corrupt_samples"] == 0


def test_compiled_blocks_compute_what_eager_blocks_do():
    import torch

    from d2v.models import build_model
    from torch._dynamo.utils import counters

    from d2v.train.trainer import compile_blocks

    counters.clear()
    cfg = get_preset("text_tiny")
    model = build_model(cfg).eval()
    x = torch.randn(2, 16, cfg.model.embed_dim, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    with torch.no_grad():
        eager = model.encoder(x, padding)
        compile_blocks(model.encoder)
        compiled = model.encoder(x, padding)
    assert all("forward" in vars(b) for b in model.encoder.blocks)  # replaced on the instance, hooks untouched
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced the blocks
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_throughput_profile_lists_the_top_ops(tmp_path):
    proc = _run(["benchmarks/throughput.py", "--preset", "text_tiny", "--steps", "1", "--warmup", "1",
                 "--peak-tflops", "1.0", "--profile", "5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "throughput-*.json"))
    ops = json.load(open(path))["profile_top_ops"]
    assert len(ops) == 5 and all(o["op"] for o in ops)
    assert [o["self_ms_per_step"] for o in ops] == sorted((o["self_ms_per_step"] for o in ops), reverse=True)
