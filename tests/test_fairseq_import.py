"""fairseq / BEiT import (README, interop): checkpoints written here in the layouts fairseq and
data2vec_vision really save (EMA of the whole model or of the encoder blocks, omegaconf cfg trees
with every modality's defaults), without fairseq or omegaconf: stand-in classes are registered
only while saving."""
import enum
import json
import os
import sys
import types

import pytest
import torch

from test_interop import _d2v_hidden, _inputs, _model, ema_names

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


def _planned(out, world_size=8):
    """The run config `python -m d2v plan OUT --world-size N` resolves for an import directory."""
    from d2v.plan import plan_run

    return plan_run(out, world_size)["config"]


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
    planned = _planned(str(tmp_path / "d2v"), 64)  # what a 64-rank run continuing from it trains
    assert (planned["teacher"]["top_k"], planned["teacher"]["ema_anneal_steps"], planned["model"]["layerdrop"]) == (
        2, 300, 0.0)


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
    # a recipe unlike every preset's: dropouts and LayerDrop in the encoder's TransformerConfig,
    # masking in the masked_lm task, which owns it; the model section holds the teacher and loss
    tree = {"model": {"_name": "data2vec_text", "average_top_k_layers": 1, "loss_beta": 0.5,
                      "ema_anneal_end_step": 77, "layer_norm_target_layer": False, "instance_norm_target_layer": True,
                      "transformer": {"dropout": 0.25, "attention_dropout": 0.15, "activation_dropout": 0.05,
                                      "encoder": {"attention_heads": 4, "layerdrop": 0.2}}},
            "task": {"_name": "masked_lm", "mask_prob": 0.3, "mask_multiple_length": 3, "random_token_prob": 0.0,
                     "leave_unmasked_prob": 0.0, "mask_stdev": 1.5}}
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
    planned = _planned(out)
    m, mk, t = planned["model"], planned["masking"], planned["teacher"]
    assert (m["dropout"], m["attention_dropout"], m["activation_dropout"], m["layerdrop"]) == (0.25, 0.15, 0.05, 0.2)
    assert (mk["mask_prob"], mk["mask_length"], mk["random_token_prob"], mk["leave_unmasked_prob"]) == (0.3, 3, 0, 0)
    assert (t["top_k"], t["ema_anneal_steps"], t["layer_norm"], planned["loss"]["beta"]) == (1, 77, "instance", 0.5)
    with open(os.path.join(out, "export.json")) as f:
        assert any("task.mask_stdev=1.5" in n for n in json.load(f)["notes"])
    with pytest.raises(ValueError, match="rows"):  # a dict.txt of another model
        (tmp_path / "short.txt").write_text("2 1\n0 1\n")
        import_fairseq(ckpt, str(tmp_path / "x"), dict_path=str(tmp_path / "short.txt"), encoder_json=enc,
                       vocab_bpe=bpe)


def _beit_state(sd, depth, grid):
    """d2v image 1.0 names -> data2vec_vision (BEiT) names: fused qkv weight, separate q/v biases, gamma_1/2."""
    tokens = grid * grid + 1
    beit = {"cls_token": sd["encoder.cls_token.weight"], "mask_token": sd["mask_embedding.weight"].view(1, 1, -1),
            "patch_embed.proj.weight": sd["frontend.projection.weight"],
            "patch_embed.proj.bias": sd["frontend.projection.bias"],
            "rel_pos_bias.relative_position_bias_table": sd["encoder.rel_pos_bias.table"],
            "rel_pos_bias.relative_position_index": torch.zeros(tokens, tokens, dtype=torch.long),
            "norm.weight": sd["encoder.final_norm.weight"], "norm.bias": sd["encoder.final_norm.bias"],
            "lm_head.weight": sd["head.weight"], "lm_head.bias": sd["head.bias"]}
    for b in range(depth):
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
    return beit


# run_cyclical.py's namespace with a recipe unlike every preset's (its own names and spellings)
BEIT_ARGS = dict(model="beit_tiny", target_layers="[2, 3]", layer_scale_init_value=1e-4, drop_path=0.25,
                 attn_drop_rate=0.02, ema_decay_init=0.5, ema_decay=0.6, ema_start_at=40, num_mask_patches=20,
                 min_mask_patches_per_block=5, max_mask_patches_per_block=None, l2_loss=True, l1_beta=0.12,
                 loss_scale=-1, no_target_layer_norm_last=False, target_instance_norm=False,
                 post_target_layer_norm=False, post_target_instance_norm=True, mask_dropout_prob=-1.0,
                 layer_results="end", var_w0=0.0, target_batch_norm=False, input_size=32)


