"""`python -m d2v.finetune.evaluate` (what `make eval` runs): the three demo
evaluations, each for the pretrained demo checkpoints (runs/demo-<modality>, and
runs/demo-<modality>-seed<P> for further pretraining seeds) and for the same architecture at
random initialisation, as one table of means and spreads over seeds.

Each arm is repeated: the pretrained arm over every pretraining run times `--seeds` fine-tuning
seeds (no two runs share a fine-tuning seed: 1..N over the arm), the random-init arm over the same
N fine-tuning seeds (each also a different random initialisation). The table gives mean ± standard deviation per arm, their difference, and whether it
exceeds the spread (Welch's t-test, d2v.finetune.seed_stats); nothing is claimed from one run.

* speech: CTC fine-tuning on the labelled eSpeak demo (d2v.data.demo_asr), WER and CER on two
  held-out voices saying held-out sentences;
* images: linear probe and full fine-tuning on the digits as an ImageFolder tree;
* text: linear probe and full fine-tuning on the docstring-topic TSV (d2v.data.demo_text_cls);
* text pairs (with `--tasks ...,glue`): GLUE fine-tuning in RTE's layout on the docstring
  sentence pairs of d2v.data.demo_glue, accuracy.

Labelled data are built under DATA when missing. Fine-tuning runs go through
`deepspeed launchers/finetune.py` (2 CPU ranks by default) with identical settings for both
inits; probes run in this process. Writes OUT/results.json and OUT/results.md (a re-run with
--tasks replaces those tasks and keeps the others). It reports what the numbers show and asserts
nothing about which init wins.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from d2v.finetune.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ensure_data(data: str) -> dict[str, dict[str, str]]:
    """Paths of the three labelled demo sets, built when missing."""
    asr = os.path.join(data, "asr")
    if not os.path.exists(os.path.join(asr, "patterns.json")):
        from d2v.data.demo_asr import make_asr_demo

        make_asr_demo(asr)
    with open(os.path.join(asr, "patterns.json")) as f:
        patterns = json.load(f)
    digits = os.path.join(data, "digits")
    if not os.path.isdir(os.path.join(digits, "val")):
        from d2v.data.imagefolder import export_digits

        export_digits(digits)
    text = os.path.join(data, "text_cls")
    if not os.path.exists(os.path.join(text, "test.tsv")):
        from d2v.data.demo_text_cls import build_text_cls_demo

        build_text_cls_demo(text)
    pairs = os.path.join(data, "glue_data")
    if not os.path.exists(os.path.join(pairs, "RTE", "dev.tsv")):
        from d2v.data.demo_glue import build_glue_demo

        build_glue_demo(pairs)
    from d2v.data.demo_asr import demo_lm

    return {"asr": {"train": patterns["train"], "eval": patterns["valid"], "lm": demo_lm(asr)},
            "glue": {"train": os.path.join(pairs, "RTE"), "eval": os.path.join(pairs, "RTE")},
            "image_cls": {"train": os.path.join(digits, "train"), "eval": os.path.join(digits, "val")},
            "text_cls": {"train": os.path.join(text, "train.tsv"), "eval": os.path.join(text, "test.tsv")}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def finetune(task: str, init: str, data: dict[str, str], out: str, *, random_init: bool, ranks: int,
             overrides: list[str]) -> dict[str, Any]:
    """One launcher run; returns its result record (the last JSON line it prints)."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(_port()),
           "--module", "d2v.launchers.finetune", "--ds_config", "cpu.json",
           "--task", task, "--init", init, "--train-data", data["train"], "--eval-data", data["eval"], "--out", out,
           "--resume", "auto",  # a run an earlier `make eval` finished or was interrupted in is continued
           *(["--random-init"] if random_init else []), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}  # the ranks import this same d2v
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "launch.log"), "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning {task} ({'random' if random_init else 'pretrained'}) failed with exit "
                           f"{proc.returncode}; see {os.path.join(out, 'launch.log')}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def linear_probe(task: str, init: str, data: dict[str, str], seed: int) -> dict[str, float]:
    """Probe accuracy of `init` ("pretrained") and of a random encoder drawn with `seed` ("random init")."""
    from d2v.finetune.resolve import resolve_finetune
    from d2v.finetune.probe import probe

    cfg, _ = resolve_finetune(task, init=init, overrides=[f"finetune.train_data={data['train']}",
                                                          f"finetune.eval_data={data['eval']}", f"train.seed={seed}"])
    return probe(cfg)["accuracy"]


