"""One 2-rank DeepSpeed launch (CPU, gloo) of the tiny data2vec 2.0 presets of all three modalities
on the built-in demo data (tests/dist/v2_scenarios.py): losses fall, batches carry M masks per
sample, and ZeRO 2 and ZeRO 3 (every parameter partitioned) repeat the first steps of ZeRO 0."""
import json

import pytest

from launch import launch_two_ranks

STEPS, ZERO_STEPS = 40, 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, demo_shards):
    patterns = {"audio": demo_shards["audio"]["train"]["pattern"],
                "image": demo_shards["image"]["patterns"]["train"],
                "text": demo_shards["text"]["patterns"]["train"]}
    out = str(tmp_path_factory.mktemp("dist_v2"))
    return launch_two_ranks("tests/dist/v2_scenarios.py", out, "--steps", str(STEPS), "--zero-steps",
                            str(ZERO_STEPS), "--data", json.dumps(patterns))


def test_tiny_v2_presets_learn_on_two_ranks(ranks):
    for r, res in enumerate(ranks):
        for modality in ("audio", "image", "text"):
            run = res[modality]
            assert run["rank"] == r and run["world_size"] == 2
            losses = run["losses"]
            assert len(losses) == STEPS, modality
            assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, (modality, losses[:5], losses[-5:])
            assert min(run["target_std"]) > 0.1, modality


def test_batches_carry_m_masks_per_sample(ranks):
    from d2v.config import get_preset

    for modality in ("audio", "image", "text"):
        cfg = get_preset(f"{modality}_tiny_v2")
        for shape in ranks[0][modality]["mask_shapes"]:
            assert len(shape) == 3 and shape[1] == cfg.model.v2.num_masks, (modality, shape)


def test_zero_2_and_3_repeat_zero_0(ranks):
    for res in ranks:
        for modality in ("audio", "image", "text"):
            ref = res[modality]["losses"][:ZERO_STEPS]
            for stage in (2, 3):
                got = res[f"{modality}_zero{stage}"]
                assert got["zero_stage"] == stage
                assert got["losses"] == pytest.approx(ref, rel=2e-3), (modality, stage)
