"""The per-rank batch and gradient accumulation that reproduce a preset's reference global batch.

A preset that reproduces a published run states that run's global batch per update
(`train.reference_batch`, before the M clones of 2.0) and its GPU count (`train.reference_gpus`);
its per-rank batch (`train.micro_batch_size`, or `data.max_samples_per_batch` for audio, whose
micro-batches are sample budgets like fairseq's `max_tokens`) is the reference run's per-GPU batch.
At world size W the share of one rank is reference_batch / W:

- the reference per-GPU micro-batch is kept when it divides that share (grad_accum = share / micro);
- otherwise the fewest accumulation steps whose micro-batch divides the share exactly (so the
  micro-batch never exceeds the reference's per-GPU one, which is what fits in memory);
- when W does not divide the reference batch no exact plan exists: the reference micro-batch and the
  nearest accumulation are used, and the message says by how much the global batch differs.

A per-rank batch or grad_accum that differs from the preset's (a YAML or key=value override) wins;
the message then says whether the run still matches the reference global batch. docs/method.md
(section "Global batch") lists every preset's reference batch and its source.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig, freeze, is_frozen


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Per-rank micro-batch: samples (images, sequences), or waveform samples for audio."""
    grad_accum: int
    """Micro-batches accumulated per optimizer update."""
    matches_reference: bool
    """micro_batch x grad_accum x world size equals the reference run's global batch."""
    message: str
    """One line for the run's log."""
    world_size: int
    """The data-parallel ranks planned for."""


def _unit(cfg: D2vConfig) -> tuple[str, str]:
    """(config key of the per-rank batch, its unit) for the config's modality."""
    spec = modality_spec(cfg.model.modality)
    return spec.batch_key, spec.batch_unit


def _micro(cfg: D2vConfig) -> int:
    return modality_spec(cfg.model.modality).per_rank_batch(cfg)


def _preset_batch(cfg: D2vConfig) -> tuple[int, int] | None:
    """(per-rank batch, grad_accum) of the preset the config started from, None for an unknown name."""
    from d2v.config.presets import get_preset, list_presets

    if cfg.name not in list_presets():
        return None
    base = get_preset(cfg.name)
    return _micro(base), base.train.grad_accum


def plan_batch(cfg: D2vConfig, world_size: int) -> BatchPlan:
    """The batch plan of `cfg` on `world_size` data-parallel ranks (does not change cfg)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    tr = cfg.train
    key, unit = _unit(cfg)
    micro, accum = _micro(cfg), tr.grad_accum
    ref, gpus = tr.reference_batch, tr.reference_gpus
    if ref <= 0:
        return BatchPlan(micro, accum, False,
                         f"batch: {micro:,} {unit} x {accum} accumulation x {world_size} ranks = "
                         f"{micro * accum * world_size:,} per update (preset {cfg.name} reproduces no reference run)",
                         world_size)
    source = f"the reference run: {ref:,} {unit} per update on {gpus} GPUs"
    if _preset_batch(cfg) not in (None, (micro, accum)):
        total = micro * accum * world_size
        if total == ref:
            return BatchPlan(micro, accum, True, f"batch: {key}={micro:,} x grad_accum={accum} x {world_size} ranks "
                                                 f"= {total:,} {unit} per update, as in {source}", world_size)
        return BatchPlan(micro, accum, False,
                         f"batch: {key}={micro:,} x grad_accum={accum} x {world_size} ranks = {total:,} {unit} per "
                         f"update (set by the config) NO LONGER MATCHES {source} ({total / ref:.3g}x); the learning "
                         f"rate and schedule were tuned for the reference batch", world_size)
    ref_micro = max(ref // max(gpus, 1), 1)
    smallest = modality_spec(cfg.model.modality).smallest_per_rank_batch(cfg)
    if ref < smallest * world_size:
        total = smallest * world_size
        spec = modality_spec(cfg.model.modality)
        share = ref // world_size
        hint = (f", or set data.max_sample_size={share:,} (shorter crops) to split it here"
                if spec.varies_in_length and share >= cfg.data.min_sample_size else "")
        return BatchPlan(smallest, 1, False,
                         f"batch: {source} cannot be split over {world_size} ranks: the smallest per-rank batch "
                         f"is {key}={smallest:,}, so {total:,} {unit} per update ({total / ref:.3g}x the reference); "
                         f"at most {ref // smallest} ranks reach the reference batch{hint}", world_size)
    if ref % world_size:
        accum = max(1, round(ref / (world_size * ref_micro)))
        total = ref_micro * accum * world_size
        return BatchPlan(ref_micro, accum, False,
                         f"batch: {world_size} ranks do not divide {source}; using {key}={ref_micro:,} x "
                         f"grad_accum={accum} = {total:,} per update ({total / ref:.3g}x the reference)", world_size)
    share = ref // world_size
    accum = math.ceil(share / ref_micro)
    while share % accum:
        accum += 1
    micro = share // accum
    return BatchPlan(micro, accum, True, f"batch: {key}={micro:,} x grad_accum={accum} x {world_size} ranks = "
                                         f"{ref:,} {unit} per update, as in {source}", world_size)


def apply_batch_plan(cfg: D2vConfig, world_size: int) -> BatchPlan:
    """Plans the batch for `world_size` ranks and writes it into cfg (per-rank batch and grad_accum)."""
    plan = plan_batch(cfg, world_size)
    modality_spec(cfg.model.modality).set_per_rank_batch(cfg, plan.micro_batch)
    cfg.train.grad_accum = plan.grad_accum
    return plan


def run_config(cfg: D2vConfig, world_size: int) -> tuple[D2vConfig, BatchPlan]:
    """The config a run on `world_size` ranks reads, and its batch plan: a validated, frozen copy
    of `cfg` with the plan's per-rank batch and accumulation written in. Everything a run builds
    (loader, DeepSpeed JSON, engine, logs) is built from this one object, after the plan."""
    if is_frozen(cfg):  # already a run config: its batch is the plan (the config's own setting)
        return cfg, plan_batch(cfg, world_size)
    resolved = copy.deepcopy(cfg)
    plan = apply_batch_plan(resolved, world_size)
    return freeze(resolved.validate()), plan
