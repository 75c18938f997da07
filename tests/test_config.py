"""Config tree: presets, overrides, validation messages, DeepSpeed JSON filling."""

import pytest

from d2v.config import (
    DeepSpeedConfigError, apply_overrides, fill_ds_config, from_dict, get_preset, list_presets, load_yaml, resolve,
    set_value, to_dict,
)
from d2v.config import schema


def test_every_field_has_a_doc_line():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(schema))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                    f"{cls.name}.{node.target.id} has no docstring line"


def test_presets_validate_and_large_differs_from_base():
    assert {"audio_tiny", "audio_base", "audio_large"} <= set(list_presets())
    for name in list_presets():
        get_preset(name).validate()
    base, large = get_preset("audio_base"), get_preset("audio_large")
    assert (large.model.embed_dim, large.model.depth, large.model.num_heads) == (1024, 24, 16)
    assert large.optim == base.optim and large.masking == base.masking
    assert base.masking.mask_prob == 0.65 and base.masking.mask_length == 10
    assert (base.teacher.ema_start, base.teacher.ema_end, base.teacher.ema_anneal_steps) == (0.999, 0.9999, 30_000)
    assert base.teacher.top_k == 8 and base.teacher.layer_norm == "instance" and base.teacher.final_norm is None
    assert (base.optim.lr, base.optim.betas, base.optim.eps, base.optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.01)
    assert base.optim.phase_ratios == (0.03, 0.90, 0.07)


