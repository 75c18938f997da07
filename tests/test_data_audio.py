"""Speech data pipeline: prepare, deterministic distribution, resume, corruption, validation, collate."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.data import AudioLoaderOptions, audio_train_loader, audio_validation_loader, span_mask_fn
from d2v.data.audio import collate_audio
from d2v.data.prepare import main as prepare_main
from d2v.data.prepare_audio import prepare_audio
from d2v.data.shards import expand_pattern
from d2v.config.schema import AudioFeatureConfig
from d2v.shapes import conv_output_length

AUDIO_CONV_LAYERS = AudioFeatureConfig().conv_layers  # the reference's stack, model.audio.conv_layers' default

def _options(**settings):
    """The loader options of audio_tiny's run config, with these loader settings changed."""
    import dataclasses

    from d2v.config import get_preset

    return dataclasses.replace(AudioLoaderOptions.from_config(get_preset("audio_tiny")), **settings)


OPTS = _options(min_sample_size=8_000, max_sample_size=24_000, max_samples_per_batch=64_000, bucket_buffer=6,
                conv_layers=AUDIO_CONV_LAYERS)


def _tree(root, speakers=("11", "22", "33"), per_speaker=10, corrupt=True):
    rng = np.random.default_rng(0)
    rates = {"11": 8_000, "22": 22_050}
    for spk in speakers:
        d = root / spk / "100"
        d.mkdir(parents=True)
        lines = []
        for i in range(per_speaker):
            rate = rates.get(spk, 16_000)
            t = np.arange(int(rate * rng.uniform(0.3, 2.0))) / rate
            wav = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))
            sf.write(str(d / f"{spk}-100-{i:04d}.flac"), wav.astype(np.float32), rate)
            lines.append(f"{spk}-100-{i:04d} WORDS OF {spk} NUMBER {i}")
        (d / f"{spk}-100.trans.txt").write_text("\n".join(lines) + "\n")
    if corrupt:
        (root / speakers[-1] / "100" / f"{speakers[-1]}-100-0009.flac").write_bytes(b"not audio")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    _tree(base / "src", speakers=("11", "22", "33", "44"))
    out = base / "out"
    report = prepare_audio(str(base / "src"), str(out), samples_per_shard=4, val_speakers=["44"], workers=1)
    return out, report


def _train(out, n_train, **kw):
    return audio_train_loader(str(out / f"train-{{000000..{n_train - 1:06d}}}.tar"), OPTS, span_mask_fn(), **kw)


def test_prepare_outputs(shards):
    out, report = shards
    assert report["files"] == 40 and report["written"] == 39
    assert [s["path"] for s in report["skipped"]] == [os.path.join("44", "100", "44-100-0009.flac")]
    side = json.loads((out / "lengths.json").read_text())
    train = {n: e for n, e in side["shards"].items() if n.startswith("train-")}
    assert len(train) == 8 and side["totals"]["train"]["samples"] == 30
    assert side["totals"]["val"]["samples"] == 9
    keys = [k for e in side["shards"].values() for k, _ in e]
    assert len(keys) == len(set(keys)) and not any("." in k for k in keys)
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        key, n = side["shards"]["train-000000.tar"][0]
        wav, rate = sf.read(tar.extractfile(f"{key}.flac"))
        assert rate == 16_000 and len(wav) == n
        assert tar.extractfile(f"{key}.txt").read().decode() == f"WORDS OF 11 NUMBER {int(key[-4:])}"
    assert f"{key}.json" in names
    # 8 kHz and 22.05 kHz sources are resampled: lengths scale by 2 and 16000/22050.
    src_len = sf.info(str(out.parent / "src" / "11" / "100" / f"{key}.flac")).frames
    assert abs(n - 2 * src_len) <= 1


