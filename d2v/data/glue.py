"""The GLUE benchmark's TSV layout, read in place (README, fine-tuning; `python -m d2v.data.prepare glue`).

`glue_data/` as GLUE's download script leaves it: one folder per task (CoLA, SST-2, MRPC, QQP, STS-B,
MNLI, QNLI, RTE) with `train.tsv` and `dev.tsv` (MNLI: `dev_matched.tsv` and `dev_mismatched.tsv`).
CoLA's train and dev files have no header line; the others do. Columns per task are those fairseq's
`examples/roberta/preprocess_GLUE_tasks.sh` cuts (1-based there, 0-based here). Fields are split on
tabs only, without quote handling (GLUE's texts contain unbalanced quotes; `cut -f` reads them so).

A row whose field count differs from the file's layout, whose label is not one of the task's, or
whose score is not a finite number is malformed: skipped and counted (fairseq drops QQP's short rows
the same way), and listed in the report. More than `MAX_MALFORMED` rows and more than
`MAX_MALFORMED_FRACTION` of a file is one error instead: that is the wrong file or the wrong task,
not a few broken lines.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

MAX_MALFORMED = 10
MAX_MALFORMED_FRACTION = 0.01
"""A file may lose up to the larger of these (rows, fraction of its rows) as malformed."""


@dataclass(frozen=True)
class GlueLayout:
    """Where one GLUE task's fields are."""

    folder: str
    """The task's folder under glue_data/."""
    header: bool
    """train/dev files start with a header line."""
    fields: int
    """Fields per row of train.tsv."""
    eval_fields: int
    """Fields per row of the dev files."""
    sentences: tuple[int, ...]
    """Columns of the input sentence (one) or pair (two)."""
    label: int
    """Label column of train.tsv."""
    eval_label: int
    """Label column of the dev files (MNLI's dev files have five annotator labels before gold_label)."""
    labels: tuple[str, ...] | None
    """Class names in output order; None: a regression score."""
    eval_files: tuple[str, ...] = ("dev.tsv",)