ROWS = (  # (task, metric, what, pipeline)
    ("asr", "wer", "speech recognition, held-out voices (CTC fine-tuning)", "finetune"),
    ("asr", "cer", "speech recognition, held-out voices (CTC fine-tuning)", "finetune"),
    ("asr", "wer_lm", "speech recognition, held-out voices (CTC fine-tuning, demo 4-gram LM beam search)", "finetune"),
    ("asr", "cer_lm", "speech recognition, held-out voices (CTC fine-tuning, demo 4-gram LM beam search)", "finetune"),
    ("image_cls", "accuracy", "digits (linear probe)", "probe"),
    ("image_cls", "accuracy", "digits (fine-tuning)", "finetune"),
    ("image_cls", "top5", "digits (fine-tuning)", "finetune"),
    ("text_cls", "accuracy", "docstring topics (linear probe)", "probe"),
    ("text_cls", "accuracy", "docstring topics (fine-tuning)", "finetune"),
    ("glue", "accuracy", "docstring pairs, GLUE RTE layout (fine-tuning)", "finetune"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    from d2v.finetune.seed_stats import compare, describe

    lines = ["| task | metric | pretrained | random init | difference | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        metric = r["metric"].split("_")[0]  # wer_lm: a WER (of LM decoding)
        arrow = " (lower is better)" if metric in ("wer", "cer") else ""
        cells = describe(compare(r["pretrained"], r["random init"]))
        name = {"accuracy": "accuracy", "top5": "top-5 accuracy"}.get(metric, metric.upper())
        lines.append(f"| {r['what']} | {name}{arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrained_runs(runs: str, modality: str) -> list[tuple[int, str]]:
    """(pretraining seed, run dir) of every demo run of `modality` with a checkpoint: demo-<m> is
    seed 1 (as `make demo` trains it), demo-<m>-seed<P> the others. Runs trained for different
    numbers of updates are refused: one arm would mix two experiments."""
    from d2v.train.checkpoint import Checkpointer

    found, steps = [], {}
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        seed = 1 if name == f"demo-{modality}" else None
        if name.startswith(f"demo-{modality}-seed") and name.rsplit("seed", 1)[1].isdigit():
            seed = int(name.rsplit("seed", 1)[1])
        if seed is not None and os.path.exists(os.path.join(runs, name, "checkpoints", "latest")):
            found.append((seed, os.path.join(runs, name)))
            tag = Checkpointer(os.path.join(runs, name, "checkpoints"), rank=0, world_size=1).latest_tag()
            steps.setdefault(tag, []).append(name)
    if len(steps) > 1:
        listed = "; ".join(f"{tag}: {', '.join(names)}" for tag, names in sorted(steps.items()))
        raise ValueError(f"the {modality} pretraining runs in {runs} end at different updates ({listed}): train them "
                         f"to the same step (make eval EVAL_DEMO_STEPS=N) or move the others aside")
    return sorted(found)


def evaluate(data: str, runs: str, out: str, *, ranks: int, steps: dict[str, int], tasks: list[str],
             seeds: int = 1) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: run each arm at least once")
    paths = ensure_data(data)
    inits = {}
    for task in tasks:
        modality = TASKS[task].modality
        inits[task] = pretrained_runs(runs, modality)
        if not inits[task]:
            raise FileNotFoundError(f"{runs}/demo-{modality} has no checkpoint: run `make demo MODALITY={modality}` "
                                    f"first (make eval does)")
    results: dict[str, Any] = {"tasks": {}, "seconds": {}}
    previous = os.path.join(out, "results.json")
    if os.path.exists(previous):  # re-running some tasks (--tasks) keeps the others' results
        with open(previous) as f:
            old = json.load(f)
        # records from before seeds were repeated hold one run per arm: they are dropped, not mixed in
        results["tasks"] = {k: v for k, v in old.get("tasks", {}).items() if "seeds" in v}
        results["seconds"] = old.get("seconds", {})
    for task in tasks:
        overrides = EXTRA_OVERRIDES.get(task, [])
        record: dict[str, Any] = {"steps": steps[task], "inits": [run for _, run in inits[task]],
                                  "data": paths[task], "overrides": overrides, "seeds": seeds,
                                  "pretrained": [], "random init": []}
        # (pretraining seed, run, fine-tuning seed): every pretrained run gets its own fine-tuning
        # seeds, so that the arm's spread holds both sources of chance; the random arm gets as many
        # runs with the same fine-tuning seeds (each also its own init)
        arms = {"pretrained": [(p, run, i * seeds + s) for i, (p, run) in enumerate(inits[task])
                               for s in range(1, seeds + 1)]}
        arms["random init"] = [(0, inits[task][0][1], s) for s in range(1, len(arms["pretrained"]) + 1)]
        t0 = time.perf_counter()
        for name, runs_of_arm in arms.items():
            random_init = name == "random init"
            for p, run, s in runs_of_arm:
                where = os.path.join(out, task, name.replace(" ", "_"), f"pretrain{p}-seed{s}" if p else f"seed{s}")
                res = finetune(task, run, paths[task], where, random_init=random_init, ranks=ranks,
                               overrides=[f"train.max_steps={steps[task]}", f"train.seed={s}", *overrides,
                                          *data_overrides(paths[task])])
                record[name].append({"pretrain_seed": p, "seed": s, **res})
                print(f"{task} {name} (pretraining seed {p or '-'}, seed {s}): {res['metrics']} "
                      f"({res['train_seconds']} s)", flush=True)
        results["seconds"][f"{task} fine-tuning"] = round(time.perf_counter() - t0, 1)
        if TASKS[task].probe:
            t0 = time.perf_counter()
            probes = {"pretrained": [], "random init": []}
            for i, (p, run, s) in enumerate(arms["pretrained"]):
                acc = linear_probe(task, run, paths[task], seed=i + 1)
                if (s - 1) % seeds == 0:  # the probe of a pretrained encoder is closed-form: one per pretraining run
                    probes["pretrained"].append(acc["pretrained"])
                probes["random init"].append(acc["random init"])
            record["probe"] = probes
            results["seconds"][f"{task} probe"] = round(time.perf_counter() - t0, 1)
            print(f"{task} linear probe: {probes}", flush=True)
        results["tasks"][task] = record
        write_results(results, out, ranks)  # after every task: a later failure keeps what is done
    return results


def write_results(results: dict[str, Any], out: str, ranks: int) -> None:
    rows = []
    for task, metric, what, pipeline in ROWS:
        if task not in results["tasks"]:
            continue
        rec = results["tasks"][task]
        if pipeline != "probe" and any(metric not in r["metrics"] for k in ("pretrained", "random init")
                                       for r in rec[k]):
            continue  # runs without this metric (no LM given)
        if pipeline == "probe":
            values = rec["probe"]
        else:
            runs = [r for k in ("pretrained", "random init") for r in rec[k]]
            if any(metric not in r["metrics"] for r in runs):
                continue  # kept from a run of an older d2v that did not measure it (top-5)
            values = {k: [r["metrics"][metric] for r in rec[k]] for k in ("pretrained", "random init")}
        rows.append({"task": task, "what": what, "metric": metric, **values})
    results["rows"] = rows
    results["ranks"] = ranks
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(rows) + "\n")


def data_overrides(data: dict[str, str]) -> list[str]:
    """Settings that come with a demo data set (the speech demo's LM for beam-search decoding)."""
    return [f"finetune.decode.lm={data['lm']}"] if "lm" in data else []


# Settings shared by both inits of a task (tiny models, a few CPU minutes each).
EXTRA_OVERRIDES = {
    "asr": ["optim.lr=2e-3", "optim.phase_ratios=[0.1,0.6,0.3]", "train.log_every=50"],
    "image_cls": ["train.log_every=100"],
    "text_cls": ["train.log_every=100"],
    "glue": ["finetune.glue_task=rte", "train.log_every=100"],
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2v.finetune.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo_data", help="where the demo data live / are built")
    ap.add_argument("--runs", default="runs/eval-pretrain",
                    help="holds the pretrained demo runs demo-{audio,image,text}[-seed<N>] (make eval's own)")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--asr-steps", type=int, default=1000)
    ap.add_argument("--image-steps", type=int, default=1200)
    ap.add_argument("--text-steps", type=int, default=1000)
    ap.add_argument("--glue-steps", type=int, default=1000)
    ap.add_argument("--tasks", default="asr,image_cls,text_cls", help="comma-separated; glue is also one")
    ap.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per pretraining run")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    steps = {"asr": args.asr_steps, "image_cls": args.image_steps, "text_cls": args.text_steps, "glue": args.glue_steps}
    results = evaluate(args.data, args.runs, args.out, ranks=args.ranks, steps=steps,
                       tasks=[t for t in args.tasks.split(",") if t], seeds=args.seeds)
    print(markdown(results["rows"]))
    print(f"evaluation in {time.perf_counter() - start:.0f} s; {os.path.join(args.out, 'results.md')}, "
          f"{os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
