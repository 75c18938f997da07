"""Speech recognition end to end at demo scale: the eSpeak demo (held-out voices) with its LM,
a 2-rank launch of launchers/finetune.py with a fairseq recipe (masking, LayerDrop, frozen
feature encoder, head-only warm-up, batches by audio length), two named evaluation sets, greedy and
LM beam-search WER/CER."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_rank_recipe_run_with_lm_decoding_on_the_speech_demo(tmp_path):
    pytest.importorskip("espeakng_loader", reason="the speech demo needs the `demo` extra (espeakng-loader)")
    from launch import free_port

    from d2v.data.demo_asr import make_asr_demo
    from d2v.data.arpa import read_arpa

    data = tmp_path / "data"
    totals = make_asr_demo(str(data), train_utterances=16, eval_utterances=6, held_out=["en-gb-scotland"])
    lm = read_arpa(str(data / "lm.arpa"))
    assert lm.order == 4 and len(lm.vocab) > 100
    held_out_texts = {" ".join(line.split()[1:]) for f in (data / "raw").glob("engbscotland*/1/*.trans.txt")
                      for line in f.read_text().splitlines()}
    lm_text = set((data / "lm_text.txt").read_text().splitlines())
    assert held_out_texts and not held_out_texts & lm_text  # the LM never saw an evaluation sentence

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = tmp_path / "run"
    eval_data = f"held_out={totals['val']['pattern']};seen={totals['train']['pattern']}"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launchers", "finetune.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--task", "asr", "--preset", "audio_tiny",
           "--recipe", "base_10m", "--train-data", totals["train"]["pattern"], "--eval-data", eval_data,
           "--out", str(out), "train.max_steps=8", "finetune.freeze_encoder_steps=3", "finetune.max_tokens=160000",
           "optim.lr=2e-3", "finetune.mask_channel_length=8", "train.log_every=4", "finetune.eval_batch_size=4",
           f"finetune.decode.lm={data / 'lm.arpa'}", "finetune.decode.beam=8", "finetune.decode.beam_size_token=6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 8 and result["eval_examples"] == 6 + 16
    metrics = result["metrics"]
    assert set(metrics) == {f"{s}/{m}{a}" for s in ("held_out", "seen") for m in ("wer", "cer") for a in ("", "_lm")}
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values()), metrics
    saved = json.load(open(out / "finetune.json"))["config"]
    assert saved["finetune"]["recipe"] == "base_10m" and saved["finetune"]["mask_prob"] == 0.65
    assert saved["model"]["layerdrop"] == 0.1 and saved["finetune"]["letters"] == "fairseq"
    assert saved["finetune"]["max_tokens"] == 160000 and saved["finetune"]["ctc_reduction"] == "sentence"
    assert json.load(open(out / "finetune.json"))["labels"][:3] == ["<blank>", "|", "E"]