def test_overrides_coerce_types_and_reject_unknown_keys():
    cfg = apply_overrides(get_preset("audio_tiny"), [
        "optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "masking.equalize=null", "model.audio.conv_pos_depth=3",
        "train.precision=fp32", "data.pad=true"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.masking.equalize is None
    assert cfg.model.audio.conv_pos_depth == 3 and cfg.train.precision == "fp32" and cfg.data.pad is True
    with pytest.raises(KeyError, match="did you mean lr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(cfg, ["model.depth=2.5"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["optim.lr"])


def test_yaml_carries_differences(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 0.0002\nmodel:\n  audio:\n    conv_pos_kernel: 17\n")
    cfg = load_yaml(get_preset("audio_tiny"), str(f))
    assert cfg.optim.lr == 2e-4 and cfg.model.audio.conv_pos_kernel == 17
    f.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(KeyError, match="learning_rate"):
        load_yaml(get_preset("audio_tiny"), str(f))


def test_round_trip_through_dict():
    cfg = resolve("audio_tiny", overrides=["optim.lr=1e-4"])
    assert from_dict(to_dict(cfg)) == cfg


def test_validate_names_what_to_change():
    with pytest.raises(ValueError) as e:
        resolve("audio_tiny", overrides=["teacher.top_k=5", "model.num_heads=5", "train.precision=fp8"])
    msg = str(e.value)
    assert "teacher.top_k=5" in msg and "model.num_heads=5" in msg and "train.precision" in msg


def test_ds_template_is_filled_and_contradictions_are_errors():
    cfg = resolve("audio_tiny", overrides=["train.micro_batch_size=3", "train.grad_accum=2", "optim.clip_norm=5"])
    ds = fill_ds_config({"zero_optimization": {"stage": 2}}, cfg, 4, on_cpu=True)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr and ds["zero_optimization"] == {"stage": 2}
    for bad, match in [({"train_batch_size": 16}, "train_batch_size"), ({"bf16": {"enabled": False}}, "bf16.enabled"),
                       ({"optimizer": {"type": "Adam"}}, "optim"), ({"gradient_clipping": 1.0}, "optim.clip_norm")]:
        with pytest.raises(DeepSpeedConfigError, match=match):
            fill_ds_config(bad, cfg, 4, on_cpu=True)
    cfg.train.global_batch_size = 10
    with pytest.raises(DeepSpeedConfigError, match="global_batch_size"):
        fill_ds_config({}, cfg, 4, on_cpu=True)
    fp16 = fill_ds_config({}, resolve("audio_tiny", overrides=["train.precision=fp16"]), 1, on_cpu=False)
    # on a GPU too: torch's fused AdamW, no FusedAdam built at start-up (tests/test_gpu_paths.py)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and fp16["optimizer"]["params"]["torch_adam"]


@pytest.mark.parametrize("preset,length", [
    ("image_base", 14 * 14 + 1), ("image_base_v2", 14 * 14 + 1),   # CLS + 196 patches
    ("text_base", 512), ("text_base_v2", 512),                     # no extra token
    ("audio_base", 999),                                           # 20 s at 16 kHz through the conv stack
])
def test_the_modality_spec_gives_the_longest_attention_sequence(preset, length):
    from d2v.config.modalities import modality_spec

    cfg = get_preset(preset)
    if cfg.model.modality == "audio":  # fairseq's max_sample_size; frames: 25 ms windows every 20 ms
        assert cfg.data.max_sample_size == 320_000 and (320_000 - 400) // 320 + 1 == 999
    assert modality_spec(cfg.model.modality).max_attention_length(cfg) == length


def test_an_unknown_modality_is_named():
    from d2v.config.modalities import modality_spec

    with pytest.raises(ValueError, match="unknown modality 'video'"):
        modality_spec("video")


def test_each_mask_kind_holds_and_checks_only_the_settings_it_reads():
    from d2v.config.mask_kinds import MASK_KINDS, Block2dMask, SpanMask, mask_config
    from d2v.config.modalities import SPECS

    # Every kind a modality offers is a member of the union, and the union has no kind nobody offers.
    offered = {k for spec in SPECS.values() for k in spec.masks + spec.masks_v2}
    assert offered == set(MASK_KINDS)
    for kind, cls in MASK_KINDS.items():
        assert cls.clones == any(kind in spec.masks_v2 for spec in SPECS.values())
    audio = resolve("audio_base")
    span = mask_config(audio.masking)
    assert isinstance(span, SpanMask) and span.mask_length == 10 and not hasattr(span, "num_mask_patches")
    assert isinstance(mask_config(resolve("image_base").masking), Block2dMask)
    # A setting the chosen kind does not read is not checked (it has no effect) ...
    resolve("audio_base", overrides=["masking.min_aspect=5"])
    # ... while one it reads is, with the message naming it.
    with pytest.raises(ValueError, match="masking.min_aspect=5.0 must be in"):
        resolve("image_base", overrides=["masking.min_aspect=5"])
    with pytest.raises(ValueError, match="masking.max_block_patches=8 is below masking.min_block_patches=16"):
        resolve("image_base", overrides=["masking.max_block_patches=8"])
    with pytest.raises(ValueError, match=r"masking.mask_prob=1.0 must be in \(0, 1\) for 2.0 masks"):
        resolve("text_base_v2", overrides=["masking.mask_prob=1.0"])
    with pytest.raises(ValueError, match="random_token_prob \\+ masking.leave_unmasked_prob must be <= 1"):
        resolve("text_base", overrides=["masking.random_token_prob=0.7", "masking.leave_unmasked_prob=0.5"])


def test_bert_masks_select_single_tokens_whatever_mask_length_says():
    """masking.mask_length is not a setting of the bert kind: validation, the mask maker and the FLOP
    count all read BERT's spans of one token."""
    from d2v.estimate.flops import flops_per_sample

    def flops(*overrides):
        return flops_per_sample(resolve("text_tiny", overrides=list(overrides))).as_dict()

    bert = flops("masking.kind=bert", "masking.mask_length=0")
    assert bert == flops("masking.kind=bert", "masking.mask_length=7")
    assert bert == flops("masking.kind=text_span", "masking.mask_length=1")
    assert bert != flops("masking.kind=text_span", "masking.mask_length=4")


@pytest.mark.parametrize("override", ["optim.lr=1e999", "train.max_steps=1e999", "optim.clip_norm=-1e999",
                                      "optim.lr=NaN", "optim.clip_norm=nan"])
def test_settings_are_finite(override):
    with pytest.raises(ValueError, match=override.split("=")[0]):
        resolve("audio_tiny", overrides=[override])
    cfg = get_preset("audio_tiny")
    with pytest.raises(ValueError, match="finite"):
        set_value(cfg, "optim.lr", float("inf"))


def test_one_shard_under_two_spellings_is_refused(tmp_path, monkeypatch):
    from d2v.data.shards import expand_pattern

    (tmp_path / "x.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="names one shard twice"):
        expand_pattern("x.tar ./x.tar")
    assert expand_pattern("x.tar") == ["x.tar"]


def test_each_choice_has_one_list_that_validation_and_the_implementation_share():
    """The values a choice setting takes are listed once (CHOICES): validation names exactly them,
    and the modules that implement a choice dispatch over exactly them."""
    from d2v.config.choices import CHOICES
    from d2v.losses import ELEMENTWISE
    from d2v.models.factory import HEADS
    from d2v.train.schedule import SCHEDULES

    assert tuple(SCHEDULES) == CHOICES["optim.schedule"]
    assert tuple(ELEMENTWISE) == CHOICES["loss.kind"]
    assert tuple(HEADS) == CHOICES["model.head"]
    for key in CHOICES:
        with pytest.raises(ValueError, match=f"{key}='nonsense': use one of"):
            apply_overrides(get_preset("audio_tiny"), [f"{key}=nonsense"]).validate()