def test_beit_vision_import_splits_qkv_and_keeps_its_method(tmp_path):
    import argparse

    from d2v.export import load_exported
    from d2v.interop.fairseq_import import import_fairseq

    cfg, model = _model("image_tiny")
    sd = model.state_dict()
    beit = _beit_state(sd, 4, 8)
    ema = {k: v * 3 for k, v in beit.items()}
    ckpt = str(tmp_path / "beit.pth")
    torch.save({"model": beit, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(**BEIT_ARGS)}, ckpt)
    out = str(tmp_path / "d2v")
    info = import_fairseq(ckpt, out)
    student, teacher, icfg = load_exported(out)
    assert (icfg.model.num_heads, icfg.model.image.image_size, icfg.model.image.patch_size) == (4, 32, 4)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(teacher["encoder.blocks.2.attention.k_proj.weight"], 3 * sd["encoder.blocks.2.attention.k_proj.weight"])
    assert torch.equal(teacher["encoder.blocks.3.layer_scale_2.weight"], 3 * sd["encoder.blocks.3.layer_scale_2.weight"])
    x, _ = _inputs(cfg)
    a, _ = _d2v_hidden(model, cfg, x, None)
    b, _ = _d2v_hidden(student.eval(), icfg, x, None)
    assert torch.equal(a, b)
    planned = _planned(out)
    m, t, mk, lo = planned["model"], planned["teacher"], planned["masking"], planned["loss"]
    assert (t["top_k"], t["ema_start"], t["ema_end"], t["ema_anneal_steps"]) == (2, 0.5, 0.6, 40)
    assert (t["layer_norm"], t["final_norm"]) == ("layer", "instance")
    assert (m["image"]["layer_scale_init"], m["image"]["drop_path"], m["attention_dropout"]) == (1e-4, 0.25, 0.02)
    assert (mk["num_mask_patches"], mk["min_block_patches"], mk["max_block_patches"]) == (20, 5, None)
    assert (lo["kind"], lo["scale"]) == ("l2", 1.0)
    assert not any("not taken" in n for n in info["notes"]), info["notes"]  # -1.0 is mask dropout's "off"