def test_prepare_cli_plain_folder(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(3):
        sf.write(str(folder / f"clip.{i}.wav"), np.zeros(16_000, np.float32), 16_000)
    assert prepare_main(["audio", str(folder), str(tmp_path / "o"), "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "train-000000.tar" in printed and "3 of 3" in printed
    side = json.loads((tmp_path / "o" / "lengths.json").read_text())
    assert [k for k, _ in side["shards"]["train-000000.tar"]] == ["clip_0", "clip_1", "clip_2"]


def test_brace_patterns_and_missing(shards, tmp_path):
    out, _ = shards
    assert len(expand_pattern(str(out / "train-{000000..000007}.tar"))) == 8
    assert len(expand_pattern([str(out / "train-000000.tar"), str(out / "val-{000000..000002}.tar")])) == 4
    with pytest.raises(FileNotFoundError, match="matches no existing shard"):
        expand_pattern(str(tmp_path / "nothing-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_pattern(str(out / "train-{000000..000009}.tar"))


def _epoch_keys(loader):
    return [b.keys for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_disjoint_equal_steps(shards, num_workers):
    out, _ = shards
    # 7 shards over 2 ranks x 2 workers does not divide: steps must still agree.
    loaders = [_train(out, 7, seed=3, rank=r, world_size=2, num_workers=num_workers) for r in range(2)]
    steps = [l.steps_per_epoch for l in loaders]
    runs = [_epoch_keys(l) for l in loaders]
    assert len(runs[0]) == len(runs[1]) == steps[0] == steps[1] > 0
    seen = [{k for b in run for k in b} for run in runs]
    assert not seen[0] & seen[1]
    assert loaders[0].epoch == 1  # finished epoch moves on
    again = _train(out, 7, seed=3, rank=0, world_size=2, num_workers=num_workers)
    assert _epoch_keys(again) == runs[0]  # a function of (seed, epoch, rank, worker)
    assert _epoch_keys(loaders[0]) != runs[0]  # epoch 1 reshuffles


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_sample_identical(shards, num_workers):
    out, _ = shards
    full = [(b.keys, b.source, b.mask) for b in _train(out, 8, seed=5, num_workers=num_workers)]
    k = 3
    first = _train(out, 8, seed=5, num_workers=num_workers)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state["batches_consumed"] == k
    resumed = _train(out, 8, seed=5, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = [(b.keys, b.source, b.mask) for b in resumed]
    assert len(rest) == len(full) - k
    for (ka, sa, ma), (kb, sb, mb) in zip(full[k:], rest):
        assert ka == kb and torch.equal(sa, sb) and torch.equal(ma, mb)
    other = _train(out, 8, seed=5, world_size=2, num_workers=num_workers)
    other.load_state_dict(state)  # another world size: the epoch restarts
    assert other.consumed == 0 and other.epoch == 0


def test_corrupt_sample_and_truncated_shard(shards, tmp_path):
    out, _ = shards
    side = json.loads((out / "lengths.json").read_text())
    work = tmp_path / "bad"
    work.mkdir()
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # Shard 0: the first sample's audio replaced by garbage. Shard 1: truncated mid-file.
    with tarfile.open(out / names[0]) as src, tarfile.open(work / names[0], "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".flac") and m.name.startswith(side["shards"][names[0]][0][0]):
                data = b"\x00garbage" * 10
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    raw = (out / names[1]).read_bytes()
    (work / names[1]).write_bytes(raw[: len(raw) // 2])
    (work / names[2]).write_bytes((out / names[2]).read_bytes())
    (work / "lengths.json").write_text(json.dumps({"shards": {n: side["shards"][n] for n in names}}))
    loader = audio_train_loader(str(work / "train-{000000..000002}.tar"), OPTS, span_mask_fn())
    steps = loader.steps_per_epoch
    batches = list(loader)
    assert len(batches) == steps
    assert loader.stats["corrupt"] == 1 and loader.stats["bad_shards"] == 1 and loader.stats["missing"] >= 1
    delivered = sum(b.batch_size for b in batches if b.extras["weight"] > 0)
    assert delivered == loader.stats["samples"] - loader.stats.get("filler_batches", 0)


def test_validation_equal_steps(shards):
    out, _ = shards
    pattern = str(out / "val-{000000..000002}.tar")
    single = [b.keys for b in audio_validation_loader(pattern, OPTS, span_mask_fn())]
    for world in (2, 3, 4):
        loaders = [audio_validation_loader(pattern, OPTS, span_mask_fn(), rank=r, world_size=world, num_workers=1)
                   for r in range(world)]
        runs = [list(l) for l in loaders]
        assert len({len(r) for r in runs}) == 1 and len(runs[0]) == loaders[0].steps
        real = sorted(k for r in runs for b in r if b.extras["weight"] == 1.0 for k in b.keys)
        assert real == sorted(k for b in single for k in b)
    # Fixed: the same batches every time.
    assert [b.keys for b in audio_validation_loader(pattern, OPTS, span_mask_fn())] == single


def test_collate_shapes_padding_masks():
    waves = [np.ones(n, np.float32) for n in (16_000, 9_000, 30_000)]
    g = torch.Generator().manual_seed(0)
    padded = collate_audio(waves, ["a", "b", "c"], pad=True, max_sample_size=24_000,
                           mask_fn=span_mask_fn(mask_prob=0.9, mask_length=3), generator=g,
                           conv_layers=AUDIO_CONV_LAYERS)
    assert padded.source.shape == (3, 24_000)
    assert padded.source_lengths.tolist() == [16_000, 9_000, 24_000]
    assert padded.source[1, 9_000:].abs().sum() == 0
    frames = conv_output_length(24_000, AUDIO_CONV_LAYERS)
    # Masks are B×M×T; a 1.0 mask is one per sample (M = 1).
    assert padded.mask.shape == (3, 1, frames) and padded.padding_mask.shape == (3, frames)
    lengths = (16_000, 9_000, 24_000)
    assert (~padded.padding_mask).sum(1).tolist() == [conv_output_length(n, AUDIO_CONV_LAYERS) for n in lengths]
    assert not (padded.mask[:, 0] & padded.padding_mask).any() and padded.mask.any()
    cropped = collate_audio(waves, ["a", "b", "c"], pad=False, max_sample_size=24_000,
                            mask_fn=span_mask_fn(), generator=g, conv_layers=AUDIO_CONV_LAYERS)
    assert cropped.source.shape == (3, 9_000) and cropped.padding_mask is None
    assert cropped.mask.shape == (3, 1, conv_output_length(9_000, AUDIO_CONV_LAYERS))


def test_loader_batches_respect_budget_and_normalize(shards):
    out, _ = shards
    pad_opts = AudioLoaderOptions(**{**OPTS.__dict__, "pad": True})
    loader = audio_train_loader(str(out / "train-{000000..000007}.tar"), pad_opts, span_mask_fn())
    for b in loader:
        assert b.source.numel() <= pad_opts.max_samples_per_batch
        row = b.source[0, : b.source_lengths[0]]
        assert abs(float(row.mean())) < 0.2 and 0.5 < float(row.std()) < 1.5
        if b.padding_mask is not None:
            assert not (b.mask[:, 0] & b.padding_mask).any()
    assert loader.stats["too_short"] > 0  # some generated utterances are under 0.5 s (8,000 samples)


def test_espeak_demo_small(tmp_path):
    pytest.importorskip("espeakng_loader", reason="espeakng-loader not installed (the optional `demo` extra)")
    from d2v.data.demo import make_audio_demo

    summary = make_audio_demo(str(tmp_path / "demo"), utterances=12, seed=0, workers=1)
    assert summary["train"]["samples"] + summary["val"]["samples"] == 12
    assert summary["val"]["samples"] > 0


def test_a_transcript_file_that_is_not_utf8_is_named_and_the_rest_is_written(tmp_path):
    _tree(tmp_path / "src", speakers=("11", "22"), per_speaker=3, corrupt=False)
    bad = tmp_path / "src" / "22" / "100" / "22-100.trans.txt"
    bad.write_bytes("22-100-0000 CAF\u00c9 EN LATIN-1\n".encode("latin-1"))
    report = prepare_audio(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=4, val_fraction=0.0)
    assert report["skipped"] == [{"path": os.path.join("22", "100", "22-100.trans.txt"),
                                  "reason": report["skipped"][0]["reason"]}]
    assert "not valid UTF-8 at byte 15" in report["skipped"][0]["reason"]
    assert report["written"] == 6 and report["without_transcript"] == 3  # speaker 22's audio is kept


def test_prepare_refuses_an_output_folder_of_an_earlier_run_unless_cleaned(tmp_path, capsys):
    _tree(tmp_path / "src", speakers=("11", "22"), per_speaker=4, corrupt=False)
    out = tmp_path / "out"
    prepare_audio(str(tmp_path / "src"), str(out), samples_per_shard=2, val_fraction=0.0)
    assert len(list(out.glob("train-*.tar"))) == 4
    with pytest.raises(FileExistsError, match="--clean"):
        prepare_audio(str(tmp_path / "src"), str(out), samples_per_shard=4, val_fraction=0.0)
    assert prepare_main(["audio", str(tmp_path / "src"), str(out), "--samples-per-shard", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds the output of an earlier prepare (train-000000.tar")
    report = prepare_audio(str(tmp_path / "src"), str(out), samples_per_shard=4, val_fraction=0.0, clean=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert report["totals"]["train"]["pattern"].endswith("train-{000000..000001}.tar")


def _children() -> list[int]:
    mine = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == mine:
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads child processes from /proc")
def test_a_sigterm_to_a_loader_worker_does_not_fail_the_rank(shards):
    """The launcher and Slurm signal every process of a rank; the main process checkpoints on it,
    so its loader workers must live on to the step boundary."""
    import signal

    out, _ = shards
    loader = _train(out, 8, num_workers=1)
    it = iter(loader)
    batches = [next(it)]
    workers = [pid for pid in _children() if pid != os.getpid()]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    batches += list(it)  # a killed worker would raise "DataLoader worker ... killed by signal: Terminated"
    assert len(batches) == loader.plan(0).steps_per_epoch


def test_the_loader_counts_frames_with_the_models_conv_stack():
    """A six-layer waveform encoder (as a fairseq import can bring) gives other frame counts than
    the default seven layers: the loader's masks and padding must have the model's frames."""
    from d2v.config import get_preset
    from d2v.models import build_model
    from d2v.train.shard_streams import _audio_options

    cfg = get_preset("audio_tiny")
    cfg.model.audio.conv_layers = cfg.model.audio.conv_layers[:-1]
    cfg.validate()
    opts = _audio_options(cfg)
    waves = [np.ones(n, np.float32) for n in (8_000, 6_000)]
    batch = collate_audio(waves, ["a", "b"], pad=True, max_sample_size=8_000, mask_fn=span_mask_fn(),
                          generator=torch.Generator().manual_seed(0), conv_layers=opts.conv_layers)
    model_frames = build_model(cfg).frontend.num_frames(8_000)
    assert model_frames != conv_output_length(8_000, AUDIO_CONV_LAYERS)  # the stacks really differ
    assert batch.mask.shape[-1] == batch.padding_mask.shape[-1] == model_frames


def test_a_waveform_with_nan_or_inf_is_a_corrupt_sample(tmp_path):
    """A float WAV can hold NaN/inf: that one sample is skipped and counted, the rest of the batch kept."""
    import io

    import soundfile

    from d2v.data.audio import AudioBatchMaker

    def wav_bytes(x):
        buf = io.BytesIO()
        soundfile.write(buf, x, 16_000, format="WAV", subtype="FLOAT")
        return buf.getvalue()

    good = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    bad = good.copy()
    bad[100] = np.inf
    maker = AudioBatchMaker(_options(min_sample_size=8_000, max_sample_size=16_000,
                                     max_samples_per_batch=64_000, conv_layers=AUDIO_CONV_LAYERS), span_mask_fn())
    stats = {}
    batch = maker([("a", {"wav": wav_bytes(good)}), ("b", {"wav": wav_bytes(bad)})],
                  torch.Generator().manual_seed(0), stats)
    assert batch.keys == ["a"] and stats == {"corrupt": 1}
    assert torch.isfinite(batch.source).all()


def test_cropped_batch_lengths_are_rounded_to_the_multiple():
    """data.length_multiple: the crop to the shortest utterance rounds down (fewer batch shapes);
    never below the shortest's own length when it is shorter than the multiple, never for padding."""
    from d2v.data.audio import batch_length

    assert batch_length([17_999, 30_000], pad=False, max_sample_size=320_000) == 17_999  # the reference
    assert batch_length([17_999, 30_000], pad=False, max_sample_size=320_000, length_multiple=4_000) == 16_000
    assert batch_length([3_000, 30_000], pad=False, max_sample_size=320_000, length_multiple=4_000) == 3_000
    assert batch_length([400_000] * 2, pad=False, max_sample_size=318_500, length_multiple=4_000) == 316_000
    g = torch.Generator().manual_seed(0)
    waves = [np.ones(n, np.float32) for n in (17_999, 30_000)]
    batch = collate_audio(waves, ["a", "b"], pad=False, max_sample_size=320_000, mask_fn=span_mask_fn(),
                          generator=g, conv_layers=AUDIO_CONV_LAYERS, length_multiple=4_000)
    assert batch.source.shape == (2, 16_000) and batch.mask.shape[-1] == conv_output_length(16_000, AUDIO_CONV_LAYERS)
    from d2v.config import apply_overrides, get_preset

    with pytest.raises(ValueError, match="needs data.pad=false"):
        apply_overrides(get_preset("audio_base"), ["data.pad=true"]).validate()