LAYOUTS: dict[str, GlueLayout] = {
    "cola": GlueLayout("CoLA", False, 4, 4, (3,), 1, 1, ("0", "1")),
    "sst_2": GlueLayout("SST-2", True, 2, 2, (0,), 1, 1, ("0", "1")),
    "mrpc": GlueLayout("MRPC", True, 5, 5, (3, 4), 0, 0, ("0", "1")),
    "qqp": GlueLayout("QQP", True, 6, 6, (3, 4), 5, 5, ("0", "1")),
    "sts_b": GlueLayout("STS-B", True, 10, 10, (7, 8), 9, 9, None),
    "mnli": GlueLayout("MNLI", True, 12, 16, (8, 9), 11, 15, ("contradiction", "entailment", "neutral"),
                       ("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": GlueLayout("QNLI", True, 4, 4, (1, 2), 3, 3, ("entailment", "not_entailment")),
    "rte": GlueLayout("RTE", True, 4, 4, (1, 2), 3, 3, ("entailment", "not_entailment")),
}
"""The eight GLUE tasks by the names of fairseq's data2vec 2.0 text fine-tuning configs."""


def layout(task: str) -> GlueLayout:
    if task not in LAYOUTS:
        raise ValueError(f"unknown GLUE task {task!r}; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[task]


@dataclass
class GlueSplit:
    """The readable rows of one GLUE file."""

    path: str
    sentences: list[tuple[str, ...]] = field(default_factory=list)
    """One or two texts per example."""
    targets: list[float] = field(default_factory=list)
    """Class index, or the score for a regression task."""
    malformed: list[int] = field(default_factory=list)
    """1-based line numbers of the rows skipped."""

    @property
    def subset(self) -> str:
        """The file's name without `.tsv` (dev, dev_matched, ...)."""
        return os.path.basename(self.path).removesuffix(".tsv")

    def report(self) -> str:
        line = f"{self.path}: {len(self.targets)} examples"
        if self.malformed:
            shown = ", ".join(map(str, self.malformed[:5])) + (", ..." if len(self.malformed) > 5 else "")
            line += f", {len(self.malformed)} malformed rows skipped (lines {shown})"
        return line


def _target(text: str, labels: tuple[str, ...] | None) -> float | None:
    """The row's target, or None when the label is not one the task has."""
    text = text.strip()
    if labels is not None:
        return float(labels.index(text)) if text in labels else None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_glue_file(path: str, task: str, *, train: bool) -> GlueSplit:
    """The examples of one train or dev file of `task` (a key of LAYOUTS)."""
    lay = layout(task)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GLUE file {path} does not exist (expected glue_data/{lay.folder}/...)")
    n_fields, label_col = (lay.fields, lay.label) if train else (lay.eval_fields, lay.eval_label)
    out = GlueSplit(path)
    # utf-8-sig: MRPC's files begin with the byte-order mark of Microsoft's original release.
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    start = 0
    if lay.header:
        if not lines or len(lines[0].rstrip("\r").split("\t")) != n_fields:
            found = len(lines[0].rstrip("\r").split("\t")) if lines else 0
            raise ValueError(f"{path}: the header has {found} columns but GLUE's {lay.folder} "
                             f"{'train' if train else 'dev'} files have {n_fields}; is this {lay.folder}'s file "
                             f"(finetune.glue_task={task})?")
        start = 1
    for n, line in enumerate(lines[start:], start=start + 1):
        parts = line.rstrip("\r").split("\t")
        target = _target(parts[label_col], lay.labels) if len(parts) == n_fields else None
        if target is None:
            out.malformed.append(n)
            continue
        out.sentences.append(tuple(parts[c].strip() for c in lay.sentences))  # fairseq's BPE step strips lines
        out.targets.append(target)
    rows = len(out.targets) + len(out.malformed)
    if not out.targets:
        raise ValueError(f"{path} holds no {lay.folder} examples ({rows} rows, none with {n_fields} tab-separated "
                         f"fields and a valid label): is this {lay.folder}'s file (finetune.glue_task={task})?")
    if len(out.malformed) > max(MAX_MALFORMED, MAX_MALFORMED_FRACTION * rows):
        raise ValueError(f"{path}: {len(out.malformed)} of {rows} rows are malformed (first at line "
                         f"{out.malformed[0]}: not {n_fields} tab-separated fields with a valid label); is this "
                         f"{lay.folder}'s {'train' if train else 'dev'} file (finetune.glue_task={task})?")
    return out


def glue_files(path: str, task: str, *, train: bool) -> list[str]:
    """The files a --train-data / --eval-data path names: a .tsv file itself, or in a task folder
    train.tsv (train) or the dev files (MNLI: matched and mismatched)."""
    if path.endswith(".tsv"):
        return [path]
    lay = layout(task)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"GLUE task folder {path} does not exist (give glue_data/{lay.folder} "
                                f"or one of its .tsv files)")
    return [os.path.join(path, name) for name in (("train.tsv",) if train else lay.eval_files)]


def read_glue(path: str, task: str, *, train: bool) -> list[GlueSplit]:
    return [read_glue_file(p, task, train=train) for p in glue_files(path, task, train=train)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m d2v.data.prepare glue",
        description="Checks a glue_data/ folder in place and reports each file's examples and malformed rows. "
                    "Fine-tuning reads these files directly: --recipe glue_TASK --train-data glue_data/FOLDER "
                    "--eval-data glue_data/FOLDER.")
    ap.add_argument("src", help="glue_data folder (one sub-folder per task)")
    ap.add_argument("--tasks", nargs="+", default=None, choices=sorted(LAYOUTS),
                    help="tasks to read (default: those whose folder exists)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.src):
        raise FileNotFoundError(f"GLUE folder {args.src} does not exist")
    tasks = args.tasks or [t for t, lay in LAYOUTS.items() if os.path.isdir(os.path.join(args.src, lay.folder))]
    if not tasks:
        raise ValueError(f"{args.src} has none of the GLUE folders {', '.join(v.folder for v in LAYOUTS.values())}")
    for task in tasks:
        folder = os.path.join(args.src, LAYOUTS[task].folder)
        for train in (True, False):
            for split in read_glue(folder, task, train=train):
                print(f"{task}: {split.report()}")
    return 0
