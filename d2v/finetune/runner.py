"""The fine-tuning loop on a DeepSpeed engine (1 or more ranks; ZeRO 0-2): data-parallel batches
from an in-memory task, optional head-only warm-up, evaluation sharded over ranks with summed
counts, a DeepSpeed checkpoint at the end plus `finetune.json` (config, labels, results).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from d2v import collectives

from d2v.config import fill_ds_config, to_dict
from d2v.finetune.config import FinetuneConfig
from d2v.finetune.model import FinetuneModel, freeze_feature_encoder, load_backbone
from d2v.finetune.tasks import FtBatch, build_task
from d2v.train import distributed
from d2v.train.schedule import lr_factor
from d2v.train.trainer import DTYPES, param_groups


def rank_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's index lists for one epoch: a seeded permutation cut into global batches of
    batch_size x world_size (the incomplete last one dropped, so every rank runs the same number
    of steps), each rank taking its own slice."""
    glob = batch_size * world_size
    if n < glob:
        raise ValueError(f"{n} training examples cannot fill one global batch of {glob} "
                         f"(train.micro_batch_size={batch_size} x {world_size} ranks); lower train.micro_batch_size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[b * glob + rank * batch_size: b * glob + (rank + 1) * batch_size] for b in range(n // glob)]


def _sum(values: dict[str, float], world_size: int) -> dict[str, float]:
    keys = sorted(values)
    return dict(zip(keys, collectives.all_reduce_values([values[k] for k in keys])))


class FinetuneRun:
    def __init__(self, cfg: FinetuneConfig, ds_template: dict[str, Any], *, random_init: bool = False) -> None:
        import deepspeed

        self.cfg = cfg
        self.random_init = random_init
        self.rank, self.world_size = distributed.init_distributed()
        self.device = distributed.device()
        distributed.set_cpu_threads(cfg.train.threads)
        self.task = build_task(cfg)
        backbone = load_backbone(cfg.init, cfg.model, random_init=random_init, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed + 1)  # the head's init does not depend on how the backbone was made
        model = FinetuneModel(backbone, self.task.num_outputs, per_frame=self.task.per_frame,
                              dropout=cfg.finetune.head_dropout)
        if cfg.task == "asr" and cfg.finetune.freeze_feature_encoder:
            freeze_feature_encoder(model)
        self.ds_config = fill_ds_config(ds_template, cfg, self.world_size, on_cpu=distributed.on_cpu())
        stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if stage == 3:
            raise ValueError("fine-tuning runs ZeRO stages 0-2 (its sharded evaluation is not ZeRO-3 safe); "
                             "use ds_configs/cpu.json or a stage-1/2 template")
        factor = lr_factor(cfg.optim, cfg.train.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.no_decay_1d, cfg.optim.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.model: FinetuneModel = self.engine.module
        self.dtype = DTYPES[cfg.train.precision]
        self.step = 0
        self.log_path = os.path.join(cfg.train.out_dir, "metrics.jsonl")
        if self.rank == 0:
            os.makedirs(cfg.train.out_dir, exist_ok=True)
            open(self.log_path, "w").close()
            with open(os.path.join(cfg.train.out_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)

    def _forward(self, batch: FtBatch):
        source = batch.source.to(self.device)
        if source.is_floating_point():
            source = source.to(self.dtype)
        lengths = batch.source_lengths.to(self.device) if batch.source_lengths is not None else None
        return self.engine(source, lengths)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
              flush=True)

    def train_step(self, indices: list[int]) -> float:
        self.model.train()
        self.model.freeze_backbone = self.step < self.cfg.finetune.freeze_encoder_steps
        batch = self.task.batch("train", indices)
        loss = self.task.loss(self._forward(batch), batch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"step {self.step}: loss is {float(loss)}; lower optim.lr")
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the whole evaluation split; every rank scores a strided share."""
        self.model.eval()
        mine = list(range(self.rank, self.task.size("eval"), self.world_size))
        bs = self.cfg.finetune.eval_batch_size
        # Every rank reduces the same keys, also one left without evaluation examples.
        sums = {k: 0.0 for k in self.task.score_keys}
        for start in range(0, len(mine), bs):
            batch = self.task.batch("eval", mine[start:start + bs])
            for k, v in self.task.score(self._forward(batch), batch).items():
                sums[k] += v
        return self.task.summarize(_sum(sums, self.world_size))

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        steps_per_epoch = len(rank_batches(self.task.size("train"), cfg.train.micro_batch_size, self.rank,
                                           self.world_size, cfg.train.seed, 0))
        t0, window, first = time.perf_counter(), [], None
        while self.step < cfg.train.max_steps:
            epoch = self.step // steps_per_epoch
            batches = rank_batches(self.task.size("train"), cfg.train.micro_batch_size, self.rank,
                                   self.world_size, cfg.train.seed, epoch)
            for indices in batches[self.step - epoch * steps_per_epoch:]:
                lr = float(self.scheduler.get_last_lr()[0])
                window.append(self.train_step(indices))
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    loss = _sum({"loss": sum(window) / len(window)}, self.world_size)["loss"] / self.world_size
                    first = loss if first is None else first
                    self._log({"step": self.step, "loss": loss, "lr": lr, "epoch": epoch,
                               "elapsed_s": round(time.perf_counter() - t0, 1)})
                    window = []
                if cfg.finetune.eval_every and self.step % cfg.finetune.eval_every == 0 \
                        and self.step != cfg.train.max_steps:
                    self._log({"step": self.step, **{f"eval_{k}": v for k, v in self.evaluate().items()}})
                if self.step >= cfg.train.max_steps:
                    break
        metrics = self.evaluate()
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        checkpoint = self.save()
        result = {"task": cfg.task, "init": cfg.init, "random_init": self.random_init, "steps": self.step,
                  "train_examples": self.task.size("train"), "eval_examples": self.task.size("eval"),
                  "first_loss": first, "last_loss": loss, "metrics": metrics,
                  "train_seconds": round(time.perf_counter() - t0, 1), "checkpoint": checkpoint}
        if self.rank == 0:
            with open(os.path.join(cfg.train.out_dir, "finetune.json"), "w") as f:
                json.dump({"result": result, "labels": self.task.labels, "config": to_dict(cfg)}, f, indent=2)
        return result

    def close(self) -> None:
        """Ranks leave the process group together: one exiting while another still tears down its
        communication threads aborted that one at interpreter exit (seen once in ~10 launches)."""
        distributed.shutdown()

    def save(self) -> str:
        """A DeepSpeed checkpoint of the fine-tuned model (all ranks take part)."""
        root = os.path.join(self.cfg.train.out_dir, "checkpoints")
        tag = f"step_{self.step:08d}"
        self.engine.save_checkpoint(root, tag=tag, client_state={"task": self.cfg.task, "labels": self.task.labels})
        return os.path.join(root, tag)


__all__ = ["FinetuneRun", "rank_batches"]
