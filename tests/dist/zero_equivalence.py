"""Run by `deepspeed --num_gpus 2` from tests/test_zero.py: ZeRO 1/2/3 (two persistence
thresholds) and an offloaded teacher, for each tiny preset and precision, 10 steps on fixed
global batches split over the two ranks. Writes per-step global losses and the teacher's full
fp32 state (rank 0), plus ZeRO-3 checks of what the teacher's forward really sees.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from equivalence_common import CASES, PRESETS, PRECISIONS, STEPS, equivalence_config, global_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import deepspeed.comm as dist
    from d2v.config import load_template
    from d2v.train.trainer import Trainer

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    # DeepSpeed's per-parameter fp32 accessor waits on the reduce stream at every call on a GPU:
    # the EMA update and the weight norms must not go through it.
    accessor_calls = [0]
    accessor = DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition

    def counted(self, *a, **k):
        accessor_calls[0] += 1
        return accessor(self, *a, **k)

    DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition = counted
    results = {}
    for preset in PRESETS:
        for case, (ds_file, zero_overrides, offload) in CASES.items():
            for precision in PRECISIONS:
                cfg = equivalence_config(preset, precision, offload)
                template = load_template(os.path.join(ROOT, "ds_configs", ds_file))
                template["zero_optimization"].update(zero_overrides)
                trainer = Trainer(cfg, template)
                b = cfg.train.micro_batch_size
                losses = []
                accessor_calls[0] = 0
                for step in range(STEPS):
                    batch = global_batch(cfg, 2 * b, step).rows(trainer.rank * b, (trainer.rank + 1) * b)
                    m = trainer.train_step([batch])
                    t = torch.tensor([m.values["loss_sum"], m.values["loss_count"]], dtype=torch.float64)
                    dist.all_reduce(t)
                    losses.append(float(t[0] / t[1]))
                trainer.norms()
                calls = accessor_calls[0]
                state = trainer.teacher.export_state()
                key = f"{preset}|{case}|{precision}"
                entry = {"losses": losses, "bytes": measure_bytes(trainer), "fp32_accessor_calls": calls}
                if trainer.zero_stage == 3:
                    entry["landed"] = check_forward_sees_ema(trainer, state)
                    entry["teacher_device_bytes"] = trainer.teacher.zero3.device_bytes()
                if trainer.rank == 0:
                    torch.save(state, os.path.join(args.out, key.replace("|", "__") + ".pt"))
                results[key] = entry
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def measure_bytes(trainer) -> dict:
    """Tensor sizes this rank really holds after a step: student weights, the optimizer's fp32
    masters and Adam moments, and the teacher's stored weights and EMA."""
    params = []
    for p in trainer.student.parameters():
        params.append(p.data)
        if hasattr(p, "ds_tensor"):
            params.append(p.ds_tensor)
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    # ZeRO-3 swaps its flat fp32 partitions out of param_groups between steps.
    masters = [p for g in inner.param_groups for p in g["params"]]
    masters += list(getattr(trainer.engine.optimizer, "fp32_partitioned_groups_flat", []))
    moments = [t for st in inner.state.values() for t in st.values() if hasattr(t, "numel") and t.dim() > 0]
    teacher = trainer.teacher
    if teacher.zero3 is not None:
        t_tensors = [t for p in teacher.model.parameters() for t in (p.data, p.ds_tensor)] + list(teacher.zero3.shards)
    else:
        t_tensors = list(teacher.model.parameters())
    return {"student_params": _bytes(params), "optimizer_state": _bytes(masters + moments),
            "teacher": _bytes(t_tensors)}


def check_forward_sees_ema(trainer, state) -> dict:
    """Gathers the ZeRO-3 teacher's parameters as its forward would and compares them with the
    fp32 EMA (cast to the teacher's dtype): the updates written into the partitions landed, for
    partitioned and persistent parameters alike."""
    import deepspeed

    module = trainer.teacher.model
    params = dict(module.named_parameters())
    out = {"max_abs_diff": 0.0, "persistent": 0, "partitioned": 0}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        for name, p in params.items():
            want = state[name].to(p.dtype)
            out["max_abs_diff"] = max(out["max_abs_diff"], float((p.detach().cpu() - want).abs().max()))
            out["persistent" if getattr(p, "ds_persist", False) else "partitioned"] += 1
    return out


if __name__ == "__main__":
    main()
    from d2v.train.distributed import shutdown

    shutdown()  # leave the process group together (see shutdown)
