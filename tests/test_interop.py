"""Interop (README, interop): transformers export and parity, checkpoint export, --init-from
(fairseq import: tests/test_fairseq_import.py).

transformers is the optional `hf` extra: the tests that load with it skip when it is absent.
"""
import importlib.util
import json
import os

import pytest
import torch

from word_tokenizer import word_tokenizer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                              reason="transformers (the optional `hf` extra) is not installed: pip install -e '.[hf]'")
PRESETS = ["audio_tiny", "image_tiny", "text_tiny"]


def _model(preset, seed=0):
    from d2v.config import get_preset
    from d2v.models import build_model

    torch.manual_seed(seed)
    cfg = get_preset(preset)
    model = build_model(cfg)
    with torch.no_grad():  # move every weight off its initial value (layer scale 0.1, zero biases...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model.eval()


def _inputs(cfg):
    """Random inputs with padding (audio: the second row shorter; text: the second row padded)."""
    g = torch.Generator().manual_seed(1)
    m = cfg.model
    if m.modality == "audio":
        x = torch.randn(2, 8000, generator=g)
        lengths = torch.tensor([8000, 5600])
        x[1, 5600:] = 0.0
        return x, lengths
    if m.modality == "image":
        return torch.randn(2, m.image.in_chans, m.image.image_size, m.image.image_size, generator=g), None
    ids = torch.randint(4, m.text.vocab_size - 1, (2, 24), generator=g)
    ids[1, 17:] = m.text.pad_id
    return ids, None


def _d2v_hidden(model, cfg, x, lengths):
    """d2v's last hidden state (vision: CLS first, as transformers) and the valid positions."""
    with torch.no_grad():
        feats = model.features(x, lengths)
        h = model.encode(feats.x, feats.padding_mask, keep_extra_tokens=True)
    valid = torch.ones(h.shape[:2], dtype=torch.bool) if feats.padding_mask is None else ~feats.padding_mask
    return h, valid


def _hf_hidden(directory, cfg, x, lengths):
    import transformers

    m = cfg.model
    cls = {"audio": transformers.Data2VecAudioModel, "image": transformers.Data2VecVisionModel,
           "text": transformers.Data2VecTextModel}[m.modality]
    kwargs = {"add_pooling_layer": False} if m.modality == "text" else {}
    hf, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    with torch.no_grad():
        if m.modality == "audio":
            mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
            return hf(x, attention_mask=mask).last_hidden_state
        if m.modality == "text":
            return hf(x, attention_mask=x.ne(m.text.pad_id).long()).last_hidden_state
        return hf(x).last_hidden_state


