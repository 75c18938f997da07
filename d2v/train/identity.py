"""What a pretraining run is made of, recorded in every checkpoint and compared before a resume
builds anything: the model's structure and precision, the data (shard patterns, and a digest of
the shard names, their sidecars and tokenizer), the batching and seed, the world size and ZeRO stage.

A change that keeps the saved position meaningful is applied and logged (an LR, a schedule, a
dropout, another world size, ZeRO 1 <-> 2 through DeepSpeed's universal form). Any other is refused
before an engine exists, with a message naming what changed and how to branch instead.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from d2v.config import to_dict

# Settings that decide which samples form the batches of an epoch: the recorded position (batches
# consumed) means something only under the same ones.
POSITION_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.seed", "data.max_samples_per_batch",
                 "data.min_sample_size", "data.max_sample_size", "data.pad", "data.buffer_size")
# ZeRO stages whose optimizer state DeepSpeed's universal form moves between (measured: 1 <-> 2
# restores every weight and moment exactly; to or from stage 3, or stage 0, it fails to load).
UNIVERSAL_STAGES = (1, 2)
# Beside the shards: the files that say what the shards hold.
DATA_FILES = ("lengths.json", "tokenizer.json", "classes.json")


class RunMismatch(ValueError):
    """A resume that would continue another run: what differs and how to branch."""


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def _file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def data_identity(pattern: str) -> dict[str, Any]:
    """The shard names and the bytes of the files prepare wrote beside them (not the shards
    themselves: a digest of a corpus would take as long as an epoch)."""
    if not pattern:
        return {"train_shards": "", "digest": None, "tokenizer": None}
    from d2v.data.shards import expand_pattern

    paths = expand_pattern(pattern)
    dirs = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    parts = [os.path.basename(p).encode() for p in paths]
    tokenizer = None
    for d in dirs:
        for name in DATA_FILES:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                parts += [name.encode(), _file(path)]
                if name == "tokenizer.json":
                    tokenizer = _digest([_file(path)])
    return {"train_shards": pattern, "digest": _digest(parts), "tokenizer": tokenizer}


def model_structure(cfg) -> str:
    """A digest of the student's parameter names and shapes and of what the teacher holds."""
    import torch

    from d2v.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    parts = [f"{n}:{tuple(t.shape)}".encode() for n, t in sorted(model.state_dict().items())]
    t = cfg.teacher
    parts += [repr((t.ema_modules, t.copy_modules, t.input, t.offload)).encode()]
    return _digest(parts)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(cfg, *, world_size: int, zero_stage: int) -> dict[str, Any]:
    return {"structure": model_structure(cfg), "precision": cfg.train.precision,
            "data": data_identity(cfg.data.train_shards), "world_size": world_size, "zero_stage": zero_stage}


def _changed(saved: dict[str, Any], now: dict[str, Any], keys) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_resume(state: dict[str, Any], cfg, identity: dict[str, Any], *, tag: str, out_dir: str) -> list[str]:
    """Compares a checkpoint's recorded run (`state`, its d2v_state.json) with this one. Returns
    what is applied (to be logged); raises RunMismatch for anything else."""
    saved_id = state.get("identity")
    if saved_id is None:  # written before runs recorded their identity: the preset is all there is
        return [f"checkpoint {tag} records no run identity (an older d2v): only its preset was compared"]
    saved_cfg, now_cfg = _flat(state.get("config", {})), _flat(to_dict(cfg))
    export = (f"To branch, export the weights (python -m d2v export {out_dir} EXPORT --tag {tag}) and start a new "
              f"run from them: --init-from EXPORT --out NEW")
    refused = []
    if saved_id["structure"] != identity["structure"] or saved_id["precision"] != identity["precision"]:
        keys = sorted(k for k in now_cfg if k.startswith(("model.", "teacher.ema_modules", "teacher.copy_modules",
                                                           "teacher.input", "teacher.offload", "train.precision")))
        refused.append(f"the model is another one ({'; '.join(_changed(saved_cfg, now_cfg, keys)) or 'its layout'}): "
                       f"its weights and optimizer state cannot continue here. Resume with the checkpoint's settings, or "
                       f"give the new model its own --out")
    saved_data, data = saved_id["data"], identity["data"]
    applied = []
    if saved_data["digest"] != data["digest"]:
        what = "tokenizer" if saved_data.get("tokenizer") != data.get("tokenizer") else "data"
        refused.append(f"it was trained on other {what} ({saved_data['train_shards'] or 'synthetic'!r}, digest "
                       f"{saved_data['digest']}) than this run ({data['train_shards'] or 'synthetic'!r}, digest "
                       f"{data['digest']}): its data position means nothing here. Resume with "
                       f"--data {saved_data['train_shards']!r}, or branch. {export} --data ...")
    elif saved_data["train_shards"] != data["train_shards"]:
        applied.append(f"data.train_shards {saved_data['train_shards']!r} -> {data['train_shards']!r} "
                       f"(the same shards and sidecars)")
    same_world = saved_id["world_size"] == identity["world_size"]
    mid_epoch = int(state.get("batches_consumed", 0)) > 0
    moved = _changed(saved_cfg, now_cfg, POSITION_KEYS)
    if moved and same_world and mid_epoch:
        refused.append(f"{'; '.join(moved)} changes the batches of epoch {state.get('epoch', 0)}, "
                       f"{state.get('batches_consumed')} batches in: the recorded position would repeat or skip "
                       f"samples. Resume with the checkpoint's values until the epoch ends, or branch. {export}")
    elif moved:
        applied += moved
    stages = (saved_id["zero_stage"], identity["zero_stage"])
    if stages[0] != stages[1] and not set(stages) <= set(UNIVERSAL_STAGES):
        refused.append(f"it was written under ZeRO stage {stages[0]}, this run is stage {stages[1]}: DeepSpeed's "
                       f"universal form moves the optimizer state between stages {UNIVERSAL_STAGES} only. Resume "
                       f"with a stage-{stages[0]} template, or branch (the optimizer state starts fresh). {export}")
    if refused:
        raise RunMismatch(f"checkpoint {tag} in {out_dir} belongs to another run: " + " | ".join(refused))
    if not same_world:
        applied.append(f"world size {saved_id['world_size']} -> {identity['world_size']} (universal form; the data "
                       f"restarts epoch {state.get('epoch', 0)} from its first batch)")
    if stages[0] != stages[1]:
        applied.append(f"ZeRO stage {stages[0]} -> {stages[1]} (universal form)")
    rest = sorted(k for k in set(saved_cfg) | set(now_cfg)
                  if saved_cfg.get(k) != now_cfg.get(k) and k not in POSITION_KEYS and k != "data.train_shards")
    applied += _changed(saved_cfg, now_cfg, rest)
    return applied
