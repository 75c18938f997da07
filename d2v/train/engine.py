"""The DeepSpeed engine of a job, started one way for pretraining and fine-tuning alike.

From the job's resolved config (its `train` and `optim` sections) and a DeepSpeed JSON template:
the filled and checked JSON, the LR schedule, `deepspeed.initialize`, and the two changes d2v
makes to every engine: checkpoints read through d2v.safe_load, and no per-parameter overflow
check in bf16 (the guarded update has decided finiteness already).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from d2v.config import fill_ds_config
from d2v.config.deepspeed_json import optimizer_description, zero_stage
from d2v.train import distributed
from d2v.train.ds_checks import check_ds_config
from d2v.train.schedule import lr_factor


@dataclass
class EngineParts:
    engine: Any
    optimizer: Any
    scheduler: Any
    ds_config: dict[str, Any]
    zero_stage: int
    optimizer_name: str


def drop_redundant_overflow_check(engine, precision: str) -> None:
    """DeepSpeed's bf16 optimizer without ZeRO (its fp16 "unfused" wrapper) checks every
    parameter's gradient for inf/NaN, one device read per parameter, and has no setting to turn
    that off. In bf16 there is no loss scale to adjust, and the training step has already skipped
    any non-finite update on every rank before `engine.step()`, so the check can only answer no."""
    checker = getattr(engine.optimizer, "overflow_checker", None)
    if precision == "bf16" and checker is not None:
        checker.check = lambda *args, **kwargs: False


def start_engine(model: torch.nn.Module, cfg: Any, ds_template: dict[str, Any], world_size: int,
                 param_groups: list[dict[str, Any]]) -> EngineParts:
    """`cfg`: a resolved job config with `train` and `optim` sections (pretraining's D2vConfig or
    a FinetuneConfig)."""
    import deepspeed

    from d2v.train.safe_checkpoint_engine import install_safe_checkpoint_engine

    ds_config = fill_ds_config(ds_template, cfg, world_size, on_cpu=distributed.on_cpu())
    check_ds_config(ds_config)
    factor = lr_factor(cfg.optim, cfg.train.max_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    drop_redundant_overflow_check(engine, cfg.train.precision)
    install_safe_checkpoint_engine(engine)  # DeepSpeed reads checkpoints through d2v.safe_load
    return EngineParts(engine, optimizer, scheduler, ds_config, zero_stage(ds_config),
                       optimizer_description(ds_config))
