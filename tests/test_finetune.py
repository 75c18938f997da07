"""Fine-tuning (README, fine-tuning): CTC loss and greedy decoding against hand-computed values,
WER/CER against hand counts, the ImageFolder/TSV readers and their errors, and short in-process
DeepSpeed runs whose loss falls for every task; one 2-rank launch of launchers/finetune.py."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2v.finetune.ctc import CharVocab, ctc_loss, greedy_decode
from d2v.finetune.metrics import cer, edit_distance, wer, word_errors

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = CharVocab(["<blank>", "|", "A", "B"])


# -- CTC ---------------------------------------------------------------------------------------
def _logits(rows):
    """Logits whose softmax is exactly the given per-frame probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log().unsqueeze(0)


def test_greedy_decode_merges_repeats_drops_blanks_and_ignores_padding():
    one_hot = lambda i: [0.9 if j == i else 0.1 / 3 for j in range(4)]
    # frames: A A blank A | B B blank | <pad frames argmax A>; -> "AA B"
    frames = [2, 2, 0, 2, 1, 3, 3, 0, 1, 2, 2]
    logits = _logits([one_hot(i) for i in frames])
    assert greedy_decode(logits, torch.tensor([8]), VOCAB) == ["AA B"]
    assert greedy_decode(logits, torch.tensor([11]), VOCAB) == ["AA B A"]


def test_ctc_loss_matches_hand_computed_paths():
    # Vocabulary {blank, |, A, B}; target "A" over 2 frames: paths AA, A-, -A.
    p = [[0.5, 0.1, 0.3, 0.1], [0.2, 0.1, 0.6, 0.1]]
    prob = p[0][2] * p[1][2] + p[0][2] * p[1][0] + p[0][0] * p[1][2]
    got = ctc_loss(_logits(p), torch.tensor([2]), [[2]])
    assert float(got) == pytest.approx(-math.log(prob), rel=1e-6)  # the loss runs in fp32
    # Target "AA" over 3 frames: only A - A; mean reduction divides by the 2 labels.
    q = [[0.1, 0.1, 0.7, 0.1], [0.6, 0.2, 0.1, 0.1], [0.3, 0.1, 0.5, 0.1]]
    got = ctc_loss(_logits(q), torch.tensor([3]), [[2, 2]])
    assert float(got) == pytest.approx(-math.log(0.7 * 0.6 * 0.5) / 2, rel=1e-6)  # the loss runs in fp32


def test_char_vocab_from_transcripts_and_bad_characters():
    vocab = CharVocab.from_transcripts(["it's a cat", "BAT"])
    assert vocab.symbols == ["<blank>", "|", "'", "A", "B", "C", "I", "S", "T"]
    assert vocab.decode(vocab.encode("A  cat")) == "A CAT"
    with pytest.raises(ValueError, match=r"\['3'\].*outside the CTC alphabet"):
        vocab.encode("3 cats")
    with pytest.raises(ValueError, match=r"\['Z'\] .*not in the vocabulary"):
        vocab.encode("ZAT")


# -- WER / CER ---------------------------------------------------------------------------------
def test_edit_distance_and_error_rates_against_hand_counts():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert wer(["the cat sat"], ["the bat sat on"]) == pytest.approx(2 / 3)   # 1 substitution + 1 insertion
    assert wer(["a b c d"], ["a c d"]) == pytest.approx(1 / 4)                # 1 deletion
    # Corpus level: edits and reference words are summed before dividing.
    assert wer(["the cat sat", "a b c d"], ["the bat sat on", "a c d"]) == pytest.approx(3 / 7)
    assert word_errors(["x y"], [""]) == (2, 2)
    assert cer(["abc", "ab"], ["abd", "ab"]) == pytest.approx(1 / 5)
    assert cer(["a b"], ["a  b"]) == 0.0  # whitespace runs are one space


