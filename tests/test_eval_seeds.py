"""`make eval` over seeds: the statistics it reports and how it pairs runs (the runs themselves
are stubbed: a real evaluation takes tens of minutes)."""
import json
import math
import os

import pytest

from d2v.finetune import evaluate as ev
from d2v.finetune.seed_stats import compare, describe, summarize


def test_welch_p_value_matches_the_closed_form_for_four_degrees_of_freedom():
    # a = 1,2,3 and b = 4,5,6: t = -3/sqrt(2/3), Welch df = 4; for df 4 the two-sided p is
    # I_x(2, 1/2) with x = df / (df + t^2), = 1 - 1.5 sqrt(1-x) + 0.5 (1-x)^1.5.
    c = compare([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    t2 = 9 / (2 / 3)
    x = 4 / (4 + t2)
    want = 1 - 1.5 * math.sqrt(1 - x) + 0.5 * (1 - x) ** 1.5
    assert c.p_value == pytest.approx(want, rel=1e-9) and c.beyond_spread
    assert c.difference == -3.0 and c.pretrained.std == 1.0 and c.random_init.n == 3


def test_overlapping_arms_are_within_the_spread_and_one_run_claims_nothing():
    assert not compare([0.50, 0.60, 0.55], [0.52, 0.58, 0.50]).beyond_spread
    one = compare([0.9], [0.1, 0.2])
    assert math.isnan(one.p_value) and not one.beyond_spread
    assert describe(one)[3] == "no spread to compare: run more seeds"
    assert describe(compare([0.9, 0.9], [0.1, 0.1])) == ("90.0 ± 0.0% (n=2)", "10.0 ± 0.0% (n=2)", "+80.0 points",
                                                          "beyond the spread (Welch p=0.000)")
    with pytest.raises(ValueError, match="no results"):
        summarize([])


def _checkpoint(run, tag: str) -> None:
    from d2v.train.checkpoint import COMPLETE, LATEST

    os.makedirs(run / "checkpoints" / tag, exist_ok=True)
    (run / "checkpoints" / tag / COMPLETE).write_text("")
    (run / "checkpoints" / LATEST).write_text(tag)


def test_pretraining_runs_of_different_lengths_are_not_one_arm(tmp_path):
    """A 300-update `make demo` run beside 1000-update evaluation runs would mix two experiments."""
    runs = tmp_path / "runs"
    _checkpoint(runs / "demo-text", "step_00000300")
    _checkpoint(runs / "demo-text-seed2", "step_00001000")
    _checkpoint(runs / "demo-image", "step_00000300")
    assert ev.pretrained_runs(str(runs), "image") == [(1, str(runs / "demo-image"))]
    with pytest.raises(ValueError, match=r"different updates \(step_00000300: demo-text; step_00001000: "
                                         r"demo-text-seed2\).*EVAL_DEMO_STEPS"):
        ev.pretrained_runs(str(runs), "text")


def test_every_pretraining_run_meets_every_seed_and_the_random_arm_gets_as_many(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for name in ("demo-image", "demo-image-seed2", "demo-image-seedx", "demo-audio-seed3"):
        os.makedirs(runs / name / "checkpoints")
    for name in ("demo-image", "demo-image-seed2"):
        _checkpoint(runs / name, "step_00000001")
    assert ev.pretrained_runs(str(runs), "image") == [(1, str(runs / "demo-image")),
                                                      (2, str(runs / "demo-image-seed2"))]
    calls = []

    def fake_finetune(task, init, data, out, *, random_init, ranks, overrides):
        seed = int([o for o in overrides if o.startswith("train.seed=")][0].split("=")[1])
        calls.append((os.path.basename(init), random_init, seed, os.path.relpath(out, tmp_path / "eval")))
        return {"metrics": {"accuracy": (0.2 if random_init else 0.8) + 0.01 * seed}, "train_seconds": 0.0}

    monkeypatch.setattr(ev, "finetune", fake_finetune)
    monkeypatch.setattr(ev, "linear_probe", lambda task, init, data, seed: {"pretrained": 0.7, "random init": 0.3})
    monkeypatch.setattr(ev, "ensure_data", lambda data: {"image_cls": {"train": "t", "eval": "e"}})
    res = ev.evaluate("data", str(runs), str(tmp_path / "eval"), ranks=2, steps={"image_cls": 5},
                      tasks=["image_cls"], seeds=2)
    pre = [c for c in calls if not c[1]]
    rnd = [c for c in calls if c[1]]
    assert sorted((c[0], c[2]) for c in pre) == [("demo-image", 1), ("demo-image", 2), ("demo-image-seed2", 3),
                                                ("demo-image-seed2", 4)]
    assert sorted(c[2] for c in rnd) == [1, 2, 3, 4] and len({c[3] for c in calls}) == 8  # one folder per run
    rows = {r["what"]: r for r in res["rows"]}
    assert rows["digits (fine-tuning)"]["pretrained"] == pytest.approx([0.81, 0.82, 0.83, 0.84])
    probe = rows["digits (linear probe)"]
    assert probe["pretrained"] == [0.7, 0.7] and len(probe["random init"]) == 4
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "beyond the spread" in table and "(n=4)" in table
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["image_cls"]["seeds"] == 2
