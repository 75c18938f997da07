"""One 2-rank DeepSpeed launch (CPU, gloo) of pretraining on the built-in demo data of every
modality (tests/dist/pretrain_scenarios.py): loss falls, logs and checkpoints appear, ranks read
disjoint data, a resumed run repeats the uninterrupted one exactly, a corrupt sample is counted."""
import glob
import io
import json
import os
import tarfile

import pytest

from launch import launch_two_ranks

STEPS = 60  # the loss falls by then for every modality (first 20 steps against the last 20)
RESUMED_STEPS = 10  # a resumed run goes on this far, not to the end: enough to show it repeats exactly


def corrupt_copy(pattern_dir: str, out_dir: str) -> None:
    """Copies audio shards and garbles one utterance's FLAC bytes inside the first one."""
    os.makedirs(out_dir)
    for name in os.listdir(pattern_dir):
        src = os.path.join(pattern_dir, name)
        if name == "train-000000.tar":
            with tarfile.open(src) as tar, tarfile.open(os.path.join(out_dir, name), "w") as dst:
                broken = False
                for member in tar.getmembers():
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".flac") and not broken:
                        # the same size: damage inside a shard, not a shard that changed length
                        data, broken = (b"fLaC" + b"\x00garbage" * (len(data) // 8 + 1))[:len(data)], True
                    info = tarfile.TarInfo(member.name)
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
        elif os.path.isfile(src):
            with open(src, "rb") as f, open(os.path.join(out_dir, name), "wb") as g:
                g.write(f.read())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, demo_shards):
    data_dir, audio, image, text = (demo_shards[k] for k in ("root", "audio", "image", "text"))
    corrupt_dir = tmp_path_factory.mktemp("audio_corrupt") / "shards"
    corrupt_copy(str(data_dir / "audio" / "shards"), str(corrupt_dir))
    patterns = {
        "audio": [audio["train"]["pattern"], audio["val"]["pattern"]],
        "audio_corrupt": [audio["train"]["pattern"].replace(str(data_dir / "audio" / "shards"), str(corrupt_dir)),
                          None],
        "image": [image["patterns"]["train"], image["patterns"]["valid"]],
        "text": [text["patterns"]["train"], text["patterns"]["valid"]],
    }
    out = str(tmp_path_factory.mktemp("dist_pretrain"))
    return out, launch_two_ranks("tests/dist/pretrain_scenarios.py", out, "--steps", str(STEPS),
                                 "--resumed-steps", str(RESUMED_STEPS), "--data",
                                 json.dumps(patterns))


def _falls(losses):
    return sum(losses[-20:]) / 20 < sum(losses[:20]) / 20


def test_two_ranks_ran_and_loss_falls_for_every_modality(ranks):
    out, results = ranks
    for r, res in enumerate(results):
        for name in ("full", "image", "text"):
            run = res[name]
            assert run["rank"] == r and run["world_size"] == 2
            assert len(run["losses"]) == STEPS, name
            assert _falls(run["losses"]), (name, run["losses"][:5], run["losses"][-5:])
            assert min(run["target_std"]) > 0.1, name


def test_no_shared_memory_workspace_is_left_behind(ranks):
    _, results = ranks
    assert [res["shm_name_left"] for res in results] == [False, False]


def test_logs_and_checkpoints_appear(ranks):
    out, _ = ranks
    lines = [json.loads(line) for line in open(os.path.join(out, "full", "metrics.jsonl"))]
    train = [row for row in lines if row["split"] == "train"]
    assert [row["step"] for row in train] == list(range(10, STEPS + 1, 10))
    for key in ("loss", "target_std", "pred_std", "mask_rate", "ema_decay", "lr", "grad_norm", "model_norm",
                "ema_norm", "samples_per_s", "corrupt_samples", "positions_per_s", "tflops_per_device",
                "peak_mem_gib"):
        assert key in train[0], key
    # every logged interval: the rates are positive and consistent (tens to hundreds of frames a sample)
    for row in train:
        assert row["positions_per_s"] > 0 and row["tflops_per_device"] > 0 and row["peak_mem_gib"] > 0
        assert 10 < row["positions_per_s"] / row["samples_per_s"] < 1000
    assert "mfu" not in train[0]  # a CPU has no datasheet peak and none was given
    valid = [row for row in lines if row["split"] == "valid"]
    assert [row["step"] for row in valid] == [STEPS // 2, STEPS] and all(row["loss"] > 0 for row in valid)
    assert glob.glob(os.path.join(out, "full", "tensorboard", "events.out.tfevents.*"))
    ckpt = os.path.join(out, "full", "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"step_{STEPS:08d}"
    tag = os.path.join(ckpt, f"step_{STEPS:08d}")
    for name in ("COMPLETE", "teacher.pt", "rank_00000.pt", "rank_00001.pt", "d2v_state.json"):
        assert os.path.exists(os.path.join(tag, name)), name
    assert json.load(open(os.path.join(out, "full", "config.json")))["name"] == "audio_tiny"


def test_ranks_read_different_data(ranks):
    _, results = ranks
    for name in ("full", "image", "text"):
        # Disjoint within an epoch (the first 10 batches are inside the first epoch of every demo).
        a, b = ({k for batch in res[name]["keys"][:10] for k in batch} for res in results)
        assert a and b and not (a & b), name


def test_resume_mid_epoch_gives_the_same_losses_as_an_uninterrupted_run(ranks):
    """Stopped one step past a save and a validation, inside an epoch, with dropout on: the
    resumed run repeats the uninterrupted one bit for bit (audio, image and text)."""
    _, results = ranks
    for full, first, second in (("full", "first_half", "second_half"), ("image", "image_first", "image_second"),
                                ("text", "text_first", "text_second")):
        for res in results:
            stop, resumed = len(res[first]["losses"]), len(res[second]["losses"])
            assert res[second]["start"] == stop and stop % res[full]["steps_per_epoch"] != 0, (full, stop)
            assert resumed == RESUMED_STEPS, full
            assert res[first]["losses"] == res[full]["losses"][:stop], full
            assert res[second]["losses"] == res[full]["losses"][stop:stop + resumed], full
            keys = res[first]["keys"] + res[second]["keys"]
            assert keys == res[full]["keys"][:len(keys)], full


def test_a_corrupt_sample_is_skipped_counted_and_logged(ranks):
    out, results = ranks
    assert sum(res["corrupt"]["counters"]["corrupt_samples"] for res in results) >= 1
    assert all(len(res["corrupt"]["losses"]) == 30 for res in results)
    rows = [json.loads(line) for line in open(os.path.join(out, "corrupt", "metrics.jsonl"))]
    assert rows[-1]["corrupt_samples"] >= 1