@needs_hf
@pytest.mark.parametrize("preset", PRESETS)
def test_hf_export_loads_cleanly_and_matches_d2v(preset, tmp_path):
    from d2v.interop import write_hf

    cfg, model = _model(preset)
    tok = word_tokenizer(tmp_path / "tok.json", cfg.model.text.vocab_size) if cfg.model.modality == "text" else None
    out = str(tmp_path / "hf")
    write_hf(out, cfg, model.state_dict(), tokenizer=tok)
    x, lengths = _inputs(cfg)
    ref, valid = _d2v_hidden(model, cfg, x, lengths)
    got = _hf_hidden(out, cfg, x, lengths)
    assert got.shape == ref.shape
    err = (got - ref)[valid].abs().max().item()
    print(f"\n{preset} student: max |HF - d2v| = {err:.3g}")
    assert err <= 1e-5
    config = json.load(open(os.path.join(out, "config.json")))
    # the fields whose transformers defaults differ from d2v's models are written explicitly
    assert config["layer_norm_eps"] == cfg.model.norm_eps
    if cfg.model.modality == "image":
        assert config["use_shared_relative_position_bias"] and not config["use_mean_pooling"]
        pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
        assert pre["image_mean"] == list(cfg.model.image.mean) and pre["size"]["height"] == 32
    if cfg.model.modality == "audio":
        pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
        assert pre["sampling_rate"] == 16000 and pre["do_normalize"] is True
    if cfg.model.modality == "text":
        assert config["max_position_embeddings"] == cfg.model.text.max_positions + 2
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(out)
        assert hf_tok("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]
        assert hf_tok.mask_token_id == cfg.model.text.vocab_size - 1 and hf_tok.pad_token_id == 1


@needs_hf
def test_hf_export_ships_a_sentencepiece_tokenizer_transformers_loads(tmp_path):
    from transformers import AutoTokenizer

    from d2v.config import apply_overrides, get_preset
    from d2v.data.demo_text import pydoc_paragraphs
    from d2v.data.tokenizer import Tokenizer, train_sentencepiece
    from d2v.interop import write_hf
    from d2v.models import build_model

    texts = pydoc_paragraphs()[:450]
    spm = train_sentencepiece(texts[:400], str(tmp_path / "spm"), 300)
    cfg = get_preset("text_tiny")
    apply_overrides(cfg, ["model.text.vocab_size=300"])
    out = str(tmp_path / "hf")
    write_hf(out, cfg, build_model(cfg).state_dict(), tokenizer=spm)
    assert os.path.exists(os.path.join(out, "sentencepiece.model"))
    hf_tok, mine = AutoTokenizer.from_pretrained(out), Tokenizer(spm)
    for text in texts[400:] + ["  odd   spacing ", "Ünïcödé ½"]:  # text the model was not trained on
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == mine.encode(text)
    assert hf_tok.mask_token_id == 299 and hf_tok.pad_token_id == 1 and hf_tok.bos_token_id == 0


@needs_hf
@pytest.mark.parametrize("preset", PRESETS)
def test_hf_export_of_the_teacher(preset, tmp_path):
    from d2v.interop import write_hf
    from d2v.models import build_model
    from d2v.teacher import Teacher

    cfg, model = _model(preset)
    teacher = Teacher(model, cfg.teacher)
    state = teacher.export_state()
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}  # an EMA that moved away
    tok = word_tokenizer(tmp_path / "tok.json", cfg.model.text.vocab_size) if cfg.model.modality == "text" else None
    out = str(tmp_path / "hf")
    meta = write_hf(out, cfg, model.state_dict(), teacher=state, tokenizer=tok)
    assert meta["weights"] == "teacher"
    expected_from_student = {"audio": ["frontend", "mask_embedding"], "image": ["mask_embedding"],
                             "text": ["frontend"]}[cfg.model.modality]
    assert sorted(meta["taken_from_student"]) == expected_from_student
    # reference: the student's network with the teacher's weights where the teacher has them
    reference = build_model(cfg).eval()
    reference.load_state_dict({**model.state_dict(), **state})
    x, lengths = _inputs(cfg)
    ref, valid = _d2v_hidden(reference, cfg, x, lengths)
    got = _hf_hidden(out, cfg, x, lengths)
    err = (got - ref)[valid].abs().max().item()
    print(f"\n{preset} teacher: max |HF - d2v| = {err:.3g}")
    assert err <= 1e-5
    student_out, _ = _d2v_hidden(model, cfg, x, lengths)
    assert (got - student_out)[valid].abs().max() > 1e-3  # the teacher's weights, not the student's


# -- checkpoint -> export CLI -> --init-from -------------------------------------------------

@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """Two updates of audio_tiny in one process: a real checkpoint (student + EMA teacher)."""
    from d2v.config import load_template, resolve
    from d2v.train.launch import build_run

    out = str(tmp_path_factory.mktemp("interop") / "run")
    cfg = resolve("audio_tiny", overrides=[f"train.out_dir={out}", "train.max_steps=2", "train.save_every=0",
                                           "train.log_every=1", "teacher.ema_start=0.5", "teacher.ema_end=0.5",
                                           "train.precision=fp32"])
    run = build_run(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), console=False)
    run.train()
    run.close()
    return out


