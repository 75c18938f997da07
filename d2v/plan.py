"""`python -m d2v plan PRESET --world-size N [--rank R] [--zero S] [--data P] ...`: what one rank
of an N-rank run would build, without the process group or the engine.

It goes through the launcher's own steps (d2v.config.batch_plan.run_config, the shard streams of
d2v.train.shard_streams, d2v.config.deepspeed_json.fill_ds_config), so what it prints is what a
run of that size trains: the frozen config and its batch plan, the DeepSpeed JSON, the rank's
loader plan from `lengths.json` and, with --data, the batches that rank's loader really draws;
the per-rank memory of the model states for the ZeRO stage against the device's memory (weights,
gradients, optimizer state and teacher: activations are not counted); FLOPs per update.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from d2v.config import fill_ds_config, load_template, resolve, to_dict
from d2v.config.batch_plan import BatchPlan, run_config
from d2v.config.deepspeed_json import zero_stage
from d2v.config.modalities import modality_spec
from d2v.config.schema import D2vConfig


def _value(v: int | None, unit: str) -> dict[str, Any] | None:
    return None if v is None else {"value": v, "unit": unit}


def _flops_per_update(cfg: D2vConfig, global_batch: int) -> float:
    """Training FLOPs of one update: audio budgets are cut into crops of data.max_sample_size."""
    from d2v.estimate.flops import flops_per_sample

    spec = modality_spec(cfg.model.modality)
    if spec.varies_in_length:
        crop = cfg.data.max_sample_size
        return global_batch / crop * flops_per_sample(cfg, crop / cfg.model.audio.sample_rate).train_step
    return global_batch * flops_per_sample(cfg).train_step


def _memory_gb(cfg: D2vConfig, world_size: int, stage: int, ds: dict[str, Any]) -> float:
    from d2v.estimate.memory import per_rank_memory

    zero = ds.get("zero_optimization", {})
    mem = per_rank_memory(cfg, world_size=world_size, stage=stage, teacher_offload=cfg.teacher.offload == "cpu",
                          offload_optimizer=bool(zero.get("offload_optimizer")),
                          persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)))
    device = mem.student_params + mem.gradients + mem.teacher_device
    if not mem.optimizer_on_host:
        device += mem.optimizer_state
    return device / 1e9


def summary(cfg: D2vConfig, plan: BatchPlan, ds: dict[str, Any], *, rank: int = 0,
            device_memory_gb: float = 80.0) -> dict[str, Any]:
    """The plan of a resolved run config (no data drawn): the launcher logs this, `plan` prints it."""
    spec = modality_spec(cfg.model.modality)
    unit = spec.batch_unit
    world = plan.world_size
    global_batch = plan.micro_batch * plan.grad_accum * world
    stage = zero_stage(ds)
    memory = _memory_gb(cfg, world, stage, ds)
    ref = cfg.train.reference_batch if cfg.train.reference_batch > 0 else None
    return {
        "preset": cfg.name, "world_size": world, "rank": rank, "zero_stage": stage,
        "global_batch": _value(global_batch, unit), "reference_global_batch": _value(ref, unit),
        "matches_reference": plan.matches_reference, "micro_batch": _value(plan.micro_batch, unit),
        "grad_accum": plan.grad_accum, "ds_train_batch_size": ds["train_batch_size"],
        "steps_per_epoch": None, "drawn_batches": [],
        "memory_per_rank_gb": round(memory, 3), "fits_device": memory <= device_memory_gb,
        "flops_per_update": _flops_per_update(cfg, global_batch), "message": plan.message,
    }


def plan_run(preset: str, world_size: int, *, rank: int = 0, zero: int | None = None, ds_config: str | None = None,
             data: str | None = None, val_data: str | None = None, device_memory_gb: float = 80.0,
             config_file: str | None = None, overrides: list[str] | tuple[str, ...] = (),
             batches: int = 2) -> dict[str, Any]:
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} is not one of the {world_size} ranks")
    extra = [f"data.train_shards={data}"] if data else []
    extra += [f"data.val_shards={val_data}"] if val_data else []
    cfg, plan = run_config(resolve(preset, config_file, [*overrides, *extra]), world_size)
    template = load_template(ds_config or (f"zero{zero}.json" if zero else "cpu.json"))
    if zero is not None:
        template.setdefault("zero_optimization", {})["stage"] = zero
    ds = fill_ds_config(template, cfg, world_size, on_cpu=False)
    info = summary(cfg, plan, ds, rank=rank, device_memory_gb=device_memory_gb)
    if data:
        from d2v.train.shard_streams import shard_stream_factories

        make_stream, make_val = shard_stream_factories(cfg)
        stream = make_stream(rank, world_size)
        info["steps_per_epoch"] = stream.loader.steps_per_epoch
        drawn = []
        for _ in range(min(batches, info["steps_per_epoch"])):
            batch = stream.next_batch()
            size = batch.source.shape[0] * (batch.source.shape[1] if modality_spec(cfg.model.modality).varies_in_length
                                            else 1)
            drawn.append({"samples": int(size), "positions": int(batch.batch_size * batch.mask.shape[-1])})
        info["drawn_batches"] = drawn
        if make_val is not None:
            make_val(rank, world_size)  # a held-out set too small for this many ranks fails here, as in a run
    info["ds_config"] = ds
    info["config"] = to_dict(cfg)
    return info


def table(info: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, dict) and set(v) == {"value", "unit"}:
            return f"{v['value']:,} {v['unit']}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    rows = [(k, show(v)) for k, v in info.items() if k not in ("ds_config", "config", "drawn_batches", "message")]
    rows += [(f"drawn batch {i}", f"{b['samples']:,} samples, {b['positions']:,} positions")
             for i, b in enumerate(info["drawn_batches"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info["message"], *(f"  {k:<{width}}  {v}" for k, v in rows)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m d2v plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="preset name, or a `python -m d2v export` / import-fairseq directory")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                    help="ZeRO stage (the shipped zeroS.json; 0: cpu.json's settings)")
    ap.add_argument("--ds_config", default=None, help="a DeepSpeed template instead of --zero's")
    ap.add_argument("--config", default=None, help="YAML file of config differences")
    ap.add_argument("--data", default=None, help="training shard pattern: the loader's plan and first batches")
    ap.add_argument("--val-data", default=None, help="validation shard pattern")
    ap.add_argument("--device-memory-gb", type=float, default=80.0)
    ap.add_argument("--batches", type=int, default=2, help="batches to draw with --data")
    ap.add_argument("--json", action="store_true", help="print JSON (fixed keys, for scripts)")
    args = ap.parse_intermixed_args(argv)
    from d2v.train.launch import STARTUP_ERRORS, report_startup_error

    try:
        info = plan_run(args.preset, args.world_size, rank=args.rank, zero=args.zero, ds_config=args.ds_config,
                        data=args.data, val_data=args.val_data, device_memory_gb=args.device_memory_gb,
                        config_file=args.config, overrides=args.overrides, batches=args.batches)
    except STARTUP_ERRORS as err:
        raise SystemExit(report_startup_error(err)) from None
    print(json.dumps(info, indent=2) if args.json else table(info))


if __name__ == "__main__":
    main()
