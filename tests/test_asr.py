"""Speech-recognition recipe pieces: `prepare asr` on synthetic trees in the Libri-light and
LibriSpeech layouts, the fine-tuning presets against a table typed from fairseq's files, feature
masking while training only, several named evaluation sets, and the fairseq letter dictionary."""
import json
import os

import numpy as np
import pytest
import soundfile
import torch

from d2v.data.prepare_asr import prepare_asr

RATE = 16_000


def _chapter(folder, speaker, chapter, texts, rate=RATE, seed=0):
    """SPK/CHAP/SPK-CHAP-NNNN.flac with a SPK-CHAP.trans.txt (None: no transcript line)."""
    path = os.path.join(folder, str(speaker), str(chapter))
    os.makedirs(path)
    rng = np.random.default_rng(seed + speaker)
    lines = []
    for i, text in enumerate(texts):
        utt = f"{speaker}-{chapter}-{i:04d}"
        soundfile.write(os.path.join(path, f"{utt}.flac"), 0.1 * rng.standard_normal(rate // 10), rate)
        if text is not None:
            lines.append(f"{utt} {text}")
    with open(os.path.join(path, f"{speaker}-{chapter}.trans.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _tree(root):
    """Libri-light's librispeech_finetuning (speaker = 100·fold + 10·kind + 1; 9h: 900 + kind) and
    LibriSpeech's dev/test sets (speaker 7000 + set)."""
    ft = os.path.join(root, "librispeech_finetuning")
    for fold in range(6):
        for k, kind in enumerate(("clean", "other")):
            _chapter(os.path.join(ft, "1h", str(fold), kind), 100 * fold + 10 * k + 1, 5, ["HELLO WORLD", "IT'S ME"])
    for k, kind in enumerate(("clean", "other")):
        _chapter(os.path.join(ft, "9h", kind), 900 + k, 7, ["NINE HOURS"] * 3)
    for s, name in enumerate(("dev-clean", "dev-other", "test-clean", "test-other")):
        _chapter(os.path.join(root, "LibriSpeech", name), 7000 + s, 1, ["A TEST", None, "ROOM 101"], rate=8000)
    return root


def _read(pattern):
    from d2v.data.transcribed import read_transcribed

    return read_transcribed(pattern)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _tree(str(tmp_path_factory.mktemp("asr_tree")))


@pytest.mark.parametrize("split,fold,speakers", [
    ("10m", 2, {201, 211}),
    ("1h", 0, {100 * f + 10 * k + 1 for f in range(6) for k in range(2)}),
    ("10h", 0, {100 * f + 10 * k + 1 for f in range(6) for k in range(2)} | {900, 901}),
])
def test_prepare_limited_supervision_splits_and_dev_test_sets(tree, tmp_path, split, fold, speakers):
    report = prepare_asr(tree, str(tmp_path), train=split, fold=fold, samples_per_shard=4)
    train = _read(report["sets"]["train"]["pattern"])
    assert {int(u.key.split("-")[0]) for u in train} == speakers
    assert len(train) == sum(3 if s >= 900 else 2 for s in speakers)
    assert {u.text for u in train} <= {"HELLO WORLD", "IT'S ME", "NINE HOURS"}
    assert set(report["sets"]) == {"train", "dev_clean", "dev_other", "test_clean", "test_other"}
    for name in ("dev_clean", "test_other"):
        s = report["sets"][name]
        # One file has no transcript line and one says "ROOM 101": both skipped, with reasons.
        assert s["utterances"] == 1 and len(s["skipped"]) == 2
        assert {"no transcript" in k["reason"] or "outside the CTC alphabet" in k["reason"] for k in s["skipped"]} \
            == {True}
        (utt,) = _read(s["pattern"])
        assert utt.text == "A TEST" and len(utt.wav) == RATE // 10  # 8 kHz resampled to 16 kHz
    sets = json.load(open(tmp_path / "asr_sets.json"))
    assert sets["train"] == report["sets"]["train"]["pattern"]
    assert sets["eval_data"].split(";")[0] == f"dev_clean={report['sets']['dev_clean']['pattern']}"


def test_prepare_names_what_is_missing(tree, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    shutil.rmtree(broken / "librispeech_finetuning" / "1h" / "3" / "other")
    with pytest.raises(ValueError, match=r"1h/3/other is missing \(1 of 12 folders of the 1h split\)"):
        prepare_asr(str(broken), str(tmp_path / "o1"), train="1h")
    prepare_asr(str(broken), str(tmp_path / "o2"), train="10m", fold=2, eval_sets=())  # fold 3 not needed
    with pytest.raises(ValueError, match="no LibriSpeech/dev-bogus/"):
        prepare_asr(tree, str(tmp_path / "o3"), train=None, eval_sets=["dev-bogus"])
    with pytest.raises(ValueError, match="folds 0..5"):
        prepare_asr(tree, str(tmp_path / "o4"), train="10m", fold=6)
    from d2v.data.prepare import main

    assert main(["asr", str(tmp_path / "nowhere"), str(tmp_path / "o5")]) == 2  # one error line, exit 2


# -- presets against fairseq's files ------------------------------------------------------------
# Typed from facebookresearch/fairseq examples/wav2vec/config/finetuning/base_{10m,1h,10h,100h,960h}.yaml
# at commit 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99
# (https://github.com/facebookresearch/fairseq/tree/3d262bb2/examples/wav2vec/config/finetuning);
# the fields the files leave out are fairseq's defaults (wav2vec2_asr.py: mask_length 10, dropout 0,
# attention_dropout 0, final_dropout 0; tri_stage: init_lr_scale 0.01; dataclass/configs.py: clip_norm 0).
FAIRSEQ = {
    #            lr     max_update mask_prob chan_prob layerdrop freeze_updates
    "base_10m": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
    "base_1h": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
    "base_10h": (5e-5, 20_000, 0.65, 0.5, 0.05, 10_000),
    "base_100h": (3e-5, 80_000, 0.65, 0.5, 0.1, 0),
    "base_960h": (1e-4, 320_000, 0.5, 0.1, 0.1, 0),
}
SHARED = {"adam_betas": (0.9, 0.98), "adam_eps": 1e-8, "phase_ratio": (0.1, 0.4, 0.5), "final_lr_scale": 0.05,
          "init_lr_scale": 0.01, "mask_length": 10, "mask_channel_length": 64, "activation_dropout": 0.1,
          "dropout": 0.0, "attention_dropout": 0.0, "final_dropout": 0.0, "feature_grad_mult": 0.0,
          "clip_norm": 0.0, "sentence_avg": True, "max_tokens": 3_200_000}


@pytest.mark.parametrize("name", sorted(FAIRSEQ))
def test_each_recipe_holds_fairseqs_settings(name):
    from d2v.finetune.recipes import RECIPES
    from d2v.finetune.resolve import resolve_finetune

    assert {n for n, r in RECIPES.items() if r.task == "asr"} == set(FAIRSEQ)
    cfg, _ = resolve_finetune("asr", preset="audio_tiny", recipe=name,
                              overrides=["finetune.train_data=x", "finetune.eval_data=y"])
    lr, max_update, mask_prob, chan_prob, layerdrop, freeze = FAIRSEQ[name]
    o, t, m = cfg.optim, cfg.finetune, cfg.model
    assert (o.lr, cfg.train.max_steps, t.mask_prob, t.mask_channel_prob, m.layerdrop, t.freeze_encoder_steps) == \
        (lr, max_update, mask_prob, chan_prob, layerdrop, freeze)
    got = {"adam_betas": tuple(o.betas), "adam_eps": o.eps, "phase_ratio": tuple(o.phase_ratios),
           "final_lr_scale": o.final_lr_scale, "init_lr_scale": o.init_lr_scale, "mask_length": t.mask_length,
           "mask_channel_length": t.mask_channel_length, "activation_dropout": m.activation_dropout,
           "dropout": m.dropout, "attention_dropout": m.attention_dropout, "final_dropout": t.head_dropout,
           "feature_grad_mult": 0.0 if t.freeze_feature_encoder else 1.0, "clip_norm": o.clip_norm,
           "sentence_avg": t.ctc_reduction == "sentence", "max_tokens": t.max_tokens}
    assert got == SHARED
    assert (o.schedule, o.weight_decay, t.letters, t.recipe) == ("tri_stage", 0.0, "fairseq", name)


def test_recipe_by_override_then_overrides_win_and_errors():
    from d2v.finetune.resolve import resolve_finetune

    cfg, _ = resolve_finetune("asr", preset="audio_tiny", overrides=[
        "finetune.recipe=base_10h", "finetune.train_data=x", "finetune.eval_data=y", "train.max_steps=50"])
    assert (cfg.finetune.recipe, cfg.finetune.mask_channel_prob, cfg.train.max_steps) == ("base_10h", 0.5, 50)
    with pytest.raises(ValueError, match="unknown fine-tuning recipe 'base_2h'"):
        resolve_finetune("asr", preset="audio_tiny", recipe="base_2h")
    with pytest.raises(ValueError, match="recipe base_10h is for task asr, not image_cls"):
        resolve_finetune("image_cls", preset="image_tiny", recipe="base_10h")
    with pytest.raises(ValueError, match="finetune.mask_prob and finetune.mask_channel_prob must be in"):
        resolve_finetune("asr", preset="audio_tiny", overrides=["finetune.train_data=x", "finetune.eval_data=y",
                                                                "finetune.mask_prob=1.5"])
    with pytest.raises(ValueError, match="several evaluation sets are written NAME=PATTERN"):
        resolve_finetune("asr", preset="audio_tiny", overrides=["finetune.train_data=x",
                                                                "finetune.eval_data=a=p;q"])


# -- masking and LayerDrop in the model ------------------------------------------------------------
def _asr_model(masking, layerdrop=0.0):
    from d2v.config.presets import get_preset
    from d2v.finetune.model import FinetuneModel, FrameHead
    from d2v.models import build_model

    cfg = get_preset("audio_tiny")
    cfg.model.layerdrop, cfg.model.dropout, cfg.model.attention_dropout = layerdrop, 0.0, 0.0
    cfg.model.activation_dropout = 0.0
    torch.manual_seed(0)
    backbone = build_model(cfg.model)
    return FinetuneModel(backbone, FrameHead(backbone.embed_dim, 5), masking=masking)


def test_masking_applies_in_training_only_and_keeps_the_mask_embedding():
    from d2v.finetune.masking import FeatureMasking

    plain = _asr_model(None)
    assert plain.backbone.mask_embedding is None  # not fine-tuned: dropped as before
    masked = _asr_model(FeatureMasking(0.65, 2, 0.5, 4))
    masked.load_state_dict(plain.state_dict(), strict=False)
    assert masked.backbone.mask_embedding is not None
    source = torch.randn(2, 4000)
    masked.eval(), plain.eval()
    assert torch.equal(masked(source).logits, plain(source).logits)  # evaluation: no masking
    masked.train(), plain.train()
    masked.step_seed = plain.step_seed = 5
    a, b = masked(source).logits, masked(source).logits
    assert torch.equal(a, b) and not torch.allclose(a, plain(source).logits)  # seeded by the update
    masked.step_seed = 6
    assert not torch.equal(masked(source).logits, a)


def test_masks_are_drawn_as_the_reference_counts_them():
    from d2v.finetune.masking import FeatureMasking

    gen = torch.Generator().manual_seed(0)
    padding = torch.zeros(3, 200, dtype=torch.bool)
    padding[1, 150:] = True
    time, channel = FeatureMasking(0.65, 10, 0.25, 64).draw(3, 200, 768, padding, gen)
    assert not time[padding].any() and len(set(time.sum(dim=1).tolist())) == 1  # same count per row
    counts = channel.sum(dim=1)
    # int(0.25·768/64 + U) = 3 spans of 64 channels at most, overlaps merged, equal per row.
    assert len(set(counts.tolist())) == 1 and 0 < int(counts[0]) <= 192
    assert FeatureMasking(0.0, 10, 0.0, 64).active is False


def test_layerdrop_is_the_same_draw_for_the_same_update():
    model = _asr_model(None, layerdrop=0.5)
    model.train()
    source = torch.randn(1, 4000)
    model.step_seed = 11
    a = model(source).logits
    assert torch.equal(a, model(source).logits)
    outs = set()
    for seed in range(12):
        model.step_seed = seed
        outs.add(float(model(source).logits.detach().sum()))
    assert len(outs) > 1  # different updates drop different layers


def test_fairseq_letters_and_eval_set_parsing():
    from d2v.finetune.asr import parse_eval_sets
    from d2v.finetune.ctc import CharVocab

    v = CharVocab.fairseq_letters()
    assert v.symbols[:4] == ["<blank>", "|", "E", "T"] and len(v) == 29 and v.symbols[-1] == "Z"
    assert v.encode("IT'S A") == [v.index[c] for c in "IT'S"] + [1, v.index["A"]]
    assert parse_eval_sets("shards/val-{000000..000001}.tar") == [("eval", "shards/val-{000000..000001}.tar")]
    assert parse_eval_sets("dev_clean=a-{0..1}.tar; test_other=b.tar") == [("dev_clean", "a-{0..1}.tar"),
                                                                           ("test_other", "b.tar")]
    with pytest.raises(ValueError, match="names a set twice"):
        parse_eval_sets("a=x;a=y")


def test_make_eval_reports_lm_decoding_rows_and_keeps_older_results(tmp_path):
    from d2v.finetune.evaluate import data_overrides, write_results

    run = {"metrics": {"wer": 0.9, "cer": 0.5, "wer_lm": 0.7, "cer_lm": 0.45}}
    old = {"metrics": {"wer": 0.95, "cer": 0.6}}  # a run from before LM decoding
    results = {"tasks": {"asr": {"pretrained": [run, run], "random init": [run]}}}
    write_results(results, str(tmp_path), ranks=2)
    table = (tmp_path / "results.md").read_text()
    assert "demo 4-gram LM beam search) | WER (lower is better) | 70.0 ± 0.0% (n=2) | 70.0% (1 run) |" in table
    assert "LM beam search) | CER (lower is better) | 45.0 ± 0.0% (n=2)" in table
    write_results({"tasks": {"asr": {"pretrained": [old, run], "random init": [old]}}}, str(tmp_path), ranks=2)
    assert "LM" not in (tmp_path / "results.md").read_text()
    assert data_overrides({"train": "t", "eval": "e", "lm": "x.arpa"}) == ["finetune.decode.lm=x.arpa"]
    assert data_overrides({"train": "t", "eval": "e"}) == []


def test_the_fine_tuning_configs_dropouts_replace_the_pretrained_ones():
    """A loaded checkpoint brings its pretraining dropouts; fine-tuning runs with its own (as
    fairseq's wav2vec_ctc overrides the w2v model's)."""
    from d2v.config.presets import get_preset
    from d2v.finetune.asr import apply_regularization

    model = _asr_model(None, layerdrop=0.0)  # built with dropouts 0 and no LayerDrop
    m = get_preset("audio_tiny").model
    m.layerdrop, m.dropout, m.attention_dropout, m.activation_dropout = 0.1, 0.2, 0.3, 0.4
    apply_regularization(model, m)
    enc = model.backbone.encoder
    assert enc.layerdrop == 0.1 and enc.dropout.p == 0.2
    assert {(b.dropout.p, b.attention.dropout, b.ffn.activation_dropout.p) for b in enc.blocks} == {(0.2, 0.3, 0.4)}


def test_ctc_sentence_average_weighs_utterances_by_their_whole_loss():
    """fairseq's sentence_avg: the plain negative log-likelihoods averaged over utterances; the
    default divides each by its label count first. Two hand-computed utterances of 1 and 2 labels."""
    import math

    from d2v.finetune.ctc import ctc_loss

    p = [[0.5, 0.1, 0.3, 0.1], [0.2, 0.1, 0.6, 0.1], [0.25, 0.25, 0.25, 0.25]]  # last frame: padding
    q = [[0.1, 0.1, 0.7, 0.1], [0.6, 0.2, 0.1, 0.1], [0.3, 0.1, 0.5, 0.1]]
    logits = torch.tensor([p, q], dtype=torch.float64).log()
    nll_a = -math.log(0.3 * 0.6 + 0.3 * 0.2 + 0.5 * 0.6)  # "A" over 2 frames: AA, A-, -A
    nll_aa = -math.log(0.7 * 0.6 * 0.5)                   # "AA" over 3 frames: A-A only
    frames, targets = torch.tensor([2, 3]), [[2], [2, 2]]
    assert float(ctc_loss(logits, frames, targets, "sentence")) == pytest.approx((nll_a + nll_aa) / 2, rel=1e-6)
    assert float(ctc_loss(logits, frames, targets)) == pytest.approx((nll_a + nll_aa / 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="CTC reduction 'sum'"):
        ctc_loss(logits, frames, targets, "sum")


def test_length_batches_fill_a_token_budget_and_deal_equal_counts_to_ranks():
    from d2v.finetune.asr import length_batches

    lengths = [100, 300, 250, 90, 310, 120, 50, 260, 80, 305]
    mine = [length_batches(lengths, 620, r, 2, seed=1, epoch=0) for r in range(2)]
    assert len(mine[0]) == len(mine[1]) >= 2
    for batch in mine[0] + mine[1]:
        assert max(lengths[i] for i in batch) * len(batch) <= 620
    used = [i for b in mine[0] + mine[1] for i in b]
    assert len(used) == len(set(used))
    # Longest first, greedy: 310+305 (2 x 310 = 620), 300+260, 250+120, then 100, 90, 80, 50.
    assert sorted(sorted(b) for b in mine[0] + mine[1]) == [[0, 3, 6, 8], [1, 7], [2, 5], [4, 9]]
    assert mine[0] == length_batches(lengths, 620, 0, 2, seed=1, epoch=0)
    assert mine[0] != length_batches(lengths, 620, 0, 2, seed=1, epoch=1)
    with pytest.raises(ValueError, match="more than finetune.max_tokens=200"):
        length_batches(lengths, 200, 0, 1, seed=0, epoch=0)


def test_fine_tuning_normalises_audio_as_pretraining_did():
    from d2v.config.presets import get_preset
    from d2v.finetune.asr import AsrTask
    from d2v.finetune.config import FinetuneConfig

    for normalize in (False, True):
        base = get_preset("audio_tiny")
        base.data.normalize = normalize
        cfg = FinetuneConfig(task="asr")
        AsrTask.configure(cfg, base)
        assert cfg.finetune.normalize_audio is normalize


def test_errors_are_counted_per_evaluation_set():
    """Hand-counted: set x hears "A B" as "A" (1 of 2 words, 2 of 3 characters), set y gets "AB" right."""
    from d2v.finetune.asr import COUNTS, AsrTask
    from d2v.finetune.ctc import CharVocab
    from d2v.finetune.model import TaskOutput
    from d2v.finetune.tasks import FtBatch

    task = object.__new__(AsrTask)  # the scoring only, without shards
    task.vocab, task.sets, task.decoder = CharVocab(["<blank>", "|", "A", "B"]), ["x", "y"], None
    task.score_keys = tuple(f"{s}/{c}" for s in task.sets for c in COUNTS)
    frames = [[2, 0, 0], [2, 0, 3]]  # "A", "AB" by best path
    logits = torch.nn.functional.one_hot(torch.tensor(frames), 4).float()
    batch = FtBatch(torch.zeros(2, 1), texts=["A B", "AB"], sets=["x", "y"])
    sums = task.score(TaskOutput(logits, None), batch)
    assert sums == {"x/word_errors": 1, "x/words": 2, "x/char_errors": 2, "x/chars": 3,
                    "y/word_errors": 0, "y/words": 1, "y/char_errors": 0, "y/chars": 2}
    assert task.summarize(sums) == {"x/wer": 0.5, "x/cer": pytest.approx(2 / 3), "y/wer": 0.0, "y/cer": 0.0}