@needs_hf
def test_export_cli_hf_teacher_from_a_checkpoint(audio_run, tmp_path):
    from safetensors.torch import load_file

    from d2v.__main__ import main
    from d2v.export import export_checkpoint

    plain, hf_dir = str(tmp_path / "plain"), str(tmp_path / "hf")
    export_checkpoint(audio_run, plain)
    main(["export", audio_run, hf_dir, "--format", "hf", "--teacher"])
    teacher = load_file(os.path.join(plain, "teacher.safetensors"))
    student = load_file(os.path.join(plain, "student.safetensors"))
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert torch.equal(hf["encoder.layers.1.feed_forward.output_dense.weight"],
                       teacher["encoder.blocks.1.ffn.fc2.weight"])
    assert not torch.equal(teacher["encoder.blocks.1.ffn.fc2.weight"], student["encoder.blocks.1.ffn.fc2.weight"])
    assert torch.equal(hf["feature_projection.projection.weight"], student["frontend.projection.weight"])
    meta = json.load(open(os.path.join(hf_dir, "d2v_export.json")))
    assert meta["weights"] == "teacher" and "frontend" in meta["taken_from_student"]
    from d2v.config import from_dict
    from d2v.export import load_exported

    model, _, cfg = load_exported(plain)
    merged = {**model.state_dict(), **teacher}
    model.load_state_dict(merged)
    x, lengths = _inputs(cfg)
    ref, valid = _d2v_hidden(model.eval(), cfg, x, lengths)
    got = _hf_hidden(hf_dir, from_dict(meta["d2v_config"]), x, lengths)
    assert (got - ref)[valid].abs().max() <= 1e-5


def test_init_from_plain_export_and_hf_dir_load_the_source_weights(tmp_path):
    from d2v.interop import init_from, write_hf
    from d2v.models import build_model

    cfg, model = _model("image_tiny")
    write_hf(str(tmp_path / "hf"), cfg, model.state_dict())
    torch.manual_seed(3)
    fresh = build_model(cfg)
    head_before = fresh.head.weight.clone()
    report = init_from(fresh, str(tmp_path / "hf"), cfg)
    src, dst = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src if not k.startswith("head."))
    assert torch.equal(fresh.head.weight, head_before)  # transformers has no head: kept fresh, and said so
    assert report.kept_init == ["head.weight", "head.bias"] and report.teacher is None


def test_pretrained_config_describes_the_directory(tmp_path):
    from d2v.config import to_dict
    from d2v.interop import pretrained_config, write_hf
    from d2v.interop.init_from import structural_fields

    cfg, model = _model("audio_tiny")
    out = str(tmp_path / "hf")
    write_hf(out, cfg, model.state_dict())
    assert to_dict(pretrained_config(out)) == to_dict(cfg)  # d2v's own export: the exact run config
    os.remove(os.path.join(out, "d2v_export.json"))  # as public weights come: config.json only
    public = pretrained_config(out)
    assert structural_fields(public.model) == structural_fields(cfg.model)
    assert public.name == "audio_tiny"  # the nearest preset's recipe (64 wide)


def _write_plain(directory, cfg, model, teacher_state):
    from safetensors.torch import save_file

    from d2v.config import to_dict

    os.makedirs(directory)
    save_file(dict(model.state_dict()), os.path.join(directory, "student.safetensors"))
    save_file(teacher_state, os.path.join(directory, "teacher.safetensors"))
    json.dump(to_dict(cfg), open(os.path.join(directory, "config.json"), "w"))


def test_init_from_refuses_a_directory_whose_keys_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    from d2v.config import apply_overrides, get_preset
    from d2v.interop import init_from, write_hf
    from d2v.models import build_model

    cfg, model = _model("audio_tiny")
    out = str(tmp_path / "hf")
    write_hf(out, cfg, model.state_dict())
    weights = load_file(os.path.join(out, "model.safetensors"))
    del weights["encoder.layers.1.final_layer_norm.bias"]
    weights["encoder.layers.1.extra.weight"] = torch.zeros(3)
    weights["encoder.layer_norm.weight"] = torch.ones(63)
    save_file(weights, os.path.join(out, "model.safetensors"))
    target = build_model(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyError) as e:
        init_from(target, out, cfg)
    msg = str(e.value)
    assert "encoder.blocks.1.ffn_norm.bias" in msg  # missing, in d2v's name
    assert "encoder.layers.1.extra.weight" in msg  # unexpected, in the directory's name
    assert "encoder.layer_norm.weight: directory (63,), model (64,)" in msg  # mismatched
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded
    # an architecture the directory does not describe: named, with the override that fixes it
    other = get_preset("audio_tiny")
    apply_overrides(other, ["model.num_heads=2", "model.audio.conv_pos_kernel=17"])
    with pytest.raises(ValueError, match=r"model.num_heads: directory 4, run 2.*model.num_heads=4 "
                                         r"model.audio.conv_pos_kernel=19"):
        init_from(build_model(other), str(tmp_path / "hf"), other)


