"""GLUE fine-tuning: the TSV layout of each task (synthetic trees typed here in GLUE's format),
fairseq's pair encoding and head, the metrics against sklearn/scipy and hand counts (also summed
over shards), the recipes against fairseq's files, and a 2-rank run of the launcher."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["red", "green", "small", "old", "cat", "dog", "bird", "tree", "house", "sees", "finds", "near", "the", "a"]

# GLUE's headers, typed from the files the GLUE download script writes (CoLA's train/dev have none).
HEADERS = {
    "SST-2": "sentence\tlabel",
    "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",  # MSR's release begins with a byte-order mark
    "QQP": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "MNLI/train": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                  "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
    "MNLI/dev": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
    "QNLI": "index\tquestion\tsentence\tlabel",
    "RTE": "index\tsentence1\tsentence2\tlabel",
}
NLI = ["contradiction", "entailment", "neutral"]


def _row(task, i, a, b, label, dev):
    """One line of `task`'s file, columns as GLUE has them."""
    if task == "cola":
        return f"gj04\t{label}\t{'' if label == '1' else '*'}\t{a}"
    if task == "sst_2":
        return f"{a}\t{label}"
    if task == "mrpc":
        return f"{label}\t{1000 + i}\t{2000 + i}\t{a}\t{b}"
    if task == "qqp":
        return f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{label}"
    if task == "sts_b":
        return f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{label}"
    if task == "mnli":
        other = NLI[(NLI.index(label) + 1) % 3]  # label1 differs from gold_label: the gold column is read
        parses = f"( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})"
        annot = f"{other}\t{label}\t{label}\t{label}\t{label}" if dev else other
        return f"{i}\t{i}\t{i}e\tfiction\t{parses}\t{a}\t{b}\t{annot}\t{label}"
    return f"{i}\t{a}\t{b}\t{label}"  # qnli, rte


FOLDERS = {"cola": "CoLA", "sst_2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "sts_b": "STS-B", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE"}
LABELS = {"cola": ["0", "1"], "sst_2": ["0", "1"], "mrpc": ["0", "1"], "qqp": ["0", "1"], "mnli": NLI,
          "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"]}
PAIRED = {"mrpc", "qqp", "sts_b", "mnli", "qnli", "rte"}


def write_glue_tree(root, n=24, seed=0):
    """glue_data/ with every task's train and dev files; returns {path: [(texts, label text)]}."""
    rng = random.Random(seed)
    expected = {}
    for task, folder in FOLDERS.items():
        os.makedirs(os.path.join(root, folder))
        files = ["train.tsv"] + (["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"])
        for name in files:
            dev = name != "train.tsv"
            rows, lines = [], []
            for i in range(n):
                a, b = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(2))
                label = f"{rng.randint(0, 10) / 2:.3f}" if task == "sts_b" else rng.choice(LABELS[task])
                rows.append(((a, b) if task in PAIRED else (a,), label))
                lines.append(_row(task, i, a, b, label, dev))
            header = HEADERS.get(f"{folder}/{'dev' if dev else 'train'}", HEADERS.get(folder))
            path = os.path.join(root, folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in ([header] if header else []) + lines))
            expected[path] = rows
    return expected


@pytest.fixture(scope="module")
def glue_tree(tmp_path_factory):
    from d2v.data.tokenizer import Tokenizer, train_sentencepiece

    root = str(tmp_path_factory.mktemp("glue") / "glue_data")
    expected = write_glue_tree(root)
    texts = [t for rows in expected.values() for texts, _ in rows for t in texts]
    model = train_sentencepiece(texts, os.path.join(os.path.dirname(root), "spm"), 40)
    return root, expected, model, Tokenizer(model).info.vocab_size