def test_error_rate_refuses_empty_reference_and_unpaired_lists():
    with pytest.raises(ValueError, match="reference 1 is empty"):
        wer(["a", "  "], ["a", "b"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        cer(["a", "b"], ["a"])


# -- readers -----------------------------------------------------------------------------------
def _png(path, value):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_imagefolder_reader_and_its_errors(tmp_path):
    from d2v.data.imagefolder import read_imagefolder

    for cls, value in (("cat", 10), ("dog", 240)):
        for i in range(2):
            _png(str(tmp_path / "train" / cls / f"{i}.png"), value)
    x, y, names = read_imagefolder(str(tmp_path / "train"), 16, (0.5,) * 3, (0.25,) * 3)
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1] and x.shape == (4, 3, 16, 16)
    assert float(x[0].mean()) == pytest.approx((10 / 255 - 0.5) / 0.25, abs=1e-5)
    _png(str(tmp_path / "val" / "dog" / "0.png"), 200)
    _, y, _ = read_imagefolder(str(tmp_path / "val"), 16, (0.5,) * 3, (0.25,) * 3, classes=names)
    assert y.tolist() == [1]  # the training tree's label index, not the evaluation tree's
    _png(str(tmp_path / "bad" / "cow" / "0.png"), 0)
    with pytest.raises(ValueError, match=r"classes \['cow'\] are not among the training classes"):
        read_imagefolder(str(tmp_path / "bad"), 16, (0.5,) * 3, (0.25,) * 3, classes=names)
    os.makedirs(tmp_path / "train" / "empty")
    with pytest.raises(ValueError, match="class folder .*empty is empty"):
        read_imagefolder(str(tmp_path / "train"), 16, (0.5,) * 3, (0.25,) * 3)
    os.rmdir(tmp_path / "train" / "empty")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        read_imagefolder(str(tmp_path / "train"), 16, (0.5,) * 3, (0.25,) * 3)
    os.remove(tmp_path / "train" / "cat" / "notes.txt")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        read_imagefolder(str(tmp_path / "train"), 16, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(FileNotFoundError):
        read_imagefolder(str(tmp_path / "missing"), 16, (0.5,) * 3, (0.25,) * 3)


def test_tsv_reader_and_its_errors(tmp_path):
    from d2v.data.labelled_text import read_tsv

    good = tmp_path / "train.tsv"
    good.write_text("a red apple\tfruit\n\nsome kale\tveg\nbanana\tfruit\n")
    texts, y, names = read_tsv(str(good))
    assert texts == ["a red apple", "some kale", "banana"] and y == [0, 1, 0] and names == ["fruit", "veg"]
    ev = tmp_path / "eval.tsv"
    ev.write_text("kale again\tveg\n")
    assert read_tsv(str(ev), labels=names)[1] == [1]
    ev.write_text("granite\tmineral\n")
    with pytest.raises(ValueError, match=r"labels \['mineral'\] are not among the training labels"):
        read_tsv(str(ev), labels=names)
    ev.write_text("ok\tfruit\nno tab here\n")
    with pytest.raises(ValueError, match=r"eval.tsv:2: expected `text<TAB>label`, found 0 tabs"):
        read_tsv(str(ev))
    ev.write_text("text\t \n")
    with pytest.raises(ValueError, match=r"eval.tsv:1: empty label"):
        read_tsv(str(ev))


def test_rank_batches_are_disjoint_equal_and_seeded():
    from d2v.finetune.runner import rank_batches

    a = rank_batches(23, 4, 0, 2, seed=3, epoch=0)
    b = rank_batches(23, 4, 1, 2, seed=3, epoch=0)
    assert len(a) == len(b) == 2 and all(len(x) == 4 for x in a + b)
    flat = [i for x in a + b for i in x]
    assert len(set(flat)) == 16
    assert a == rank_batches(23, 4, 0, 2, seed=3, epoch=0) != rank_batches(23, 4, 0, 2, seed=3, epoch=1)
    with pytest.raises(ValueError, match="lower train.micro_batch_size"):
        rank_batches(5, 4, 0, 2, seed=0, epoch=0)


# -- tiny fine-tuning runs (one process, DeepSpeed engine) ---------------------------------------
def _asr_shards(root):
    """Two 'words' as tones of different pitch; transcripts name them."""
    import soundfile

    from d2v.data.prepare_audio import prepare_audio

    rate, rng = 16_000, np.random.default_rng(0)
    tones = {"A": 440.0, "B": 1200.0}
    for split, n in (("tr", 8), ("ev", 4)):
        folder = os.path.join(root, "raw", f"{split}spk", "1")
        os.makedirs(folder)
        lines = []
        for i in range(n):
            word = "".join(rng.choice(list(tones), 3))
            t = np.arange(int(0.2 * rate)) / rate
            wav = np.concatenate([0.5 * np.sin(2 * np.pi * tones[c] * t) for c in word]).astype(np.float32)
            soundfile.write(os.path.join(folder, f"{split}spk-1-{i:04d}.flac"), wav, rate)
            lines.append(f"{split}spk-1-{i:04d} {' '.join(word)}")
        with open(os.path.join(folder, f"{split}spk-1.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    totals = prepare_audio(os.path.join(root, "raw"), os.path.join(root, "shards"), samples_per_shard=8,
                           val_speakers=["evspk"])["totals"]
    return totals["train"]["pattern"], totals["val"]["pattern"]


def _image_tree(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for cls, base in (("dark", 40), ("light", 200)):
            for i in range(n):
                _png(os.path.join(root, split, cls, f"{i}.png"), int(base + rng.integers(-30, 30)))
    return os.path.join(root, "train"), os.path.join(root, "val")


def _text_files(root):
    from d2v.data.tokenizer import Tokenizer, train_sentencepiece

    fruit = ["apples and pears are sweet", "a ripe banana", "fresh cherries and plums", "sweet apples"]
    tools = ["a hammer and nails", "the saw cuts wood", "nails and screws", "a heavy hammer"]
    os.makedirs(root)
    model = train_sentencepiece(fruit * 4 + tools * 4, os.path.join(root, "spm"), 40)
    for split in ("train", "test"):
        with open(os.path.join(root, f"{split}.tsv"), "w") as f:
            f.writelines(f"{s}\tfruit\n" for s in fruit)
            f.writelines(f"{s}\ttools\n" for s in tools)
    return os.path.join(root, "train.tsv"), os.path.join(root, "test.tsv"), model, Tokenizer(model).info.vocab_size


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    asr = _asr_shards(str(root / "asr"))
    image = _image_tree(str(root / "img"))
    tr, te, model, vocab = _text_files(str(root / "txt"))
    return {
        "asr": ("audio_tiny", [f"finetune.train_data={asr[0]}", f"finetune.eval_data={asr[1]}",
                               "train.micro_batch_size=4"]),
        "image_cls": ("image_tiny", [f"finetune.train_data={image[0]}", f"finetune.eval_data={image[1]}",
                                     "train.micro_batch_size=8"]),
        "text_cls": ("text_tiny", [f"finetune.train_data={tr}", f"finetune.eval_data={te}",
                                   f"finetune.tokenizer={model}", f"model.text.vocab_size={vocab}",
                                   "train.micro_batch_size=8"]),
        "root": str(root),
    }


def _run_cfg(task, task_data, tmp, *extra):
    from d2v.finetune.resolve import resolve_finetune

    preset, overrides = task_data[task]
    cfg, _ = resolve_finetune(task, preset=preset, overrides=[
        *overrides, f"train.out_dir={tmp}", "optim.schedule=constant", "optim.lr=2e-3", "train.max_steps=40",
        "model.dropout=0.0", "model.attention_dropout=0.0", "model.image.drop_path=0.0", *extra])
    return cfg


def _run(task, task_data, tmp, *extra):
    from d2v.config import load_template
    from d2v.finetune.runner import FinetuneRun

    torch.set_num_threads(2)
    return FinetuneRun(_run_cfg(task, task_data, tmp, *extra), load_template(os.path.join(ROOT, "ds_configs", "cpu.json")),
                       random_init=True)


@pytest.mark.parametrize("task", ["asr", "image_cls", "text_cls"])
def test_a_few_steps_on_one_batch_reduce_the_loss(task, task_data, tmp_path):
    run = _run(task, task_data, str(tmp_path))
    indices = list(range(run.cfg.train.micro_batch_size))
    losses = [run.train_step(indices) for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_freezing_keeps_conv_encoder_and_backbone_fixed_then_releases_it(task_data, tmp_path):
    run = _run("asr", task_data, str(tmp_path), "finetune.freeze_encoder_steps=3")
    model = run.model
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        run.train_step([0, 1, 2, 3])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    assert moved == {"head.weight", "head.bias"}, sorted(moved)
    run.train_step([0, 1, 2, 3])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    assert "backbone.encoder.blocks.0.ffn.fc1.weight" in moved and "backbone.frontend.projection.weight" in moved
    assert not any(n.startswith("backbone.frontend.conv_layers") for n in moved)


def test_full_run_evaluates_and_checkpoints(task_data, tmp_path):
    run = _run("image_cls", task_data, str(tmp_path), "train.max_steps=12", "train.log_every=4")
    result = run.train()
    assert result["steps"] == 12 and result["last_loss"] < result["first_loss"]
    assert result["metrics"]["accuracy"] == 1.0  # dark versus light patches
    saved = json.load(open(tmp_path / "finetune.json"))
    assert saved["labels"] == ["dark", "light"] and saved["config"]["task"] == "image_cls"
    assert json.load(open(tmp_path / "config.json"))["train"]["max_steps"] == 12
    assert os.path.isdir(os.path.join(result["checkpoint"]))


def _losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run.out_dir, "metrics.jsonl"))
            if '"split": "train"' in line]


def test_fine_tuning_runs_on_the_pretraining_loop_resume_preemption_and_nan_skips(task_data, tmp_path):
    """Fine-tuning gets what pretraining has: a resume inside an epoch repeats the uninterrupted
    run exactly (dropout on), a preemption request ends in a checkpoint, a NaN window is skipped
    on every rank without touching the weights, and a fresh run will not replace checkpoints."""
    extra = ["train.max_steps=10", "train.log_every=1", "train.save_every=3", "finetune.head_dropout=0.2",
             "model.dropout=0.1", "train.micro_batch_size=2"]
    full = _run("text_cls", task_data, str(tmp_path / "full"), *extra)
    full.train()
    first = _run("text_cls", task_data, str(tmp_path / "resumed"), *extra)
    assert first.stream.steps_per_epoch == 4  # 8 examples / 2: step 5 is inside an epoch
    first.train(max_steps=5)
    with pytest.raises(FileExistsError, match="--resume auto"):
        _run("text_cls", task_data, str(tmp_path / "resumed"), *extra)
    from d2v.config import load_template
    from d2v.finetune.runner import FinetuneRun

    second = FinetuneRun(first.cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True,
                         resume="auto")
    assert second.step == 5
    result = second.train()
    assert _losses(full) == _losses(second) and result["steps"] == 10  # rows 1-5 then 6-10 in the same file
    assert open(tmp_path / "resumed" / "checkpoints" / "latest").read().strip() == "step_00000010"
    again = FinetuneRun(first.cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True,
                        resume="auto").train()  # already at max_steps: evaluates only
    assert again["steps"] == 10 and again["first_loss"] is None and again["metrics"] == result["metrics"]
    other = [o for o in extra] + [f"finetune.train_data={first.cfg.finetune.eval_data}"]
    with pytest.raises(FileExistsError, match="holds a different fine-tuning run .*train_data"):
        FinetuneRun(_run_cfg("text_cls", task_data, str(tmp_path / "resumed"), *other),
                    load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True, resume="auto")

    run = _run("text_cls", task_data, str(tmp_path / "nan"), "train.max_steps=4", "train.log_every=1")
    weights = [p.detach().clone() for p in run.model.parameters()]
    real = run.task.loss
    run.task.loss = lambda out, batch: real(out, batch) * float("nan")
    assert np.isnan(run.train_step([0, 1, 2, 3]))
    assert run.step == 0 and run.stepper.skipped_steps == 1
    from d2v.finetune.unit import DownstreamUnit
    from d2v.train.stepper import Stepper

    assert isinstance(run.stepper, Stepper) and isinstance(run.stepper.unit, DownstreamUnit)
    assert all(torch.equal(a, b) for a, b in zip(weights, run.model.parameters()))
    run.task.loss = real
    run.preemption.requested = True  # as the signal handler leaves it
    result = run.train()
    assert result["preempted"] and result["steps"] == 1
    assert open(tmp_path / "nan" / "checkpoints" / "latest").read().strip() == "step_00000001"
    assert len(_losses(run)) == 1  # the step that stopped the run is still logged


def test_two_rank_launch_of_the_launcher(task_data, tmp_path):
    from launch import free_port as _port

    preset, overrides = task_data["text_cls"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), os.path.join(ROOT, "launchers", "finetune.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--task", "text_cls", "--preset", preset,
           "--out", str(tmp_path), *[o.replace("train.micro_batch_size=8", "train.micro_batch_size=4") for o in overrides],
           "train.max_steps=6", "train.log_every=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 6 and result["eval_examples"] == 8 and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [3, 6]
    assert os.path.isdir(tmp_path / "checkpoints" / "step_00000006")


# -- config and labelled demo builders --------------------------------------------------------------
def test_config_errors_name_what_to_change():
    from d2v.finetune.resolve import resolve_finetune

    with pytest.raises(ValueError, match="task asr needs a audio model, the encoder is image"):
        resolve_finetune("asr", preset="image_tiny", overrides=["finetune.train_data=x", "finetune.eval_data=y"])
    with pytest.raises(ValueError, match="--train-data and --eval-data"):
        resolve_finetune("image_cls", preset="image_tiny")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_finetune("segmentation", preset="image_tiny")
    with pytest.raises(KeyError, match="did you mean freeze_encoder_steps"):
        resolve_finetune("asr", preset="audio_tiny", overrides=["finetune.freeze_encoder_step=3"])


def test_text_cls_demo_is_balanced_with_disjoint_splits(tmp_path):
    from d2v.data.demo_text_cls import TOPICS, build_text_cls_demo
    from d2v.data.labelled_text import read_tsv

    info = build_text_cls_demo(str(tmp_path), per_class=40)
    train, train_y, names = read_tsv(info["paths"]["train"])
    test, test_y, _ = read_tsv(info["paths"]["test"], labels=names)
    assert sorted(names) == sorted(TOPICS) and len(train) == 6 * 30 and len(test) == 6 * 10
    assert np.bincount(test_y).tolist() == [10] * 6
    assert not set(train) & set(test)


def test_asr_demo_holds_out_voices_and_sentences(tmp_path):
    pytest.importorskip("espeakng_loader", reason="the speech demo needs the `demo` extra (espeakng-loader)")
    from d2v.data.demo_asr import make_asr_demo
    from d2v.data.transcribed import read_transcribed

    totals = make_asr_demo(str(tmp_path), train_utterances=6, eval_utterances=4, held_out=["en-gb-scotland"])
    train, val = read_transcribed(totals["train"]["pattern"]), read_transcribed(totals["val"]["pattern"])
    assert len(train) == 6 and len(val) == 4
    assert all(u.key.startswith("engbscotland") for u in val) and not any(u.key.startswith("engbscotland") for u in train)
    assert not {u.text for u in train} & {u.text for u in val}
    CharVocab.from_transcripts(u.text for u in train + val)  # every transcript is in the CTC alphabet


@pytest.mark.parametrize("preset", [p for p in __import__("d2v.config", fromlist=["x"]).list_presets() if "tiny" in p])
def test_task_model_drops_pretraining_parts_and_shapes_outputs(preset):
    from d2v.config import get_preset
    from d2v.finetune.model import FinetuneModel, FrameHead, MeanPoolHead
    from d2v.models import build_model

    cfg = get_preset(preset)
    m = cfg.model
    torch.manual_seed(0)
    head = (FrameHead if m.modality == "audio" else MeanPoolHead)(m.embed_dim, 5)
    model = FinetuneModel(build_model(cfg), head).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("backbone.head.", "backbone.mask_embedding", "backbone.decoder.")) for n in names)
    if m.modality == "audio":
        out = model(torch.randn(2, 16_000), torch.tensor([16_000, 8_000]))
        assert out.logits.shape == (2, 49, 5) and out.padding_mask[1].sum() == 49 - 24  # 8,000 samples: 24 frames
    elif m.modality == "image":
        assert model(torch.randn(2, 3, m.image.image_size, m.image.image_size)).logits.shape == (2, 5)
    else:
        tokens = torch.tensor([[0, 10, 11, 2], [0, 12, 2, m.text.pad_id]])
        full = model(tokens).logits
        # Padding does not change a row's pooled output: row 1 alone, unpadded, gives the same logits.
        assert torch.allclose(full[1], model(tokens[1:, :3]).logits[0], atol=1e-5)


def test_init_from_a_transformers_directory_loads_the_backbone(tmp_path):
    """--init accepts `export --format hf` output (and public weights) with interop's key checks."""
    import torch

    from d2v.config import get_preset
    from d2v.finetune.config import is_transformers_dir, read_pretrain_config
    from d2v.finetune.model import load_backbone
    from d2v.interop import write_hf
    from d2v.models import build_model

    cfg = get_preset("image_tiny")
    torch.manual_seed(3)
    source = build_model(cfg)
    write_hf(str(tmp_path / "hf"), cfg, source.state_dict())
    assert is_transformers_dir(str(tmp_path / "hf"))
    base = read_pretrain_config(str(tmp_path / "hf"))
    assert base.model.embed_dim == cfg.model.embed_dim and base.model.depth == cfg.model.depth
    loaded = load_backbone(str(tmp_path / "hf"), base.model, random_init=False, seed=0)
    want = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)


