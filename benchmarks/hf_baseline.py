#!/usr/bin/env python
"""The baseline d2v is measured against: a data2vec 1.0 step written the plain way on transformers.

What a user without d2v would write: transformers' Data2Vec{Audio,Vision,Text}Model as the student
(sized like the d2v preset), a `copy.deepcopy` of it as the teacher with forward hooks on the FFN
output projection of its top K layers (the target tap), fp32 parameter-free norms and the top-K
average in eager PyTorch, the masked regression loss, torch.optim.AdamW, and an fp32 EMA copy
lerped after every step and copied into the teacher; the forward passes under CPU bf16 autocast.
The student sees a masked view (audio: `mask_time_indices`, vision: `bool_masked_pos`, text: the
`<mask>` id), drawn once, so every timed step does the same work.

It also times the student's forward+backward alone (the floor a data2vec step cannot go under).
Random weights; nothing is downloaded. Needs the `hf` extra (`pip install transformers`).

  python benchmarks/hf_baseline.py audio --reps 3 --threads 2 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {"audio": "audio_base", "vision": "image_base", "text": "text_base"}


def _models(modality: str, batch: int, seconds: float):
    """(student, inputs with the masked view, loss mask B×T, FFN-output module of a layer, the layers)
    for the modality's base preset (sizes, K and norms from d2v's config, the model from transformers)."""
    import transformers as T

    from d2v.config import get_preset

    cfg = get_preset(PRESETS[modality])
    m = cfg.model
    sizes = dict(hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
                 intermediate_size=m.ffn_dim)
    g = torch.Generator().manual_seed(0)
    if modality == "audio":
        # A non-zero mask_time_prob makes transformers create `masked_spec_embed`; the explicit
        # mask_time_indices below replace its own SpecAugment draw, and the teacher runs in eval().
        hf_cfg = T.Data2VecAudioConfig(**sizes, layerdrop=0.0, mask_time_prob=0.05)
        student = T.Data2VecAudioModel(hf_cfg)
        wave = torch.randn(batch, int(seconds * m.audio.sample_rate), generator=g)
        frames = int(student._get_feat_extract_output_lengths(torch.tensor(wave.shape[1])))
        mask = torch.rand(batch, frames, generator=g) < 0.5
        inputs = {"input_values": wave, "mask_time_indices": mask}
        clean = {"input_values": wave}
        return student, inputs, clean, mask, (lambda layer: layer.feed_forward.output_dense), \
            (lambda model: model.encoder.layers), cfg
    if modality == "vision":
        hf_cfg = T.Data2VecVisionConfig(**sizes, image_size=m.image.image_size, patch_size=m.image.patch_size,
                                        use_mask_token=True, use_shared_relative_position_bias=True,
                                        use_mean_pooling=False, drop_path_rate=0.0,
                                        layer_scale_init_value=m.image.layer_scale_init)
        student = T.Data2VecVisionModel(hf_cfg)
        images = torch.randn(batch, 3, m.image.image_size, m.image.image_size, generator=g)
        patches = (m.image.image_size // m.image.patch_size) ** 2
        order = torch.rand(batch, patches, generator=g).argsort(dim=1)
        mask = order < cfg.masking.num_mask_patches
        inputs = {"pixel_values": images, "bool_masked_pos": mask}
        # The CLS output is not a target: prepend a never-masked slot so the mask indexes hidden states.
        mask = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), mask], dim=1)
        return student, inputs, {"pixel_values": images}, mask, (lambda layer: layer.output.dense), \
            (lambda model: model.encoder.layer), cfg
    t = m.text
    hf_cfg = T.Data2VecTextConfig(**sizes, vocab_size=t.vocab_size, max_position_embeddings=t.max_positions + 2,
                                  type_vocab_size=1, layer_norm_eps=m.norm_eps, pad_token_id=t.pad_id)
    student = T.Data2VecTextModel(hf_cfg, add_pooling_layer=False)
    tokens = torch.randint(5, t.vocab_size - 1, (batch, t.max_positions), generator=g)
    mask = torch.rand(batch, t.max_positions, generator=g) < cfg.masking.mask_prob
    masked = tokens.masked_fill(mask, t.vocab_size - 1)  # <mask> is the last id
    return student, {"input_ids": masked}, {"input_ids": tokens}, mask, (lambda layer: layer.output.dense), \
        (lambda model: model.encoder.layer), cfg


def _norm(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind == "instance":  # per sample and channel, over time
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    return x


class NaiveStep:
    """One data2vec 1.0 update the straightforward way (see the module docstring)."""

    def __init__(self, modality: str, *, batch: int = 2, seconds: float = 4.0, bf16: bool = True) -> None:
        torch.manual_seed(0)
        self.student, self.inputs, self.clean, self.mask, ffn, layers, cfg = _models(modality, batch, seconds)
        t = cfg.teacher
        self.k, self.layer_norm, self.final_norm, self.tau = t.top_k, t.layer_norm, t.final_norm, t.ema_start
        dim = cfg.model.embed_dim
        self.scale = dim ** -0.5 if cfg.loss.scale is None else cfg.loss.scale
        self.head = torch.nn.Linear(dim, dim)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.ema = [p.detach().float().clone() for p in self.teacher.parameters()]
        self.taps: list[torch.Tensor] = []
        for layer in layers(self.teacher)[-self.k:]:
            ffn(layer).register_forward_hook(lambda _m, _i, out: self.taps.append(out))
        o = cfg.optim
        self.opt = torch.optim.AdamW([*self.student.parameters(), *self.head.parameters()], lr=o.lr, betas=o.betas,
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def targets(self) -> torch.Tensor:
        self.taps.clear()
        with torch.no_grad(), self.autocast:
            self.teacher(**self.clean)
        with torch.no_grad():
            y = sum(_norm(a.float(), self.layer_norm) for a in self.taps) / self.k
            return _norm(y, self.final_norm)

    def student_only(self) -> None:
        with self.autocast:
            h = self.student(**self.inputs).last_hidden_state
            loss = self.head(h).float().square().mean()
        loss.backward()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        y = self.targets()
        with self.autocast:
            pred = self.head(self.student(**self.inputs).last_hidden_state).float()
        diff = pred[self.mask] - y[self.mask]
        loss = diff.square().sum(-1).mul(self.scale).sum() / diff.shape[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.student.parameters()], 1.0 - self.tau)
            for p, e in zip(self.teacher.parameters(), self.ema):
                p.copy_(e)
        return float(loss.detach())


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(modality: str, *, reps: int = 3, threads: int = 2, batch: int = 2, seconds: float = 4.0,
            bf16: bool = True) -> dict:
    """Median seconds of the naive step and of the student's forward+backward alone."""
    import transformers

    torch.set_num_threads(threads)
    step = NaiveStep(modality, batch=batch, seconds=seconds, bf16=bf16)
    student = _median_time(step.student_only, reps)
    full = _median_time(step.step, reps)
    return {"modality": modality, "preset": PRESETS[modality], "batch": batch, "bf16": bf16, "threads": threads,
            "params_M": round(sum(p.numel() for p in step.student.parameters()) / 1e6, 3),
            "student_fwd_bwd_s": round(student, 4), "naive_d2v_step_s": round(full, 4),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modality", choices=sorted(PRESETS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio: utterance length")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    try:
        rec = measure(args.modality, reps=args.reps, threads=args.threads, batch=args.batch, seconds=args.seconds,
                      bf16=not args.fp32)
    except ImportError as e:
        raise SystemExit(f"hf_baseline.py needs transformers (the `hf` extra: pip install -e .[hf]): {e}") from None
    print(json.dumps(rec) if args.json else rec)
    return rec


if __name__ == "__main__":
    main()
