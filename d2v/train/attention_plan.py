"""Chooses the attention backend of every shape a run will see, once, at start-up, the same on
every rank (kernels.plan_attention): timing inside a forward would run under activation
checkpointing (its recomputation then saves a different number of tensors), would let ranks pick
different kernels, and would be invisible to torch.compile.
"""
from __future__ import annotations

import torch

from d2v import kernels
from d2v import collectives
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig

# Head dims a fused kernel serves; other widths (the tiny presets) always run SDPA.
FUSED_HEAD_DIMS = (64, 80, 128)


def max_length(cfg: D2vConfig) -> int:
    """The longest self-attention sequence of the model (extra tokens such as CLS included)."""
    return modality_spec(cfg.model.modality).max_attention_length(cfg)


def run_buckets(cfg: D2vConfig, dtype: torch.dtype) -> list:
    """Student (training: gradients, dropout) and teacher (no gradients) shape families."""
    m = cfg.model
    head_dim = m.embed_dim // m.num_heads
    common = dict(dtype=dtype, head_dim=head_dim, max_len=max_length(cfg))
    dropout = m.attention_dropout > 0
    if modality_spec(m.modality).learned_attention_bias(m):
        return (kernels.attention_buckets(**common, bias=True, bias_grad=True, dropout=dropout, grad=True)
                + kernels.attention_buckets(**common, bias=True, grad=False))
    if m.v2.alibi:
        return (kernels.attention_buckets(**common, padding=(True, False), alibi=True, alibi_positions=True,
                                          alibi_grad=True, dropout=dropout, grad=True)
                + kernels.attention_buckets(**common, padding=(True, False), alibi=True, grad=False))
    padding = (True, False) if modality_spec(m.modality).padded else False
    return (kernels.attention_buckets(**common, padding=padding, dropout=dropout, grad=True)
            + kernels.attention_buckets(**common, padding=padding, grad=False))


def plan_for_run(cfg: D2vConfig, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Plans the run's attention backends on a GPU (every rank calls this); returns log lines."""
    head_dim = cfg.model.embed_dim // cfg.model.num_heads
    if device.type != "cuda" or head_dim not in FUSED_HEAD_DIMS:
        return []
    clones = cfg.model.clones
    rows = cfg.train.micro_batch_size * clones
    spec = modality_spec(cfg.model.modality)
    if spec.varies_in_length:  # a budget of input samples: as many rows of a bucket's length as fit
        positions = spec.positions(cfg.model, spec.per_rank_batch(cfg))

        def batch(bucket) -> int:
            return max(1, positions // max(bucket.tq, 1)) * clones
    else:
        def batch(bucket) -> int:
            return rows

    reduce_times = collectives.all_reduce_values if collectives.world_size() > 1 else None
    kernels.plan_attention(run_buckets(cfg, dtype), num_heads=cfg.model.num_heads, batch=batch, device=device,
                           reduce_times=reduce_times)
    return kernels.describe_attention_plan()