def test_init_from_in_the_run_loads_student_and_teacher(tmp_path):
    from d2v.config import load_template, resolve
    from d2v.teacher import Teacher
    from d2v.train.launch import build_run

    cfg, model = _model("text_tiny")
    teacher_state = {k: v + 1.0 for k, v in Teacher(model, cfg.teacher).export_state().items()}
    src = str(tmp_path / "plain")
    _write_plain(src, cfg, model, teacher_state)
    run_cfg = resolve("text_tiny", overrides=[f"train.out_dir={tmp_path / 'run'}", "train.precision=fp32"])
    run = build_run(run_cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), console=False,
                    init_from=src)
    try:
        student = run.trainer.student.state_dict()
        assert all(torch.equal(student[k], v) for k, v in model.state_dict().items())
        assert all(torch.equal(run.trainer.teacher.export_state()[k], v) for k, v in teacher_state.items())
    finally:
        run.close()


def ema_names(cfg, student):
    from d2v.teacher import Teacher

    t = Teacher(student, cfg.teacher)
    return t.ema_names + t.copy_names


def test_data2vec_2_checkpoint_exports_plain_and_hf(tmp_path):
    """A 2.0 checkpoint exports as plain state dicts that load back exactly, and (CLI, --format hf
    --teacher) as a transformers directory holding the EMA teacher (tests/test_hf_v2.py: its outputs)."""
    from safetensors.torch import load_file

    from d2v.config import load_template, resolve
    from d2v.export import export_checkpoint, load_exported
    from d2v.train.launch import build_run

    out = str(tmp_path / "run")
    cfg = resolve("image_tiny_v2", overrides=[f"train.out_dir={out}", "train.max_steps=2", "train.save_every=0",
                                              "train.log_every=1", "train.precision=fp32",
                                              "train.micro_batch_size=4"])
    run = build_run(cfg, load_template(os.path.join(ROOT, "ds_configs", "cpu.json")), console=False)
    run.train()
    trained = {k: v.detach().clone() for k, v in run.trainer.student.state_dict().items()}
    run.close()
    export_checkpoint(out, str(tmp_path / "plain"))
    model, teacher, loaded_cfg = load_exported(str(tmp_path / "plain"))
    assert loaded_cfg.model.v2.enabled and model.drops_masked and model.decoder is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name].float()), name
    assert teacher and set(teacher) == set(load_file(str(tmp_path / "plain" / "teacher.safetensors")))
    from d2v.__main__ import main

    main(["export", out, str(tmp_path / "hf"), "--format", "hf", "--teacher"])
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["architectures"] == ["Data2Vec2VisionModel"]
    assert os.path.exists(tmp_path / "hf" / "modeling_data2vec2.py")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, tensor in teacher.items():  # the image teacher reads pixels: every exported weight is its own
        assert torch.equal(hf[name], tensor.float()), name
    assert not [n for n in hf if n.startswith("decoder.")]


def test_export_reads_complete_tags_only_and_never_replaces_an_export(audio_run, tmp_path, capsys):
    import shutil

    from d2v.__main__ import main
    from d2v.export import export_checkpoint

    out = str(tmp_path / "plain")
    export_checkpoint(audio_run, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(audio_run, out)
    export_checkpoint(audio_run, out, overwrite=True)
    run = tmp_path / "run"
    shutil.copytree(audio_run, run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    (run / "checkpoints" / latest / "COMPLETE").unlink()  # a save that never finished
    for argv in (["export", str(run), str(tmp_path / "a")],
                 ["export", str(run), str(tmp_path / "b"), "--tag", f"{latest}.partial"],
                 ["export", audio_run, out]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_init_from_refuses_non_finite_weights_by_name(tmp_path, where):
    from d2v.interop import init_from as load_pretrained
    from d2v.models import build_model

    cfg, model = _model("audio_tiny")
    teacher = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.blocks")}
    if where == "student":
        with torch.no_grad():
            model.encoder.blocks[1].ffn.fc1.weight[0, 0] = float("nan")
    else:
        teacher["encoder.blocks.0.ffn.fc2.bias"][3] = float("inf")
    _write_plain(str(tmp_path / "export"), cfg, model, teacher)
    fresh = build_model(cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    name = "encoder.blocks.1.ffn.fc1.weight" if where == "student" else "teacher encoder.blocks.0.ffn.fc2.bias"
    with pytest.raises(ValueError, match=name):
        load_pretrained(fresh, str(tmp_path / "export"), cfg)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # untouched