# -- the layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(FOLDERS))
def test_each_task_reads_its_sentences_and_labels_from_glues_columns(task, glue_tree):
    from d2v.data.glue import read_glue

    root, expected, _, _ = glue_tree
    folder = os.path.join(root, FOLDERS[task])
    for train in (True, False):
        splits = read_glue(folder, task, train=train)
        dev = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"]
        names = ["train.tsv"] if train else dev
        assert [os.path.basename(s.path) for s in splits] == names
        for split in splits:
            rows = expected[split.path]
            assert split.sentences == [texts for texts, _ in rows] and split.malformed == []
            if task == "sts_b":
                assert split.targets == [float(label) for _, label in rows]
            else:
                assert split.targets == [LABELS[task].index(label) for _, label in rows]


def test_malformed_rows_are_skipped_and_counted_and_a_wrong_file_is_one_error(tmp_path, capsys):
    from d2v.data.glue import read_glue_file
    from d2v.data.prepare import main as prepare_main

    qqp = tmp_path / "QQP"
    qqp.mkdir()
    good = [_row("qqp", i, f"question {i}", f"other {i}", str(i % 2), False) for i in range(20)]
    # A question with a newline in it splits the row (fairseq's awk filter drops such rows), and a label
    # that is not 0/1: both skipped, counted, their lines named.
    lines = [HEADERS["QQP"], *good[:5], "7\t8\t9\tWhat is", "a split question?\t0", *good[5:], "1\t2\t3\ta\tb\tyes"]
    (qqp / "train.tsv").write_text("\n".join(lines) + "\n")
    split = read_glue_file(str(qqp / "train.tsv"), "qqp", train=True)
    assert len(split.targets) == 20 and split.malformed == [7, 8, 24]
    assert split.report().endswith("20 examples, 3 malformed rows skipped (lines 7, 8, 24)")

    # Many bad rows: the wrong file, one error naming it.
    (qqp / "dev.tsv").write_text("\n".join([HEADERS["QQP"], *good, *["1\t2\t3\ta\tb"] * 11]) + "\n")
    with pytest.raises(ValueError, match=r"dev.tsv: 11 of 31 rows are malformed \(first at line 22"):
        read_glue_file(str(qqp / "dev.tsv"), "qqp", train=False)
    # Another task's file: its header says so.
    rte = tmp_path / "rte.tsv"
    rte.write_text(HEADERS["RTE"] + "\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"rte.tsv: the header has 4 columns but GLUE's QQP train files have 6"):
        read_glue_file(str(rte), "qqp", train=True)
    with pytest.raises(ValueError, match="holds no CoLA examples"):
        read_glue_file(str(rte), "cola", train=True)
    with pytest.raises(FileNotFoundError, match="expected glue_data/MNLI"):
        read_glue_file(str(tmp_path / "MNLI" / "train.tsv"), "mnli", train=True)

    # `prepare glue` reads the tree in place and reports; a bad tree is one error line, exit 2.
    (qqp / "dev.tsv").write_text("\n".join([HEADERS["QQP"], *good]) + "\n")
    assert prepare_main(["glue", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"qqp: {qqp / 'train.tsv'}: 20 examples, 3 malformed rows skipped (lines 7, 8, 24)",
                   f"qqp: {qqp / 'dev.tsv'}: 20 examples"]
    assert prepare_main(["glue", str(tmp_path), "--tasks", "mnli"]) == 2
    assert "GLUE task folder " + str(tmp_path / "MNLI") + " does not exist" in capsys.readouterr().err


# -- encoding and head ------------------------------------------------------------------------------
def test_pairs_are_encoded_as_fairseqs_sentence_prediction_and_cut_from_the_end():
    from d2v.finetune.glue import encode_example

    vocab = {"x": 10, "y": 11, "z": 12}

    def enc(s):
        return [vocab[w] for w in s.split()]

    # init_token 0, each sentence followed by </s> (2), separator_token 2 before the second.
    assert encode_example(("x y",), enc, 0, 2, 512) == ([0, 10, 11, 2], False)
    assert encode_example(("x y", "z"), enc, 0, 2, 512) == ([0, 10, 11, 2, 2, 12, 2], False)
    assert encode_example(("x y", "z x"), enc, 0, 2, 6) == ([0, 10, 11, 2, 2, 12], True)
    assert encode_example(("x y", "z"), enc, 0, 2, 7) == ([0, 10, 11, 2, 2, 12, 2], False)


def test_head_is_robertas_first_token_dense_tanh_out_proj():
    from d2v.finetune.glue import SentenceHead

    torch.manual_seed(0)
    head = SentenceHead(8, 3, dropout=0.5).eval()
    h = torch.randn(2, 5, 8)
    W1, b1 = head.dense.weight.detach().double(), head.dense.bias.detach().double()
    W2, b2 = head.out_proj.weight.detach().double(), head.out_proj.bias.detach().double()
    want = torch.tanh(h[:, 0].double() @ W1.T + b1) @ W2.T + b2  # float64, the other positions unused
    h[:, 1:] = 1e6
    with torch.no_grad():
        torch.testing.assert_close(head(h, None).double(), want, rtol=1e-5, atol=1e-6)
        head.train()
        assert not torch.equal(head(h), head(h))  # dropout after tanh in training


# -- metrics ----------------------------------------------------------------------------------------
def test_mcc_f1_and_correlations_match_hand_counts_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    from d2v.finetune import glue_metrics as gm

    gold = [1, 1, 1, 0, 0, 0, 0, 1]
    pred = [1, 0, 1, 0, 1, 0, 0, 1]
    c = gm.confusion(pred, gold)
    assert c == {"tp": 3, "fp": 1, "fn": 1, "tn": 3}
    assert gm.mcc(c) == pytest.approx((3 * 3 - 1 * 1) / 16)  # sqrt(4*4*4*4) = 16
    assert gm.f1(c) == pytest.approx(6 / 8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert gm.mcc(gm.confusion(p, g)) == pytest.approx(matthews_corrcoef(g, p), abs=1e-12)
        assert gm.f1(gm.confusion(p, g)) == pytest.approx(f1_score(g, p), abs=1e-12)
    assert gm.mcc(gm.confusion([1, 1, 1], [1, 0, 1])) == 0.0 == matthews_corrcoef([1, 0, 1], [1, 1, 1])

    assert list(gm.average_ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    x = rng.normal(size=40)
    y = np.round(x + rng.normal(size=40), 0)  # ties in y
    x[:6] = 0.5  # and in x
    assert gm.pearson(gm.moments(x, y)) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert gm.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def _cfg(glue_tree, task, *extra):
    from d2v.finetune.resolve import resolve_finetune

    root, _, model, vocab = glue_tree
    folder = os.path.join(root, FOLDERS[task])
    cfg, _ = resolve_finetune("glue", preset="text_tiny", recipe=f"glue_{task}", overrides=[
        f"finetune.train_data={folder}", f"finetune.eval_data={folder}", f"finetune.tokenizer={model}",
        f"model.text.vocab_size={vocab}", *extra])
    return cfg


def _task(glue_tree, task, *extra):
    from d2v.finetune.tasks import build_task

    return build_task(_cfg(glue_tree, task, *extra))


def _sharded(task, logits, shards):
    """summarize(sum over shards of score), the way ranks evaluate strided shares."""
    from d2v.finetune.model import TaskOutput

    n = task.size("eval")
    sums = {k: 0.0 for k in task.score_keys}
    for r in range(shards):
        mine = list(range(r, n, shards))
        batch = task.batch("eval", mine)
        for k, v in task.score(TaskOutput(logits[mine], None), batch).items():
            sums[k] += v
    return task.summarize(sums)


@pytest.mark.parametrize("task", ["cola", "mrpc", "sts_b", "mnli"])
def test_task_metrics_are_the_corpus_metrics_on_any_sharding(task, glue_tree):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    from d2v.data.glue import read_glue

    t = _task(glue_tree, task)
    n = t.size("eval")
    torch.manual_seed(1)
    logits = torch.randn(n, t.num_outputs)
    files = read_glue(os.path.join(glue_tree[0], FOLDERS[task]), task, train=False)
    gold = np.concatenate([f.targets for f in files])
    if task == "sts_b":
        pred = logits[:, 0].double().numpy()
        want = {"pearson": pearsonr(pred, gold)[0], "spearman": spearmanr(pred, gold)[0]}
        want["pearson_and_spearman"] = (want["pearson"] + want["spearman"]) / 2
    else:
        pred = logits.argmax(-1).numpy()
        if task == "mnli":  # matched and mismatched, each its own file's accuracy
            m = len(files[0].targets)
            want = {"accuracy_matched": np.mean(pred[:m] == gold[:m]),
                    "accuracy_mismatched": np.mean(pred[m:] == gold[m:])}
        else:
            want = {"accuracy": np.mean(pred == gold)}
        if task == "cola":
            want["mcc"] = matthews_corrcoef(gold, pred)
        if task == "mrpc":
            want["f1"] = f1_score(gold, pred)
            want["acc_and_f1"] = (want["accuracy"] + want["f1"]) / 2
    for shards in (1, 2, 5):
        got = _sharded(t, logits, shards)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-9), (shards, k)


def test_sts_b_regresses_the_score_over_five_with_one_output(glue_tree):
    from d2v.finetune.model import TaskOutput

    t = _task(glue_tree, "sts_b")
    assert t.num_outputs == 1 and t.regression
    batch = t.batch("train", [0, 1, 2])
    scores = [float(label) for _, label in glue_tree[1][os.path.join(glue_tree[0], "STS-B", "train.tsv")][:3]]
    torch.testing.assert_close(batch.labels, torch.tensor(scores, dtype=torch.float64) / 5)
    out = TaskOutput(torch.tensor([[0.1], [0.5], [0.9]]), None)
    want = np.mean((np.array([0.1, 0.5, 0.9]) - np.array(scores) / 5) ** 2)
    assert float(t.loss(out, batch)) == pytest.approx(want, rel=1e-6)


# -- schedule and recipes ---------------------------------------------------------------------------
def test_polynomial_decay_is_fairseqs():
    from d2v.config.schema import OptimConfig
    from d2v.train.schedule import lr_factor

    f = lr_factor(OptimConfig(lr=2e-5, schedule="polynomial", warmup_steps=4, min_lr=0.0), 12)
    # fairseq: num_updates / warmup up to the warmup, then 1 - (n - warmup) / (total - warmup), 0 after.
    assert [f(s) for s in range(14)] == pytest.approx([0, .25, .5, .75, 1, .875, .75, .625, .5, .375, .25, .125, 0, 0])
    g = lr_factor(OptimConfig(lr=2e-5, schedule="polynomial", warmup_steps=0, min_lr=1e-5), 4)
    assert [g(s) for s in range(5)] == pytest.approx([1, .875, .75, .625, .5])


# Typed from fairseq's examples/data2vec/config/v2/text_finetuning/{task}.yaml at commit
# 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99 (https://github.com/facebookresearch/fairseq):
# task: (num_classes, dataset.batch_size, lr, max_update, warmup_updates, best_checkpoint_metric)
FAIRSEQ = {
    "cola": (2, 16, 2e-5, 5336, 320, "mcc"),
    "mnli": (3, 32, 2e-5, 123873, 7432, "accuracy"),
    "mrpc": (2, 16, 2e-5, 2296, 137, "acc_and_f1"),
    "qnli": (2, 32, 2e-5, 33112, 1986, "accuracy"),
    "qqp": (2, 32, 2e-5, 113272, 28318, "acc_and_f1"),
    "rte": (2, 16, 2e-5, 2036, 122, "accuracy"),
    "sst_2": (2, 32, 2e-5, 20935, 1256, "accuracy"),
    "sts_b": (1, 16, 4e-5, 3598, 214, "pearson_and_spearman"),
}
# Every file: adam betas (0.9,0.98), adam_eps 1e-06, weight_decay 0.1, clip_norm 0.0, polynomial_decay
# (end_learning_rate 0), init_token 0, separator_token 2, max_positions 512, one GPU, pooler_dropout 0.


@pytest.mark.parametrize("task", list(FAIRSEQ))
def test_each_recipe_holds_fairseqs_settings(task, glue_tree):
    from d2v.finetune.recipes import get_recipe

    classes, batch, lr, updates, warmup, best = FAIRSEQ[task]
    recipe = get_recipe(f"glue_{task}", "glue")
    assert recipe.source.endswith(f"3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99/examples/data2vec/config/v2/"
                                  f"text_finetuning/{task}.yaml")
    from d2v.finetune.tasks import build_task

    cfg = _cfg(glue_tree, task)
    t = build_task(cfg)
    o = cfg.optim
    assert (o.lr, cfg.train.micro_batch_size, cfg.train.max_steps, o.warmup_steps) == (lr, batch, updates, warmup)
    assert (o.betas, o.eps, o.weight_decay, o.no_decay_1d, o.clip_norm, o.schedule, o.min_lr) == (
        (0.9, 0.98), 1e-6, 0.1, False, 0.0, "polynomial", 0.0)
    assert (cfg.finetune.glue_task, cfg.finetune.head_dropout, cfg.finetune.recipe) == (task, 0.0, f"glue_{task}")
    assert t.num_outputs == classes
    n = t.size("eval")
    metrics = t.summarize({k: 1.0 for k in t.score_keys} | {f"pred/{i}": float(i % 3) for i in range(n)})
    assert best in metrics or f"{best}_matched" in metrics


def test_recipe_settings_reach_the_config_and_overrides_win(glue_tree):
    from d2v.finetune.resolve import resolve_finetune

    root, _, model, vocab = glue_tree
    data = [f"finetune.train_data={root}/RTE", f"finetune.eval_data={root}/RTE", f"finetune.tokenizer={model}"]
    cfg, _ = resolve_finetune("glue", preset="text_tiny", overrides=[*data, "finetune.recipe=glue_rte",
                                                                     "optim.lr=1e-4"])
    assert (cfg.finetune.recipe, cfg.finetune.glue_task, cfg.optim.lr, cfg.optim.warmup_steps,
            cfg.train.max_steps) == ("glue_rte", "rte", 1e-4, 122, 2036)
    with pytest.raises(ValueError, match="recipe glue_rte is for task glue, not text_cls"):
        resolve_finetune("text_cls", preset="text_tiny", recipe="glue_rte", overrides=data)
    with pytest.raises(ValueError, match="unknown fine-tuning recipe 'glue_wnli'; use one of .*glue_cola"):
        resolve_finetune("glue", preset="text_tiny", recipe="glue_wnli", overrides=data)
    with pytest.raises(ValueError, match="finetune.glue_task='': use one of cola, sst_2"):
        resolve_finetune("glue", preset="text_tiny", overrides=data)


# -- runs -------------------------------------------------------------------------------------------
def test_two_ranks_sum_to_the_corpus_correlations_and_mnli_accuracies(glue_tree, tmp_path):
    """Spearman's rho needs every prediction: the per-example slots summed over 2 real ranks gather
    them exactly (float64 sums of one value and zeros)."""
    from launch import launch_two_ranks
    from scipy.stats import pearsonr, spearmanr

    from d2v.data.glue import read_glue

    sys.path.insert(0, os.path.join(ROOT, "tests", "dist"))
    from glue_scoring import fixed_logits

    root, _, model, vocab = glue_tree
    reports = launch_two_ranks("tests/dist/glue_scoring.py", str(tmp_path), "--glue", root, "--tokenizer", model,
                               "--vocab", str(vocab))
    assert reports[0] == reports[1]
    gold = read_glue(os.path.join(root, "STS-B"), "sts_b", train=False)[0].targets
    pred = fixed_logits(len(gold), 1)[:, 0].double().numpy()
    got = reports[0]["sts_b"]
    assert got["pearson"] == pytest.approx(pearsonr(pred, gold)[0], abs=1e-9)
    assert got["spearman"] == pytest.approx(spearmanr(pred, gold)[0], abs=1e-12)
    matched, mismatched = read_glue(os.path.join(root, "MNLI"), "mnli", train=False)
    pred = fixed_logits(len(matched.targets) + len(mismatched.targets), 3).argmax(-1).numpy()
    m = len(matched.targets)
    assert reports[0]["mnli"] == pytest.approx({"accuracy_matched": np.mean(pred[:m] == matched.targets),
                                                "accuracy_mismatched": np.mean(pred[m:] == mismatched.targets)})


def test_a_few_steps_on_one_batch_reduce_the_regression_loss(glue_tree, tmp_path):
    from d2v.config import load_template
    from d2v.finetune.runner import FinetuneRun
    from d2v.finetune.resolve import resolve_finetune

    root, _, model, vocab = glue_tree
    torch.set_num_threads(2)
    cfg, _ = resolve_finetune("glue", preset="text_tiny", recipe="glue_sts_b", overrides=[
        f"finetune.train_data={root}/STS-B", f"finetune.eval_data={root}/STS-B", f"finetune.tokenizer={model}",
        f"model.text.vocab_size={vocab}", f"train.out_dir={tmp_path}", "optim.schedule=constant", "optim.lr=1e-3",
        "optim.warmup_steps=0", "train.micro_batch_size=8", "model.dropout=0.0", "model.attention_dropout=0.0"])
    run = FinetuneRun(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), random_init=True)
    losses = [run.train_step(list(range(8))) for _ in range(20)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert set(run.evaluate()) == {"pearson", "spearman", "pearson_and_spearman"}
    # not run.close(): it leaves the process group, which the next in-process run of this pytest needs


def test_two_rank_glue_run_of_the_launcher_on_the_demo_pair_task(tmp_path):
    """The demo pair task in RTE's layout, fine-tuned by launchers/finetune.py with --recipe on 2 ranks;
    the evaluation (strided over the ranks) scores every dev pair once."""
    from launch import free_port, launcher_env

    from d2v.data.demo_glue import build_glue_demo
    from d2v.data.glue import read_glue_file
    from d2v.data.tokenizer import Tokenizer, train_sentencepiece

    info = build_glue_demo(str(tmp_path / "glue_data"), train_pairs=32, dev_pairs=21, per_topic=30)
    dev = read_glue_file(info["paths"]["dev"], "rte", train=False)
    assert len(dev.targets) == 21 and sorted(set(dev.targets)) == [0.0, 1.0]
    train = read_glue_file(info["paths"]["train"], "rte", train=True)
    train_sentences = {s for texts in train.sentences for s in texts}
    assert not train_sentences & {s for texts in dev.sentences for s in texts}
    model = train_sentencepiece(info["sentences"], str(tmp_path / "spm"), 200)
    env = launcher_env(PYTHONPATH=ROOT)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launchers", "finetune.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", "cpu.json"), "--task", "glue", "--recipe", "glue_rte",
           "--preset", "text_tiny",
           "--train-data", info["folder"], "--eval-data", info["folder"], "--tokenizer", model,
           "--out", str(tmp_path / "run"), f"model.text.vocab_size={Tokenizer(model).info.vocab_size}",
           "train.micro_batch_size=4", "train.max_steps=6", "optim.warmup_steps=2", "train.log_every=3",
           "model.text.max_positions=64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 6 and result["train_examples"] == 32 and result["eval_examples"] == 21
    assert set(result["metrics"]) == {"accuracy"}
    assert round(result["metrics"]["accuracy"] * 21, 6) == int(round(result["metrics"]["accuracy"] * 21))
    saved = json.load(open(tmp_path / "run" / "finetune.json"))
    assert saved["labels"] == ["entailment", "not_entailment"] and saved["config"]["finetune"]["recipe"] == "glue_rte"
    assert saved["config"]["optim"]["schedule"] == "polynomial" and saved["config"]["finetune"]["glue_task"] == "rte"
    assert "glue rte: " in proc.stderr + proc.stdout