def test_the_shard_probe_reads_labels_and_separates_two_colours(tmp_path, capsys):
    # Red and blue squares: any encoder (pretrained or random) separates them, so both rows must
    # reach 100 %; wrong labels or features that ignore the image would not.
    from PIL import Image
    from safetensors.torch import save_file

    from d2v.__main__ import main as d2v_main
    from d2v.config import get_preset, to_dict
    from d2v.data.prepare_image import prepare_image
    from d2v.models import build_model

    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        os.makedirs(tmp_path / "tree" / name)
        for i in range(12):
            pixels = rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)
            pixels[..., channel] = 200 + rng.integers(0, 55, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / name / f"{i}.png")
    report = prepare_image(str(tmp_path / "tree"), str(tmp_path / "shards"), samples_per_shard=10, val_fraction=0.25)
    cfg = get_preset("image_tiny")
    torch.manual_seed(0)
    student = build_model(cfg)
    export = tmp_path / "export"
    os.makedirs(export)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(export / "student.safetensors"))
    save_file({"x": torch.zeros(1)}, str(export / "teacher.safetensors"))
    (export / "config.json").write_text(json.dumps(to_dict(cfg)))
    d2v_main(["probe", str(export), "--data", report["patterns"]["train"], "--val-data", report["patterns"]["valid"],
              "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["train_images"], result["val_images"], result["classes"]) == (18, 6, 2)
    assert result["accuracy"] == {"pretrained": 1.0, "random init": 1.0}


def test_no_library_code_compares_a_task_name():
    """A downstream task is chosen through its registered class only: no `== "asr"` or `in
    ("image_cls", ...)` anywhere in the library, so adding a task is one class."""
    import ast
    import pathlib

    from d2v.finetune.tasks import TASKS

    root = pathlib.Path(__file__).resolve().parents[1] / "d2v"
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                consts = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in TASKS]
                found += [f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}" for _ in consts[:1]]
    assert not found, found
    assert {c.modality for c in TASKS.values()} <= {"audio", "image", "text"}