def test_beit_vision_import_of_another_image_size(tmp_path):
    """A 64-px / patch-16 model (16 patches) whose namespace names no mask count and whose target
    layers are not the top ones: imported with the preset's share of masked patches, and the
    layers d2v cannot average are named."""
    import argparse

    from d2v.config import apply_overrides, get_preset
    from d2v.interop.fairseq_import import import_fairseq
    from d2v.models import build_model

    cfg = apply_overrides(get_preset("image_tiny"), ["model.image.image_size=64", "model.image.patch_size=16",
                                                     "masking.num_mask_patches=10"]).validate()
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    ckpt = str(tmp_path / "beit64.pth")
    args = argparse.Namespace(model="beit_tiny_patch16_64", target_layers="[1, 2]", drop_path=0.0)
    torch.save({"model": _beit_state(sd, 4, 4), "args": args}, ckpt)
    info = import_fairseq(ckpt, str(tmp_path / "d2v"))
    planned = _planned(str(tmp_path / "d2v"))
    assert (planned["model"]["image"]["image_size"], planned["model"]["image"]["patch_size"]) == (64, 16)
    assert planned["masking"]["num_mask_patches"] == round(16 * 39 / 64)
    assert any("args.target_layers=[1, 2]" in n for n in info["notes"]), info["notes"]


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
    # every modality's section is saved; only this encoder's may be read (the others differ)
    sections = {name: {"mask_prob": 0.9, "mask_length": 9, "mask_prob_adjust": 0.3, "mask_noise_std": 0.5,
                       "decoder": {"decoder_residual": False, "input_dropout": 0.4}}
                for name in ("audio", "image", "text")}
    sections[encoder.lower()] = {"mask_prob": 0.6, "mask_length": 2, "mask_prob_adjust": 0.02, "mask_noise_std": 0.05,
                                 "inverse_mask": encoder == "IMAGE", "input_size": 32, "prenet_dropout": 0.0,
                                 "feature_encoder_spec": str(list(cfg.model.audio.conv_layers)),
                                 "decoder": {"decoder_residual": True, "input_dropout": 0.2}}
    top_k = cfg.model.depth - 1
    tree = {"model": {"_name": "data2vec_multi", "num_heads": cfg.model.num_heads, "norm_eps": cfg.model.norm_eps,
                      "encoder_dropout": 0.05, "post_mlp_drop": 0.05, "attention_dropout": 0.07,
                      "activation_dropout": 0.03, "clone_batch": 3, "average_top_k_layers": top_k, "ema_decay": 0.9,
                      "ema_end_decay": 0.95, "ema_anneal_end_step": 50, "layer_norm_target_layer": True,
                      "instance_norm_target_layer": False, "instance_norm_targets": True, "layer_norm_targets": False,
                      "cls_loss": 0.5 if encoder == "IMAGE" else 0.0, "modalities": sections}}
    ckpt = str(tmp_path / "v2.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": {**fs, "_ema": ema}})
    info = import_fairseq(ckpt, str(tmp_path / "d2v"))
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert icfg.model.v2.enabled and icfg.model.v2.prenet_depth == cfg.model.v2.prenet_depth
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items()), info
    assert torch.equal(teacher["encoder.blocks.1.attention.k_proj.bias"], 2 * sd["encoder.blocks.1.attention.k_proj.bias"])
    assert set(teacher) == set(ema_names(icfg, student))
    planned = _planned(str(tmp_path / "d2v"))
    m, v, mk, t = planned["model"], planned["model"]["v2"], planned["masking"], planned["teacher"]
    assert (mk["mask_prob"], mk["block_width"], mk["mask_adjust"]) == (0.6, 2, 0.02)
    assert (v["mask_noise_std"], v["decoder_input_dropout"], v["decoder_residual"]) == (0.05, 0.2, True)
    assert v["num_masks"] == 3
    assert (m["dropout"], m["attention_dropout"], m["activation_dropout"]) == (0.05, 0.07, 0.03)
    assert (t["top_k"], t["ema_start"], t["ema_end"], t["ema_anneal_steps"]) == (top_k, 0.9, 0.95, 50)
    assert (t["layer_norm"], t["final_norm"], v["cls_loss"]) == ("layer", "instance", 0.5 if encoder == "IMAGE" else 0)
    assert not any("not taken" in n for n in info["notes"]), info["notes"]
    # --format hf: the transformers directory of 2.0 (d2v's modelling file), here the EMA teacher's
    from safetensors.torch import load_file

    import_fairseq(ckpt, str(tmp_path / "hf"), fmt="hf", teacher=True)
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    key = "encoder.blocks.1.attention.k_proj.bias"
    assert torch.equal(hf[key], 2 * sd[key])
    assert os.path.exists(tmp_path / "hf" / "modeling_data2vec2.py")


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
                      "ema_anneal_end_step": 1234, "post_mlp_drop": 0.3,
                      "modalities": {"audio": {"mask_prob": 0.65, "decoder": {"decoder_residual": True}},
                                     "image": {"mask_prob": 0.8, "decoder": {"decoder_residual": True}},
                                     "text": {"mask_prob": 0.4, "mask_length": 1, "mask_prob_adjust": 0.1,
                                              "decoder": {"decoder_residual": False, "input_dropout": 0.0}}}}}
    ckpt = str(tmp_path / "v2_text.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": {**fs, "_ema": ema}})
    dict_txt, enc, bpe = _gpt2_files(tmp_path)
    info = import_fairseq(ckpt, str(tmp_path / "d2v"), dict_path=dict_txt, encoder_json=enc, vocab_bpe=bpe)
    student, teacher, icfg = load_exported(str(tmp_path / "d2v"))
    assert icfg.model.v2.decoder_residual is False
    assert (icfg.model.v2.num_masks, icfg.teacher.top_k, icfg.model.layerdrop, icfg.teacher.ema_anneal_steps) == (
        4, 1, 0.0, 1234)
    # d2v's block drops out after attention and FFN alike; a different post-FFN rate is named
    assert any("post_mlp_drop=0.3" in n for n in info["notes"]), info["notes"]
    assert any("mask_prob_adjust=0.1" in n for n in info["notes"]), info["notes"]  # random masks have none
    planned = _planned(str(tmp_path / "d2v"))
    assert (planned["masking"]["mask_prob"], planned["model"]["v2"]["decoder_input_dropout"]) == (0.4, 0.0)
    assert planned["model"]["v2"]["decoder_residual"] is False
    moved = ("frontend.word_embeddings.weight", "frontend.token_type_embeddings.weight")  # dict.txt rows; fairseq has none
    assert all(torch.equal(student.state_dict()[k], v) for k, v in sd.items() if k not in moved), info
    assert torch.equal(teacher["encoder.blocks.1.ffn.fc1.weight"], 2 * sd["encoder.blocks.1.ffn.fc1.weight"])
    assert any("ema_encoder_only" in n for n in info["notes"])
