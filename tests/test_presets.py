"""Every base/large preset against the reference run it reproduces, and the batch plan at other world sizes.

The REFERENCE rows are written from the reference configurations (named in each row), not from the
presets: fairseq `examples/data2vec/config/...` yaml files (plus the fairseq defaults they rely on,
named where used), data2vec_vision's `beit/README.md` pretraining commands, and the data2vec paper
where d2v follows it instead of a config (docs/method.md, section "Presets", says why).
"""
import pytest
import torch

from d2v.config import apply_overrides, fill_ds_config, get_preset, list_presets
from d2v.config.batch_plan import apply_batch_plan, plan_batch

FAIRSEQ = "fairseq examples/data2vec/config/"
BEIT = "data2vec_vision beit/README.md"
IMAGENET = 1_281_167

# Fields left out of a row are not set by its source; v2 rows list their decoder.
REFERENCE = [
    dict(preset="audio_base", source=FAIRSEQ + "audio/pretraining/base_librispeech.yaml (+ tri_stage defaults)",
         batch=3_800_000 * 16, gpus=16, updates=400_000, schedule="tri_stage", phases=(0.03, 0.9, 0.07), lr=5e-4,
         end=0.01, betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=0.0, ema=(0.999, 0.9999, 30_000), k=8,
         norms=("instance", None), mask=("span", 0.65, 10), clones=1, layerdrop=0.05, dropouts=(0.1, 0.1, 0.0)),
    dict(preset="image_base", source=BEIT + " ViT-B command (run_cyclical.py)",
         batch=128 * 16, gpus=16, updates=800 * (IMAGENET // 128 // 16), warmup=10 * (IMAGENET // 128 // 16),
         schedule="cosine", lr=2e-3, end=1e-5, betas=(0.9, 0.999), eps=1e-8, wd=0.05, clip=3.0,
         ema=(0.9998, 0.9998, 0), k=6, norms=("layer", "layer"), mask=("block_2d", 120, 16), clones=1, layerdrop=0.0,
         dropouts=(0.0, 0.05, 0.0), drop_path=0.25, layer_scale=1e-4, crop=((0.08, 1.0), 0.4)),
    dict(preset="image_large", source=BEIT + " first ViT-L command",
         batch=64 * 64, gpus=64, updates=800 * (IMAGENET // 64 // 64), warmup=80 * (IMAGENET // 64 // 64),
         schedule="cosine", lr=1e-3, end=1e-5, betas=(0.9, 0.999), eps=1e-8, wd=0.05, clip=3.0,
         ema=(0.9998, 0.9998, 0), k=6, norms=("layer", "layer"), mask=("block_2d", 120, 16), clones=1, layerdrop=0.0,
         dropouts=(0.0, 0.15, 0.0), drop_path=0.2, layer_scale=1e-5, crop=((0.08, 1.0), 0.4)),
    dict(preset="image_large_phase2", source=BEIT + " second ViT-L command (constant ema decay)",
         batch=64 * 64, gpus=64, updates=800 * (IMAGENET // 64 // 64), warmup=40 * (IMAGENET // 64 // 64),
         schedule="cosine", lr=1e-3, end=1e-5, clip=3.0, ema=(0.9999, 0.9999, 0), k=6),
    dict(preset="text_base", source=FAIRSEQ + "text/pretraining/base.yaml (EMA anneal: the paper, section 4.3)",
         batch=8_192 * 16 // 512, gpus=16, updates=1_000_000, warmup=10_000, schedule="cosine", lr=2e-4, end=0.0,
         betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=5.0, ema=(0.999, 0.9999, 100_000), k=10, norms=("layer", None),
         mask=("text_span", 0.35, 4), clones=1, layerdrop=0.0, dropouts=(0.1, 0.1, 0.0)),
    dict(preset="audio_base_v2", source=FAIRSEQ + "v2/base_audio_only_task.yaml",
         batch=1_000_000 * 8, gpus=8, updates=400_000, warmup=8_000, schedule="cosine", lr=7.5e-4, end=0.0,
         betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=0.0, ema=(0.999, 0.99999, 75_000), k=8, norms=("instance", None),
         mask=("block_1d", 0.5, 5, 0.05), clones=8, layerdrop=0.05, prenet=0, depth=12, dropouts=(0.1, 0.1, 0.0),
         decoder=(384, 7, 4, 16, True, 1, 0.1)),
    dict(preset="audio_large_v2", source=FAIRSEQ + "v2/large_audio_only_task.yaml",
         batch=320_000 * 48, gpus=48, updates=600_000, warmup=10_000, schedule="cosine", lr=4e-4, end=0.0,
         betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=1.0, ema=(0.9997, 1.0, 300_000), k=16, norms=("instance", None),
         mask=("block_1d", 0.55, 5, 0.1), clones=12, layerdrop=0.0, prenet=8, depth=16, dropouts=(0.1, 0.1, 0.0),
         decoder=(768, 7, 4, 16, True, 1, 0.1)),
    dict(preset="image_base_v2", source=FAIRSEQ + "v2/base_images_only_task.yaml (crops: data/mae_image_dataset.py)",
         batch=16 * 16, gpus=16, updates=375_300, warmup=50_040, schedule="cosine", lr=1e-3, end=0.0,
         betas=(0.9, 0.95), eps=1e-8, wd=0.05, clip=4.0, ema=(0.9998, 0.99999, 100_000), k=10,
         norms=("instance", "layer"), mask=("inverse_block_2d", 0.8, 3, 0.07), clones=16, layerdrop=0.0, prenet=2,
         depth=10, dropouts=(0.0, 0.0, 0.0), decoder=(768, 3, 6, 16, True, 1, 0.0), cls_loss=0.01,
         crop=((0.2, 1.0), 0.0)),
    dict(preset="image_large_v2", source=FAIRSEQ + "v2/large_images_only_task.yaml",
         batch=8 * 16, gpus=16, updates=375_300, warmup=50_040, schedule="cosine", lr=4e-4, end=0.0,
         betas=(0.9, 0.95), eps=1e-8, wd=0.05, clip=4.0, ema=(0.9998, 0.99999, 150_000), k=18,
         norms=("instance", "layer"), mask=("inverse_block_2d", 0.75, 3, 0.1), clones=16, layerdrop=0.0, prenet=0,
         depth=24, dropouts=(0.0, 0.0, 0.0), decoder=(1024, 5, 3, 16, True, 1, 0.0), cls_loss=0.01,
         crop=((0.2, 1.0), 0.0)),
    dict(preset="text_base_v2", source=FAIRSEQ + "v2/base_text_only_task.yaml",
         batch=4 * 16, gpus=16, updates=1_000_000, warmup=4_000, schedule="cosine", lr=2e-4, end=0.0,
         betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=1.0, ema=(0.9999, 0.99999, 100_000), k=12,
         norms=("instance", None), mask=("random", 0.48), clones=8, layerdrop=0.0, prenet=0, depth=12,
         dropouts=(0.1, 0.1, 0.0), decoder=(768, 9, 5, 1, False, 2, 0.1)),
    dict(preset="text_large_v2", source=FAIRSEQ + "v2/large_text_only_task.yaml",
         batch=2 * 32, gpus=32, updates=600_000, warmup=4_000, schedule="cosine", lr=1e-4, end=0.0,
         betas=(0.9, 0.98), eps=1e-6, wd=0.01, clip=1.0, ema=(0.9999, 0.99999, 100_000), k=24,
         norms=("layer", "instance"), mask=("random", 0.5), clones=8, layerdrop=0.0, prenet=0, depth=24,
         dropouts=(0.1, 0.1, 0.0), decoder=(768, 9, 5, 1, False, 2, 0.1)),
]
# No reference configuration exists for these (docs/method.md, "Presets"): they reproduce no run.
NO_REFERENCE = ["audio_large", "text_large"]


def observed(cfg) -> dict:
    """The preset's values under the REFERENCE field names."""
    m, v, mk, t, o, tr = cfg.model, cfg.model.v2, cfg.masking, cfg.teacher, cfg.optim, cfg.train
    if mk.kind == "span" or mk.kind == "text_span":
        mask = (mk.kind, mk.mask_prob, mk.mask_length)
    elif mk.kind == "block_2d":
        mask = (mk.kind, mk.num_mask_patches, mk.min_block_patches)
    elif mk.kind == "random":
        mask = (mk.kind, mk.mask_prob)
    else:
        mask = (mk.kind, mk.mask_prob, mk.block_width, mk.mask_adjust)
    return dict(
        batch=tr.reference_batch, gpus=tr.reference_gpus, updates=tr.max_steps, warmup=o.warmup_steps,
        schedule=o.schedule, phases=o.phase_ratios, lr=o.lr,
        end=o.final_lr_scale if o.schedule == "tri_stage" else o.min_lr, betas=o.betas, eps=o.eps,
        wd=o.weight_decay, clip=o.clip_norm, ema=(t.ema_start, t.ema_end, t.ema_anneal_steps), k=t.top_k,
        norms=(t.layer_norm, t.final_norm), mask=mask, clones=v.num_masks if v.enabled else 1,
        layerdrop=m.layerdrop, prenet=v.prenet_depth, depth=m.depth,
        dropouts=(m.dropout, m.attention_dropout, m.activation_dropout), drop_path=m.image.drop_path,
        layer_scale=m.image.layer_scale_init, crop=(m.image.crop_scale, m.image.color_jitter), cls_loss=v.cls_loss,
        decoder=(v.decoder_dim, v.decoder_kernel, v.decoder_layers, v.decoder_groups, v.decoder_residual,
                 v.decoder_projection_layers, v.decoder_input_dropout),
    )


@pytest.mark.parametrize("row", REFERENCE, ids=[r["preset"] for r in REFERENCE])
def test_preset_matches_its_reference_run(row):
    cfg = get_preset(row["preset"]).validate()
    got = observed(cfg)
    wrong = {k: (got[k], want) for k, want in row.items() if k not in ("preset", "source") and got[k] != want}
    assert not wrong, f"{row['preset']} differs from {row['source']}: {{field: (preset, reference)}} = {wrong}"


@pytest.mark.parametrize("name,base", [("audio_large", "audio_base"), ("text_large", "text_base")])
def test_the_1_0_large_presets_are_the_paper_large_with_the_base_recipe(name, base):
    # The 1.0 paper (section 4) gives Large as 24 blocks of 1024 with a 4x1024 FFN, 16 heads in
    # the released checkpoints; it states no Large training settings, so every one is Base's.
    large, ref = get_preset(name).validate(), get_preset(base).validate()
    m = large.model
    assert (m.depth, m.embed_dim, m.ffn_dim, m.num_heads) == (24, 1024, 4 * 1024, 16)
    got, want = observed(large), observed(ref)
    for field in ("depth", "batch", "gpus"):
        del got[field], want[field]
    assert got == want
    assert large.data.max_samples_per_batch == ref.data.max_samples_per_batch
    assert large.train.micro_batch_size == ref.train.micro_batch_size


def test_every_base_and_large_preset_is_in_the_table():
    covered = {r["preset"] for r in REFERENCE} | set(NO_REFERENCE)
    full = {n for n in list_presets() if "tiny" not in n}
    assert full == covered, sorted(full ^ covered)
    for name in NO_REFERENCE:
        assert get_preset(name).train.reference_batch == 0


@pytest.mark.parametrize("row", REFERENCE, ids=[r["preset"] for r in REFERENCE])
def test_at_the_reference_gpu_count_each_rank_gets_the_reference_per_gpu_batch(row):
    cfg = get_preset(row["preset"])
    plan = plan_batch(cfg, row["gpus"])
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (row["batch"] // row["gpus"], 1, True)


@pytest.mark.parametrize("name,world,micro,accum", [
    ("image_base_v2", 8, 16, 2),           # fewer GPUs: the reference micro-batch, accumulated
    ("image_base_v2", 32, 8, 1),           # more GPUs: the share itself
    ("text_large_v2", 1, 2, 32),
    ("audio_base", 32, 1_900_000, 1),      # 60.8 M samples over 32 ranks
    ("audio_base", 5, 3_040_000, 4),       # 12.16 M per rank: 3.8 M does not divide it, 4 x 3.04 M does
])
def test_the_batch_plan_keeps_the_reference_global_batch(name, world, micro, accum):
    cfg = get_preset(name)
    plan = apply_batch_plan(cfg, world)
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (micro, accum, True)
    assert micro * accum * world == cfg.train.reference_batch
    per_rank = cfg.data.max_samples_per_batch if cfg.model.modality == "audio" else cfg.train.micro_batch_size
    assert (per_rank, cfg.train.grad_accum) == (micro, accum)


def test_the_deepspeed_batch_follows_the_plan():
    cfg = get_preset("image_base_v2")
    apply_batch_plan(cfg, 4)
    ds = fill_ds_config({}, cfg, 4, on_cpu=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (16, 4, 256)


def test_a_world_size_that_does_not_divide_the_reference_batch_is_reported():
    plan = plan_batch(get_preset("image_base"), 12)  # 2,048 images over 12 ranks
    assert not plan.matches_reference
    assert (plan.micro_batch, plan.grad_accum) == (128, 1)
    assert "do not divide" in plan.message and "2,048" in plan.message


def test_an_explicit_batch_wins_and_the_log_says_whether_it_matches():
    cfg = apply_overrides(get_preset("image_base_v2"), ["train.micro_batch_size=32"])
    plan = apply_batch_plan(cfg, 16)
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (32, 1, False)
    assert "NO LONGER MATCHES" in plan.message and "512" in plan.message
    cfg = apply_overrides(get_preset("image_base_v2"), ["train.micro_batch_size=32"])
    plan = apply_batch_plan(cfg, 8)
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (32, 1, True)
    cfg = apply_overrides(get_preset("audio_base_v2"), ["train.grad_accum=2"])
    plan = apply_batch_plan(cfg, 8)
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (1_000_000, 2, False)


@pytest.mark.parametrize("name", [n for n in list_presets() if "tiny" in n])
@pytest.mark.parametrize("world", [1, 2])
def test_tiny_presets_keep_their_per_rank_batch(name, world):
    cfg = get_preset(name)
    before = (cfg.train.micro_batch_size, cfg.data.max_samples_per_batch, cfg.train.grad_accum)
    plan = apply_batch_plan(cfg, world)
    assert (cfg.train.micro_batch_size, cfg.data.max_samples_per_batch, cfg.train.grad_accum) == before
    assert not plan.matches_reference and "reproduces no reference run" in plan.message


def test_weight_decay_exemptions_follow_beit_and_fairseq():
    """1.0 vision (BEiT): no decay on the CLS token and 1-D parameters; 2.0 (fairseq data2vec2.py): only
    1-D parameters and biases, the CLS token (extra_tokens) is decayed."""
    from d2v.models import build_model
    from d2v.train.trainer import param_group_names

    cfg = get_preset("image_tiny")
    decay, no_decay = param_group_names(build_model(cfg), cfg.optim.no_decay_1d)
    assert "encoder.cls_token.weight" in no_decay and "mask_embedding.weight" in no_decay
    assert "encoder.rel_pos_bias.table" in decay and all(n.endswith("weight") or "table" in n for n in decay)
    cfg = get_preset("image_tiny_v2")
    decay, no_decay = param_group_names(build_model(cfg), cfg.optim.no_decay_1d)
    assert "encoder.cls_token.weight" in decay
    cfg = get_preset("audio_tiny")  # 1.0 audio: one group, everything decayed
    assert len(param_group_names(build_model(cfg), cfg.optim.no_decay_1d)) == 1


def test_inits_follow_the_reference_models():
    from d2v.models import build_model

    torch.manual_seed(0)
    std = 0.02
    # Full widths (the init statistics depend on them), one block (they do not depend on depth).
    v1 = build_model(apply_overrides(get_preset("image_base"), ["model.depth=1"]))
    # BEiT truncates at one std: every weight within +-std, and the spread is 0.54 std, not std.
    w = v1.encoder.blocks[0].ffn.fc1.weight.detach()
    assert float(w.abs().max()) <= std and float(w.std()) == pytest.approx(0.0108, rel=0.02)
    assert float(v1.encoder.cls_token.weight.detach().abs().max()) <= std
    assert torch.count_nonzero(v1.encoder.rel_pos_bias.table) == 0
    v2 = build_model(apply_overrides(get_preset("image_base_v2"), ["model.depth=1", "model.v2.prenet_depth=0"]))
    assert float(v2.encoder.cls_token.weight.detach().std()) > 0.5  # N(0, 1)
    p = v2.frontend.projection.weight.detach()  # Xavier-uniform over D x (C p p)
    bound = (6.0 / (p.shape[0] + p[0].numel())) ** 0.5
    assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.9 * bound
    audio = build_model(get_preset("audio_tiny"))
    proj = audio.frontend.projection.weight.detach()  # PyTorch's default Linear init: U(+-1/sqrt(fan_in))
    assert float(proj.abs().max()) <= proj.shape[1] ** -0.5 and float(proj.abs().max()) > 0.9 * proj.shape[1] ** -0.5
    conv = audio.encoder.pos_conv.layers[0].conv.weight.detach()  # PyTorch's default Conv1d init
    fan_in = conv.shape[1] * conv.shape[2]
    assert float(conv.abs().max()) <= fan_in ** -0.5 and float(conv.abs().max()) > 0.9 * fan_in ** -0.5
    # 2.0 decoders: init_bert_params leaves convs alone and the decoder's reset_parameters() gives its
    # projection PyTorch's default back (fairseq `examples/data2vec/models/modalities/modules.py`).
    for name in ("audio_base_v2", "image_base_v2", "text_base_v2"):
        model = build_model(apply_overrides(get_preset(name), ["model.depth=1", "model.v2.prenet_depth=0"]))
        linears = [m for m in model.decoder.proj.modules() if isinstance(m, torch.nn.Linear)]
        for w in [layer.conv.weight for layer in model.decoder.layers] + [m.weight for m in linears]:
            bound = w[0].numel() ** -0.5  # U(+-1/sqrt(fan_in)): kaiming_uniform(a=sqrt(5))
            assert bound * 0.9 < float(w.detach().abs().max()) <= bound * (1 + 1e-6), name


def test_an_audio_budget_holds_one_longest_crop():
    """A batch holds at least one utterance, cropped to data.max_sample_size: a smaller per-rank
    budget would train more (and use more memory) than planned. audio_large_v2's 15.36 M samples
    over 64 ranks would be 240,000 each, under one 320,000-sample crop: the plan says it cannot
    split them and names the crop length that would."""
    plan = plan_batch(get_preset("audio_large_v2"), 64)
    assert (plan.micro_batch, plan.grad_accum, plan.matches_reference) == (320_000, 1, False)
    assert "cannot be split over 64 ranks" in plan.message and "data.max_sample_size=240,000" in plan.message
