"""`prepare` and the sidecar, checked: every source file becomes one sample under its own key, a
lengths.json that disagrees with its shards is refused before training (and a length it
understates is counted, never batched over the budget), and bad input to the command line is one
`error:` line with exit code 2."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from d2v.config.schema import AudioFeatureConfig
from d2v.data import AudioLoaderOptions, audio_train_loader
from d2v.data.prepare import main as prepare_main
from d2v.data.prepare_audio import prepare_audio
from d2v.data.prepare_image import prepare_image
from d2v.data.shards import expand_pattern, iter_samples, load_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = AudioFeatureConfig().conv_layers  # the reference's waveform encoder: 400 samples make one frame


def _png(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(path)


def _samples(out):
    return [(k, f) for p in sorted(out.glob("*.tar")) for k, f in iter_samples(str(p))]


def test_image_paths_that_sanitize_alike_stay_separate_samples(tmp_path):
    # The first three all read c_a_b_png once dots and slashes become underscores.
    rels = ["c/a.b.png", "c/a_b.png", "c_a/b.png", "c/x.png", "c_a/y.png", "c_a/z.png"]
    for i, rel in enumerate(rels):
        _png(str(tmp_path / "src" / rel), i)
    runs = []
    for name in ("out", "again"):
        report = prepare_image(str(tmp_path / "src"), str(tmp_path / name), samples_per_shard=4, val_fraction=0.0)
        assert report["samples"] == {"train": 6} and not report["skipped"]
        samples = _samples(tmp_path / name)
        keys = [k for k, _ in samples]
        assert len(keys) == 6 and len(set(keys)) == 6
        paths = {k: json.loads(f["json"])["path"] for k, f in samples}
        assert sorted(paths.values()) == sorted(os.path.join(*r.split("/")) for r in rels)
        listed = json.load(open(tmp_path / name / "lengths.json"))["shards"]
        assert sorted(k for entries in listed.values() for k, _ in entries) == sorted(keys)
        load_index(expand_pattern(report["patterns"]["train"]))  # the sidecar agrees with the tars
        runs.append(paths)
    assert runs[0] == runs[1]  # the same tree gives the same keys


def test_audio_stems_that_sanitize_alike_stay_separate_samples(tmp_path):
    for rel in ("a/x.y.wav", "a/x_y.wav", "b/x.y.wav"):
        os.makedirs(os.path.dirname(tmp_path / "src" / rel), exist_ok=True)
        sf.write(str(tmp_path / "src" / rel), np.zeros(800, np.float32), 16_000)
    prepare_audio(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=10, val_fraction=0.0)
    samples = _samples(tmp_path / "out")
    assert len({k for k, _ in samples}) == 3
    assert sorted(json.loads(f["json"])["source"] for _, f in samples) == sorted(
        os.path.join(*r.split("/")) for r in ("a/x.y.wav", "a/x_y.wav", "b/x.y.wav"))


@pytest.fixture
def audio_shard(tmp_path):
    """One shard of 25 utterances of 4,000-8,000 samples (16 kHz) and its lengths.json."""
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i in range(25):
        wav = 0.1 * rng.standard_normal(int(rng.integers(4_000, 8_001))).astype(np.float32)
        sf.write(str(tmp_path / "src" / f"u{i:02d}.wav"), wav, 16_000)
    out = tmp_path / "out"
    prepare_audio(str(tmp_path / "src"), str(out), samples_per_shard=25, val_fraction=0.0)
    return out / "train-000000.tar", out / "lengths.json"


def _rewrite(sidecar, edit):
    table = json.load(open(sidecar))
    edit(table["shards"]["train-000000.tar"])
    json.dump(table, open(sidecar, "w"))


@pytest.mark.parametrize("lie", ["half listed", "renamed", "listed twice"])
def test_a_sidecar_that_disagrees_with_its_shard_is_refused_at_start(audio_shard, lie):
    shard, sidecar = audio_shard
    assert load_index([str(shard)]).num_samples == 25

    def edit(entries):
        if lie == "half listed":
            del entries[12:]  # the byte size stays right: only the tar headers tell
        elif lie == "renamed":
            entries[3][0] = "someone_else"
        else:
            entries.extend(entries)

    _rewrite(sidecar, edit)
    what = {"half listed": "holds 25 samples but .* lists 12", "renamed": "sample 3 is 'u03' in the tar but "
            "'someone_else' in", "listed twice": "holds 25 samples but .* lists 50"}[lie]
    with pytest.raises(ValueError, match=f"shard {shard} {what}.*re-run prepare"):
        load_index([str(shard)])


@pytest.mark.parametrize("pad", [False, True])
def test_a_sample_longer_than_its_sidecar_claims_is_counted_not_batched(audio_shard, pad):
    shard, sidecar = audio_shard
    liars = {f"u{i:02d}" for i in range(0, 25, 2)}

    def edit(entries):
        for entry in entries:
            if entry[0] in liars:
                entry[1] = 1_000  # a tenth of the audio or less: 16 of them "fit" the budget

    _rewrite(sidecar, edit)
    budget = 16_000
    options = AudioLoaderOptions(sample_rate=16_000, min_sample_size=800, max_sample_size=budget,
                                 max_samples_per_batch=budget, normalize=True, pad=pad, conv_layers=CONV,
                                 length_multiple=0, bucket_buffer=32)
    loader = audio_train_loader(str(shard), options)
    batches = list(loader)
    assert batches and all(b.source.numel() <= budget for b in batches)
    real = [k for b in batches if b.extras["weight"] > 0 for k in b.keys]
    assert sorted(real) == sorted(f"u{i:02d}" for i in range(25) if f"u{i:02d}" not in liars)
    assert loader.stats["corrupt"] == len(liars) and loader.stats["longer_than_sidecar"] == len(liars)


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("alpha beta gamma\n\ndelta epsilon zeta\n\neta theta iota\n")
    return corpus


def _cli(*args, **env):
    proc = subprocess.run([sys.executable, "-m", "d2v.data.prepare", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("name", ["tokenizer.json", "spm.model"])
def test_cli_garbage_tokenizer_is_one_error_line(tmp_path, name):
    garbage = tmp_path / name
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    err = _cli("text", _corpus(tmp_path), tmp_path / "out", "--tokenizer", garbage)
    assert str(garbage) in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was touched


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_cli_missing_source_is_one_error_line(tmp_path, modality):
    extra = ["--vocab-size", "40"] if modality == "text" else []
    err = _cli(modality, tmp_path / "nowhere", tmp_path / "out", *extra)
    assert str(tmp_path / "nowhere") in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_output_is_one_error_line(tmp_path):
    _png(str(tmp_path / "src" / "c" / "a.png"), 0)
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o555)
    try:
        err = _cli("image", tmp_path / "src", tmp_path / "out")
    finally:
        os.chmod(tmp_path / "out", 0o755)
    assert f"output folder {tmp_path / 'out'} is not writable" in err


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The same check as a process that permissions stop (root is not stopped, so it is simulated)."""
    import tempfile

    import d2v.data.prepare_image as prepare_image_module

    _png(str(tmp_path / "src" / "c" / "a.png"), 0)
    (tmp_path / "out").mkdir()

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def no_work(*args, **kwargs):
        raise AssertionError("scanned the source before checking the output folder")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(prepare_image_module, "scan_tree", no_work)
    assert prepare_main(["image", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output folder {tmp_path / 'out'} is not writable (Permission denied)")


def test_a_full_disk_names_the_folder(tmp_path, monkeypatch, capsys):
    for i in range(3):
        _png(str(tmp_path / "src" / "c" / f"{i}.png"), i)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    assert prepare_main(["image", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on the device holding {tmp_path / 'out'}")
    assert len(err.strip().splitlines()) == 1


def test_d2v_traceback_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv("D2V_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_main(["image", str(tmp_path / "nowhere"), str(tmp_path / "out")])
