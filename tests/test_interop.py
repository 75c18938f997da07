"""Interop (README, interop): transformers export and parity, --init-from, fairseq import.

transformers is the optional `hf` extra: the tests that load with it skip when it is absent; the
fairseq tests never need fairseq or omegaconf (the checkpoints are written here, in their layout,
with stand-in classes registered only while saving).
"""
import enum
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

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


def _word_tokenizer(path, vocab_size):
    """A tokenizers JSON with RoBERTa's special ids and <mask> last (what d2v's Tokenizer accepts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size - 1)})
    vocab["<mask>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


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
    tok = _word_tokenizer(tmp_path / "tok.json", cfg.model.text.vocab_size) if cfg.model.modality == "text" else None
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
    tok = _word_tokenizer(tmp_path / "tok.json", cfg.model.text.vocab_size) if cfg.model.modality == "text" else None
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


def test_hf_format_refuses_data2vec_2(tmp_path):
    from d2v.config import get_preset
    from d2v.interop import write_hf

    cfg = get_preset("image_tiny")
    if not hasattr(cfg.model, "v2"):
        pytest.skip("this tree has no data2vec 2.0 config yet")
    cfg.model.v2.enabled = True
    with pytest.raises(ValueError, match="2.0.*--format plain"):
        write_hf(str(tmp_path / "hf"), cfg, {})
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


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


# -- fairseq / BEiT checkpoints written here in their layout ---------------------------------

class _FakeEnum(enum.Enum):
    LAYER_NORM = "layer_norm"


class _Record:
    """Stands for an omegaconf node / container or a fairseq meter: pickled as its own class name."""

    def __init__(self, **state):
        self.__dict__.update(state)


def _fake_classes():
    """Classes pickled under omegaconf/fairseq names; the modules exist only while saving."""
    names = {"omegaconf.dictconfig": "DictConfig", "omegaconf.listconfig": "ListConfig",
             "omegaconf.nodes": "AnyNode", "omegaconf.base": "ContainerMetadata",
             "fairseq.logging.meters": "AverageMeter", "fairseq.models.wav2vec.wav2vec2": "ExtractorMode"}
    classes, modules = {}, {}
    for mod, name in names.items():
        base = _FakeEnum if name == "ExtractorMode" else _Record
        cls = enum.Enum(name, {"LAYER_NORM": "layer_norm"}) if base is _FakeEnum else type(name, (_Record,), {})
        cls.__module__, cls.__qualname__ = mod, name
        module = modules.setdefault(mod, types.ModuleType(mod))
        setattr(module, name, cls)
        classes[name] = cls
        parts = mod.split(".")
        for i in range(1, len(parts)):  # pickle imports the parent packages first
            modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return classes, modules


def _omegaconf(classes, tree):
    """A DictConfig-shaped object graph like omegaconf pickles (containers -> _content -> nodes -> _val)."""
    meta = classes["ContainerMetadata"](ref_type=object, object_type=dict, optional=True, key=None, flags={})
    if isinstance(tree, dict):
        return classes["DictConfig"](_metadata=meta, _parent=None,
                                     _content={k: _omegaconf(classes, v) for k, v in tree.items()})
    if isinstance(tree, list):
        return classes["ListConfig"](_metadata=meta, _parent=None, _content=[_omegaconf(classes, v) for v in tree])
    return classes["AnyNode"](_metadata=meta, _parent=None, _val=tree)


def _save_fairseq(path, payload_fn):
    """torch.save with the stand-in modules registered, then unregistered (the loader must cope)."""
    classes, modules = _fake_classes()
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        torch.save(payload_fn(classes), path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _audio_fairseq_state(model):
    """d2v audio names -> fairseq data2vec_audio names, written out by hand."""
    sd = model.state_dict()
    out = {}
    for i in range(7):
        out[f"feature_extractor.conv_layers.{i}.0.weight"] = sd[f"frontend.conv_layers.{i}.conv.weight"]
        out[f"feature_extractor.conv_layers.{i}.2.1.weight"] = sd[f"frontend.conv_layers.{i}.layer_norm.weight"]
        out[f"feature_extractor.conv_layers.{i}.2.1.bias"] = sd[f"frontend.conv_layers.{i}.layer_norm.bias"]
    out["layer_norm.weight"], out["layer_norm.bias"] = sd["frontend.layer_norm.weight"], sd["frontend.layer_norm.bias"]
    out["post_extract_proj.weight"] = sd["frontend.projection.weight"]
    out["post_extract_proj.bias"] = sd["frontend.projection.bias"]
    out["mask_emb"] = sd["mask_embedding.weight"]
    for i in range(5):
        out[f"encoder.pos_conv.{i}.0.weight"] = sd[f"encoder.pos_conv.layers.{i}.conv.weight"]
        out[f"encoder.pos_conv.{i}.0.bias"] = sd[f"encoder.pos_conv.layers.{i}.conv.bias"]
    out["encoder.layer_norm.weight"] = sd["encoder.layer_norm.weight"]
    out["encoder.layer_norm.bias"] = sd["encoder.layer_norm.bias"]
    out.update(_post_ln_blocks(sd, "encoder.layers."))
    out["final_proj.weight"], out["final_proj.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def _post_ln_blocks(sd, prefix):
    out = {}
    pairs = [("self_attn.q_proj", "attention.q_proj"), ("self_attn.k_proj", "attention.k_proj"),
             ("self_attn.v_proj", "attention.v_proj"), ("self_attn.out_proj", "attention.out_proj"),
             ("self_attn_layer_norm", "attention_norm"), ("fc1", "ffn.fc1"), ("fc2", "ffn.fc2"),
             ("final_layer_norm", "ffn_norm")]
    for b in range(2):
        for fs, d2v in pairs:
            for p in ("weight", "bias"):
                out[f"{prefix}{b}.{fs}.{p}"] = sd[f"encoder.blocks.{b}.{d2v}.{p}"]
    return out


def test_fairseq_audio_import_student_and_ema_teacher(tmp_path):
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq

    cfg, model = _model("audio_tiny")
    fairseq_sd = {k: v.half() for k, v in _audio_fairseq_state(model).items()}  # fairseq trains in fp16
    # the fp32 EMA of fairseq's encoder, keyed relative to it
    ema = {k[len("encoder."):]: v.float() + 0.5 for k, v in fairseq_sd.items() if k.startswith("encoder.")}
    ckpt = str(tmp_path / "checkpoint_best.pt")

    def payload(c):
        model_cfg = {"_name": "data2vec_audio", "encoder_attention_heads": 4, "layer_norm_first": False,
                     "extractor_mode": c["ExtractorMode"].LAYER_NORM,
                     "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"}
        return {"args": None, "cfg": _omegaconf(c, {"model": model_cfg, "task": {"sample_rate": 16000}}),
                "model": {**fairseq_sd, "_ema": ema},
                "extra_state": {"metrics": {"train": [c["AverageMeter"](val=1.0, sum=2.0, count=2)]}},
                "optimizer_history": [{"criterion_name": "ModelCriterion", "num_updates": 7}]}

    _save_fairseq(ckpt, payload)
    assert "omegaconf.dictconfig" not in sys.modules
    info = import_fairseq(ckpt, str(tmp_path / "d2v"))
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert icfg.model.num_heads == 4 and icfg.model.audio.conv_layers == cfg.model.audio.conv_layers
    src = model.state_dict()
    assert all(torch.equal(student.state_dict()[k], src[k].half().float()) for k in src)
    assert torch.equal(teacher["encoder.blocks.1.ffn.fc2.weight"], ema["layers.1.fc2.weight"])
    assert torch.equal(teacher["encoder.layer_norm.bias"], ema["layer_norm.bias"])
    # the positional conv is shared in d2v (copied from the student each step), and the notes say so
    assert torch.equal(teacher["encoder.pos_conv.layers.0.conv.weight"], fairseq_sd["encoder.pos_conv.0.0.weight"].float())
    assert any("encoder.pos_conv" in n for n in info["notes"])


def test_fairseq_audio_import_keeps_the_checkpoints_method(tmp_path):
    """A 1.0 audio checkpoint whose recipe differs from every preset (top-K 2, no LayerDrop, an EMA
    annealed over `${optimization.max_update}` = 300 updates, layer-normed targets): the imported
    run config trains that method; what d2v does not take (channel masking) is named."""
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq

    _, model = _model("audio_tiny")
    fairseq_sd = _audio_fairseq_state(model)
    ckpt = str(tmp_path / "checkpoint_last.pt")

    def payload(c):
        model_cfg = {"_name": "data2vec_audio", "encoder_attention_heads": 4, "extractor_mode": "layer_norm",
                     "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
                     "average_top_k_layers": 2, "encoder_layerdrop": 0.0, "ema_decay": 0.998,
                     "ema_end_decay": 0.99995, "ema_anneal_end_step": "${optimization.max_update}",
                     "layer_norm_target_layer": True, "instance_norm_target_layer": False,
                     "instance_norm_targets": False, "layer_norm_targets": True, "loss_beta": 0.25,
                     "mask_prob": 0.5, "mask_length": 7, "dropout": 0.0, "mask_channel_prob": 0.1,
                     # another section's defaults, which a first-match lookup would take
                     "modalities": {"audio": {"mask_prob": 0.9}}}
        tree = {"model": model_cfg, "optimization": {"max_update": 300}, "task": {"sample_rate": 16000}}
        return {"cfg": _omegaconf(c, tree), "model": fairseq_sd}

    _save_fairseq(ckpt, payload)
    info = import_fairseq(ckpt, str(tmp_path / "d2v"))
    _, _, icfg = load_exported(str(tmp_path / "d2v"))
    t = icfg.teacher
    assert (t.top_k, t.ema_start, t.ema_end, t.ema_anneal_steps) == (2, 0.998, 0.99995, 300)
    assert (t.layer_norm, t.final_norm, icfg.loss.beta) == ("layer", "layer", 0.25)
    assert (icfg.model.layerdrop, icfg.model.dropout, icfg.masking.mask_prob, icfg.masking.mask_length) == (
        0.0, 0.0, 0.5, 7)
    assert any("mask_channel_prob" in n for n in info["notes"]), info["notes"]


def test_fairseq_import_refuses_keys_it_cannot_map(tmp_path):
    from d2v.interop.fairseq_import import ImportRefused, import_fairseq

    _, model = _model("audio_tiny")
    sd = _audio_fairseq_state(model)
    sd["encoder.layers.0.self_attn.rotary.freqs"] = torch.zeros(4)
    ckpt = str(tmp_path / "c.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, {"model": {"encoder_attention_heads": 4}}), "model": sd})
    with pytest.raises(ImportRefused, match="encoder.layers.0.self_attn.rotary.freqs"):
        import_fairseq(ckpt, str(tmp_path / "out"))
    two = str(tmp_path / "two.pt")
    torch.save({"model": {"modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight": torch.zeros(1),
                          "modality_encoders.IMAGE.local_encoder.proj.weight": torch.zeros(1)}}, two)
    with pytest.raises(ImportRefused, match="AUDIO.*IMAGE"):  # a multi-modal 2.0 model: one at a time
        import_fairseq(two, str(tmp_path / "out2"))


def test_fairseq_loader_refuses_arbitrary_callables(tmp_path):
    from d2v.safe_load import RefusedFile, load

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    path = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "cfg": Evil()}, path)
    with pytest.raises(RefusedFile, match="system"):
        load(path, records=True)
    assert not os.path.exists(tmp_path / "owned")
    legacy = str(tmp_path / "evil_legacy.pt")
    torch.save({"x": Evil()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(RefusedFile, match="system"):
        load(legacy, records=True)

    class EvalInCfg:
        def __reduce__(self):
            return (eval, ("open(" + repr(str(tmp_path / "owned")) + ", 'w')",))

    torch.save({"model": {}, "cfg": {"model": EvalInCfg()}}, path)
    with pytest.raises(RefusedFile, match="eval"):
        load(path, records=True)
    assert not os.path.exists(tmp_path / "owned")


def _gpt2_files(tmp_path):
    """A 5-token GPT-2-style vocabulary; dict.txt orders its ids by 'frequency' (not by id)."""
    encoder = {"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120a": 4}
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n\u0120 a\n")
    (tmp_path / "dict.txt").write_text("2 100\n0 90\n4 80\n1 70\n3 60\n")
    return str(tmp_path / "dict.txt"), str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe")


def test_fairseq_text_import_remaps_dict_rows_to_tokenizer_ids(tmp_path):
    from d2v.config import apply_overrides, get_preset
    from d2v.data.tokenizer import Tokenizer
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import ImportRefused, import_fairseq
    from d2v.models import build_model

    cfg = get_preset("text_tiny")
    apply_overrides(cfg, ["model.text.vocab_size=10", "model.text.max_positions=16"])
    torch.manual_seed(0)
    model = build_model(cfg)
    sd = model.state_dict()
    # fairseq rows in dict.txt order, filled with their row number so moves are visible
    rows = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 64)
    fs = {"encoder.sentence_encoder.embed_tokens.weight": rows,
          "encoder.sentence_encoder.embed_positions.weight": sd["frontend.position_embeddings.weight"],
          "encoder.sentence_encoder.layernorm_embedding.weight": sd["frontend.LayerNorm.weight"],
          "encoder.sentence_encoder.layernorm_embedding.bias": sd["frontend.LayerNorm.bias"],
          "encoder.sentence_encoder.version": torch.tensor([3.0])}
    fs.update(_post_ln_blocks(sd, "encoder.sentence_encoder.layers."))
    for i in (0, 2):
        fs[f"encoder.regression_head.{i}.weight"] = sd[f"head.{i}.weight"]
        fs[f"encoder.regression_head.{i}.bias"] = sd[f"head.{i}.bias"]
    ema = {k[len("encoder.sentence_encoder."):]: v * 2 for k, v in fs.items() if "sentence_encoder.layers" in k}
    ckpt = str(tmp_path / "ckpt" / "checkpoint.pt")
    os.makedirs(tmp_path / "ckpt")
    tree = {"model": {"_name": "data2vec_text", "transformer": {"encoder": {"attention_heads": 4}}}}
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": {**fs, "encoder._ema": ema}})
    with pytest.raises(ImportRefused, match="dict.txt"):  # never paired with a tokenizer unmapped
        import_fairseq(ckpt, str(tmp_path / "refused"))
    dict_txt, enc, bpe = _gpt2_files(tmp_path)
    out = str(tmp_path / "d2v")
    import_fairseq(ckpt, out, dict_path=dict_txt, encoder_json=enc, vocab_bpe=bpe)
    student, teacher, icfg = load_exported(out)
    emb = student.frontend.word_embeddings.weight[:, 0].tolist()
    # tokenizer ids: specials 0-3, GPT-2 id g -> 4 + g, <mask> 9; fairseq rows: 4 + dict.txt line
    # (dict.txt lines: GPT-2 ids 2, 0, 4, 1, 3), <mask> row 9.
    assert emb == [0, 1, 2, 3, 5, 7, 4, 8, 6, 9]
    tok = Tokenizer(os.path.join(out, "tokenizer.json"))
    assert tok.encode("ab") == [6] and tok.encode(" a") == [8] and tok.encode("a b") == [4, 7, 5]
    assert torch.equal(teacher["encoder.blocks.1.ffn.fc1.weight"], 2 * sd["encoder.blocks.1.ffn.fc1.weight"])
    assert icfg.model.text.vocab_size == 10 and icfg.model.text.max_positions == 16
    with pytest.raises(ValueError, match="rows"):  # a dict.txt of another model
        (tmp_path / "short.txt").write_text("2 1\n0 1\n")
        import_fairseq(ckpt, str(tmp_path / "x"), dict_path=str(tmp_path / "short.txt"), encoder_json=enc,
                       vocab_bpe=bpe)


def test_beit_vision_import_splits_qkv_and_keeps_layer_scale(tmp_path):
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq

    cfg, model = _model("image_tiny")
    sd = model.state_dict()
    beit = {"cls_token": sd["encoder.cls_token.weight"], "mask_token": sd["mask_embedding.weight"].view(1, 1, -1),
            "patch_embed.proj.weight": sd["frontend.projection.weight"],
            "patch_embed.proj.bias": sd["frontend.projection.bias"],
            "rel_pos_bias.relative_position_bias_table": sd["encoder.rel_pos_bias.table"],
            "rel_pos_bias.relative_position_index": torch.zeros(65, 65, dtype=torch.long),
            "norm.weight": sd["encoder.final_norm.weight"], "norm.bias": sd["encoder.final_norm.bias"],
            "lm_head.weight": sd["head.weight"], "lm_head.bias": sd["head.bias"]}
    for b in range(4):
        p = f"encoder.blocks.{b}."
        beit[f"blocks.{b}.attn.qkv.weight"] = torch.cat([sd[p + "attention.q_proj.weight"],
                                                         sd[p + "attention.k_proj.weight"],
                                                         sd[p + "attention.v_proj.weight"]])
        beit[f"blocks.{b}.attn.q_bias"] = sd[p + "attention.q_proj.bias"]
        beit[f"blocks.{b}.attn.v_bias"] = sd[p + "attention.v_proj.bias"]
        beit[f"blocks.{b}.gamma_1"] = sd[p + "layer_scale_1.weight"]
        beit[f"blocks.{b}.gamma_2"] = sd[p + "layer_scale_2.weight"]
        for a, d in [("norm1", "attention_norm"), ("norm2", "ffn_norm"), ("attn.proj", "attention.out_proj"),
                     ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")]:
            for q in ("weight", "bias"):
                beit[f"blocks.{b}.{a}.{q}"] = sd[p + f"{d}.{q}"]
    ema = {k: v * 3 for k, v in beit.items()}
    ckpt = str(tmp_path / "beit.pth")
    import argparse

    torch.save({"model": beit, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(model="beit_tiny")}, ckpt)
    import_fairseq(ckpt, str(tmp_path / "d2v"))
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert (icfg.model.num_heads, icfg.model.image.image_size, icfg.model.image.patch_size) == (4, 32, 4)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(teacher["encoder.blocks.2.attention.k_proj.weight"], 3 * sd["encoder.blocks.2.attention.k_proj.weight"])
    assert torch.equal(teacher["encoder.blocks.3.layer_scale_2.weight"], 3 * sd["encoder.blocks.3.layer_scale_2.weight"])
    x, _ = _inputs(cfg)
    a, _ = _d2v_hidden(model, cfg, x, None)
    b, _ = _d2v_hidden(student.eval(), icfg, x, None)
    assert torch.equal(a, b)


def _v2_fairseq_state(sd, encoder, modality):
    """d2v 2.0 names -> fairseq data2vec_multi names, written out by hand (fused qkv with bias)."""
    P = f"modality_encoders.{encoder}."
    out = {}
    blocks = sorted({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")}, key=int)
    prenet = sorted({k.split(".")[2] for k in sd if k.startswith("encoder.prenet.")}, key=int)
    for d2v_prefix, fs_prefix, ids in (("encoder.blocks.", "blocks.", blocks),
                                       ("encoder.prenet.", P + "context_encoder.blocks.", prenet)):
        for b in ids:
            src, dst = f"{d2v_prefix}{b}.", f"{fs_prefix}{b}."
            for p in ("weight", "bias"):
                out[dst + f"attn.qkv.{p}"] = torch.cat([sd[src + f"attention.{n}_proj.{p}"] for n in "qkv"])
                for a, d in [("norm1", "attention_norm"), ("norm2", "ffn_norm"), ("attn.proj", "attention.out_proj"),
                             ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")]:
                    out[dst + f"{a}.{p}"] = sd[src + f"{d}.{p}"]
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            out[P + k.replace("decoder.layers.", "decoder.blocks.").replace(".conv.", ".0.")] = v
        elif k.startswith("decoder.proj"):
            out[P + k] = v
        elif k.startswith("encoder.layer_norm."):
            out[P + k.replace("encoder.layer_norm.", "context_encoder.norm.")] = v
    if modality == "audio":
        for k, v in sd.items():
            if k.startswith("frontend.conv_layers."):
                i = k.split(".")[2]
                tail = "0.weight" if k.endswith("conv.weight") else "2.1." + k.split(".")[-1]
                out[P + f"local_encoder.conv_layers.{i}.{tail}"] = v
            elif k.startswith("encoder.pos_conv.layers."):
                i = int(k.split(".")[3])
                out[P + f"relative_positional_encoder.{i + 1}.0.{k.split('.')[-1]}"] = v
        out[P + "project_features.1.weight"] = sd["frontend.layer_norm.weight"]
        out[P + "project_features.1.bias"] = sd["frontend.layer_norm.bias"]
        out[P + "project_features.2.weight"] = sd["frontend.projection.weight"]
        out[P + "project_features.2.bias"] = sd["frontend.projection.bias"]
        out[P + "alibi_scale"] = sd["encoder.alibi.scale"].view(1, 1, -1, 1, 1)
    elif modality == "text":
        out[P + "local_encoder.embed_tokens.weight"] = sd["frontend.word_embeddings.weight"]
        out[P + "local_encoder.embed_positions.weight"] = sd["frontend.position_embeddings.weight"]
        out[P + "local_encoder.layernorm_embedding.weight"] = sd["frontend.LayerNorm.weight"]
        out[P + "local_encoder.layernorm_embedding.bias"] = sd["frontend.LayerNorm.bias"]
    else:
        out[P + "local_encoder.proj.weight"] = sd["frontend.projection.weight"]
        out[P + "local_encoder.proj.bias"] = sd["frontend.projection.bias"]
        out[P + "extra_tokens"] = sd["encoder.cls_token.weight"]
        out[P + "fixed_positional_encoder.positions"] = torch.zeros(1, 64, sd["frontend.projection.bias"].shape[0])
    return out


@pytest.mark.parametrize("preset,encoder", [("audio_tiny_v2", "AUDIO"), ("image_tiny_v2", "IMAGE")])
def test_fairseq_data2vec2_import(preset, encoder, tmp_path):
    from d2v.config import list_presets
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq

    if preset not in list_presets():
        pytest.skip("this tree has no data2vec 2.0 presets")
    cfg, model = _model(preset)
    sd = model.state_dict()
    fs = _v2_fairseq_state(sd, encoder, cfg.model.modality)
    ema = {k: v * 2 for k, v in fs.items() if not k.startswith(f"modality_encoders.{encoder}.decoder")}
    tree = {"model": {"_name": "data2vec_multi", "num_heads": cfg.model.num_heads, "norm_eps": cfg.model.norm_eps,
                      "modalities": {encoder.lower(): {"feature_encoder_spec": str(list(cfg.model.audio.conv_layers)),
                                                       "decoder": {"decoder_residual": True}}}}}
    ckpt = str(tmp_path / "v2.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": {**fs, "_ema": ema}})
    info = import_fairseq(ckpt, str(tmp_path / "d2v"))
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert icfg.model.v2.enabled and icfg.model.v2.prenet_depth == cfg.model.v2.prenet_depth
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items()), info
    assert torch.equal(teacher["encoder.blocks.1.attention.k_proj.bias"], 2 * sd["encoder.blocks.1.attention.k_proj.bias"])
    assert set(teacher) == set(ema_names(icfg, student))


def test_fairseq_data2vec2_text_as_fairseq_saves_it(tmp_path):
    """The text recipes' layout: the EMA holds the encoder blocks only, keyed without `blocks.`
    (ema_encoder_only), and every modality's decoder defaults are in the cfg, audio's residual
    first: the text section's `decoder_residual: false` must win."""
    from d2v.config import apply_overrides, get_preset
    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq
    from d2v.models import build_model

    cfg = apply_overrides(get_preset("text_tiny_v2"), ["model.text.vocab_size=10", "model.text.max_positions=16",
                                                       "model.v2.decoder_residual=false"]).validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    sd = model.state_dict()
    fs = _v2_fairseq_state(sd, "TEXT", "text")
    ema = {k[len("blocks."):]: v * 2 for k, v in fs.items() if k.startswith("blocks.")}
    assert ema and all(k.split(".")[0].isdigit() for k in ema)
    tree = {"model": {"_name": "data2vec_multi", "num_heads": cfg.model.num_heads, "norm_eps": cfg.model.norm_eps,
                      "ema_encoder_only": True, "clone_batch": 4, "average_top_k_layers": 1, "layerdrop": 0.0,
                      "ema_anneal_end_step": 1234, "post_mlp_drop": 0.1,
                      "modalities": {"audio": {"decoder": {"decoder_residual": True}},
                                     "image": {"decoder": {"decoder_residual": True}},
                                     "text": {"decoder": {"decoder_residual": False}}}}}
    ckpt = str(tmp_path / "v2_text.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": {**fs, "_ema": ema}})
    dict_txt, enc, bpe = _gpt2_files(tmp_path)
    info = import_fairseq(ckpt, str(tmp_path / "d2v"), dict_path=dict_txt, encoder_json=enc, vocab_bpe=bpe)
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert icfg.model.v2.decoder_residual is False
    assert (icfg.model.v2.num_masks, icfg.teacher.top_k, icfg.model.layerdrop, icfg.teacher.ema_anneal_steps) == (
        4, 1, 0.0, 1234)
    assert any("post_mlp_drop" in n for n in info["notes"]), info["notes"]
    moved = ("frontend.word_embeddings.weight", "frontend.token_type_embeddings.weight")  # dict.txt rows; fairseq has none
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items() if k not in moved), info
    assert torch.equal(teacher["encoder.blocks.1.ffn.fc1.weight"], 2 * sd["encoder.blocks.1.ffn.fc1.weight"])
    assert any("ema_encoder_only" in n for n in info["notes"])


def ema_names(cfg, student):
    from d2v.teacher import Teacher

    t = Teacher(student, cfg.teacher)
    return t.ema_names + t.copy_names


def test_data2vec_2_checkpoint_exports_as_plain_state_dicts(tmp_path, capsys):
    """2.0 has no transformers architecture: its export is the plain one, and it loads back exactly."""
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

    with pytest.raises(SystemExit) as exit_:
        main(["export", out, str(tmp_path / "hf"), "--format", "hf"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and "2.0" in err and "Traceback" not in err


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
