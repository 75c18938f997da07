"""No code from a file runs: every kind of file d2v can be handed, made hostile, is refused by
name before its payload can run, through the real entry points (export and import-fairseq
commands, `--resume auto`, the universal-checkpoint conversion, probe's loader, --init-from);
and normal checkpoints still resume and export through the weights-only path."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from typing import Tuple

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from cluster_common import ROOT  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

CANARY_BYTES = b"canary: nothing may write here\n"
CANARY_MTIME_NS = 1_600_000_000_123_456_789


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_bytes(CANARY_BYTES)
    os.utime(path, ns=(CANARY_MTIME_NS, CANARY_MTIME_NS))
    yield str(path)
    assert path.read_bytes() == CANARY_BYTES, "a payload ran and wrote the canary"
    assert os.stat(path).st_mtime_ns == CANARY_MTIME_NS, "a payload ran and touched the canary"


class _System:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"printf owned > {self.canary}",)


class _Exec:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return exec, (f"open({self.canary!r}, 'w').write('owned')",)


class _Copy:
    """A reducer naming an ordinary library function that writes a file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return shutil.copyfile, (__file__, self.canary)


PAYLOADS = {"os.system": _System, "builtins.exec": _Exec, "shutil.copyfile": _Copy}


def hostile_pickle(path, canary, payload="os.system", *, legacy=False, around=None):
    """A torch.save file whose unpickling runs `payload` against the canary; `around` wraps the
    payload into the shape of the file it replaces."""
    evil = PAYLOADS[payload](canary)
    obj = around(evil) if around else {"module": evil}
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


class _Writer(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) overwrites a file's bytes."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        written = torch.from_file(self.path, True, 4, dtype=torch.uint8)  # shared: writes go to the file
        written.fill_(33)
        self.training = bool(written.sum() < 0) or state[1]


def torchscript_archive(path, canary):
    torch.jit.save(torch.jit.script(_Writer(canary)), str(path))
    return str(path)


def legacy_tar(path, canary):
    """torch's pre-1.0 tar layout, whose loader unpickles the `storages` member first."""
    import io
    import pickle

    with tarfile.open(str(path), "w") as tar:
        for name, obj in (("sys_info", {}), ("storages", _System(canary)), ("pickle", {}), ("tensors", 0)):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


HOSTILE_KINDS = ["os.system", "builtins.exec", "shutil.copyfile", "os.system-legacy", "torchscript", "tar"]


def make_hostile(kind, path, canary, around=None):
    if kind == "torchscript":
        return torchscript_archive(path, canary)
    if kind == "tar":
        return legacy_tar(path, canary)
    if kind.endswith("-legacy"):
        return hostile_pickle(path, canary, kind[: -len("-legacy")], legacy=True, around=around)
    return hostile_pickle(path, canary, kind, around=around)


@pytest.mark.filterwarnings("ignore:.torch.load. received a zip file")
def test_payloads_are_live(tmp_path):
    """The hostile files do run their payload under a plain torch.load (else the tests below prove
    nothing)."""
    for kind in ("os.system", "builtins.exec", "shutil.copyfile", "os.system-legacy", "torchscript"):
        target = tmp_path / f"victim_{kind}"
        target.write_bytes(CANARY_BYTES)
        path = make_hostile(kind, tmp_path / f"{kind}.pt", str(target))
        try:
            torch.load(path, weights_only=False)
        except Exception:
            pass  # the payload has run by the time the result fails to rebuild
        assert target.read_bytes() != CANARY_BYTES, kind


@pytest.mark.parametrize("records", [False, True], ids=["plain", "fairseq-records"])
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_the_loader_refuses_every_hostile_kind(tmp_path, canary, kind, records):
    from d2v.safe_load import RefusedFile, load

    path = make_hostile(kind, tmp_path / "weights.pt", canary)
    with pytest.raises(RefusedFile) as err:
        load(path, records=records)
    assert path in str(err.value)
    expected = {"torchscript": "TorchScript", "tar": "tar archive"}.get(kind, kind.replace("-legacy", "").split(".")[-1])
    assert expected in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe load


def test_other_archives_and_strays_are_refused_before_reading(tmp_path):
    import gzip
    import zipfile

    from d2v.safe_load import RefusedFile, load, load_safetensors

    gz = tmp_path / "w.pt.gz"
    gz.write_bytes(gzip.compress(b"x" * 100))
    stray_zip = tmp_path / "w.zip"
    with zipfile.ZipFile(stray_zip, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/extra/evil.pkl", b"\x80\x02}q\x00.")
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, str(pickled))
    for path, what in ((gz, "gzip"), (stray_zip, "not a torch checkpoint"), (tmp_path / "canary_is_text", "not a")):
        if not path.exists():
            path.write_text("plain text")
        with pytest.raises(RefusedFile, match=what):
            load(path)
    with pytest.raises(RefusedFile, match=f"{pickled} is not a safetensors file"):
        load_safetensors(pickled)


def test_plain_weight_files_and_fairseq_records_still_load(tmp_path):
    import argparse

    import numpy as np

    from d2v.safe_load.unpickle import StandIn, to_plain
    from d2v.safe_load import load

    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "rng": np.random.RandomState(5).get_state(),
             "s": np.float64(2.5)}
    for legacy in (False, True):
        path = str(tmp_path / f"plain{legacy}.pt")
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        back = load(path)
        assert torch.equal(back["w"], state["w"]) and back["n"] == 3 and back["s"] == 2.5
        assert all(np.array_equal(a, b) for a, b in zip(back["rng"][1:2], state["rng"][1:2]))
    old = str(tmp_path / "fairseq_args.pt")
    torch.save({"args": argparse.Namespace(encoder_layers=12, arch="data2vec_audio"), "model": {}}, old)
    ckpt = load(old, records=True)
    assert isinstance(ckpt["args"], StandIn)
    assert to_plain(ckpt["args"]) == {"encoder_layers": 12, "arch": "data2vec_audio"}


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "d2v", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.mark.parametrize("kind", ["torchscript", "os.system"])
def test_import_fairseq_command_refuses_hostile_checkpoints(tmp_path, canary, kind):
    """The shape of a fairseq checkpoint (cfg, model) with the payload in its cfg."""
    path = make_hostile(kind, tmp_path / "checkpoint_best.pt", canary,
                        around=lambda evil: {"cfg": {"model": evil}, "model": {"w": torch.zeros(1)}})
    proc = _run_cli("import-fairseq", path, str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert path in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "student.safetensors")


@pytest.mark.parametrize("kind", ["builtins.exec", "tar"])
def test_import_fairseq_refuses_in_process(tmp_path, canary, capsys, kind):
    from d2v.__main__ import main

    path = make_hostile(kind, tmp_path / "checkpoint_best.pt", canary)
    with pytest.raises(SystemExit) as exit_:
        main(["import-fairseq", path, str(tmp_path / "out")])
    assert exit_.value.code == 2 and path in capsys.readouterr().err


# -- d2v checkpoints ----------------------------------------------------------------------------

def _config(out_dir, steps):
    from d2v.config import resolve

    return resolve("audio_tiny", overrides=[
        f"train.max_steps={steps}", "train.save_every=2", f"train.out_dir={out_dir}", "train.log_every=2",
        "train.micro_batch_size=2"])


def _template(name):
    from d2v.config import load_template

    return load_template(os.path.join(ROOT, "ds_configs", name))


STAGES = {"zero0": "cpu.json", "zero2": "zero2.json"}


def _state(trainer) -> dict:
    """fp32 weights (the masters under ZeRO, the module's at stage 0), every tensor of the
    wrapped torch optimizer's state (Adam moments of the fp32 groups or partitions), the step and
    the teacher."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {n: (safe_get_full_fp32_param(p) if trainer.zero_stage else p).detach().float().clone()
               for n, p in trainer.student.named_parameters()}
    base = trainer.engine.optimizer
    base = getattr(base, "optimizer", base)
    moments = [t.clone() for s in base.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    moments += [p.detach().clone() for g in base.param_groups for p in g["params"]]  # fp32 groups/partitions
    return {"weights": weights, "moments": moments, "step": trainer.step, "teacher": trainer.teacher.export_state()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and len(a["moments"]) == len(b["moments"]) > 0
    assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"]))
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 4-step bf16 run per ZeRO stage (checkpoints at steps 2 and 4) and its final state."""
    from d2v.train.launch import build_run

    torch.set_num_threads(2)
    out = {}
    for stage, template in STAGES.items():
        out_dir = str(tmp_path_factory.mktemp(stage))
        run = build_run(_config(out_dir, 4), _template(template), console=False)
        run.train()
        out[stage] = (out_dir, _state(run.trainer))
        run.close()
    return out


@pytest.fixture
def weights_only_loads(monkeypatch):
    """Every torch.load in the process must be weights-only (DeepSpeed's own included)."""
    real = torch.load
    calls = []

    def checked(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {args[:1]}"
        calls.append(args[:1])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked)
    return calls


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_normal_checkpoint_resumes_and_exports_weights_only(runs, tmp_path, stage, weights_only_loads):
    from d2v.export import export_checkpoint
    from d2v.train.launch import build_run
    from d2v.train.safe_checkpoint_engine import SafeCheckpointEngine

    out_dir, final = runs[stage]
    run = build_run(_config(out_dir, 4), _template(STAGES[stage]), resume="auto", console=False)
    assert isinstance(run.trainer.engine.checkpoint_engine, SafeCheckpointEngine)
    assert run.trainer.step == 4
    _assert_same_state(_state(run.trainer), final)  # bitwise, Adam moments included
    run.close()
    info = export_checkpoint(out_dir, str(tmp_path / "export"))
    assert info["step"] == 4 and weights_only_loads
    from safetensors.torch import load_file

    student = load_file(str(tmp_path / "export" / "student.safetensors"))
    teacher = load_file(str(tmp_path / "export" / "teacher.safetensors"))
    for name, weight in final["weights"].items():
        if stage == "zero0":  # the state holds the bf16 module weights: the fp32 masters rounded
            assert torch.equal(student[name].bfloat16().float(), weight), name
        else:  # the state holds the fp32 master weights
            assert torch.equal(student[name], weight), name
    assert all(torch.equal(teacher[k], v.float()) for k, v in final["teacher"].items())


def _hostile_copy(runs, stage, tmp_path, canary, pattern, kind="os.system"):
    """A copy of the run whose latest tag has the file matching `pattern` replaced."""
    import glob

    src, _ = runs[stage]
    dst = str(tmp_path / f"run_{stage}")
    shutil.copytree(src, dst)
    matches = glob.glob(os.path.join(dst, "checkpoints", "step_00000004", pattern))
    assert len(matches) == 1, matches
    make_hostile(kind, matches[0], canary)
    return dst, matches[0]


RESUME_CASES = [("zero0", "mp_rank_00_model_states.pt", "os.system"),
                ("zero2", "*zero_pp_rank_0_mp_rank_00_optim_states.pt", "builtins.exec"),
                ("zero2", "rank_00000.pt", "shutil.copyfile"),
                ("zero0", "teacher.pt", "torchscript"),
                ("zero2", "mp_rank_00_model_states.pt", "tar")]


@pytest.mark.parametrize("stage,pattern,kind", RESUME_CASES, ids=[f"{s}-{p.strip('*')}-{k}" for s, p, k in RESUME_CASES])
def test_resume_auto_refuses_a_hostile_checkpoint_file(runs, tmp_path, canary, stage, pattern, kind):
    from d2v.safe_load import RefusedFile
    from d2v.train.launch import build_run

    run_dir, hostile = _hostile_copy(runs, stage, tmp_path, canary, pattern, kind)
    with pytest.raises(RefusedFile) as err:
        build_run(_config(run_dir, 6), _template(STAGES[stage]), resume="auto", console=False)
    assert hostile in str(err.value)


def test_export_command_refuses_a_hostile_model_states_file(runs, tmp_path, canary):
    run_dir, hostile = _hostile_copy(runs, "zero0", tmp_path, canary, "mp_rank_00_model_states.pt")
    proc = _run_cli("export", run_dir, str(tmp_path / "export"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert hostile in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "export" / "student.safetensors")


@pytest.mark.parametrize("fmt", ["plain", "hf"])
def test_export_refuses_a_hostile_zero_partition(runs, tmp_path, canary, capsys, fmt):
    """ZeRO partitions are merged by DeepSpeed's zero_to_fp32, which reads them itself."""
    from d2v.__main__ import main

    run_dir, hostile = _hostile_copy(runs, "zero2", tmp_path, canary, "*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(SystemExit) as exit_:
        main(["export", run_dir, str(tmp_path / "export"), "--format", fmt])
    assert exit_.value.code == 2 and hostile in capsys.readouterr().err


def test_universal_conversion_refuses_a_hostile_partition(runs, tmp_path, canary):
    """A resume at another world size converts the tag first (DeepSpeed's ds_to_universal)."""
    from d2v.safe_load import RefusedFile
    from d2v.train.checkpoint import Checkpointer

    run_dir, hostile = _hostile_copy(runs, "zero2", tmp_path, canary, "*zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "os.system-legacy")
    with pytest.raises(RefusedFile) as err:
        Checkpointer(os.path.join(run_dir, "checkpoints"), rank=0, world_size=1).universal_tag("step_00000004")
    assert hostile in str(err.value)


def test_probe_and_finetune_init_loader_refuses_a_hostile_checkpoint(runs, tmp_path, canary):
    from d2v.export import load_student
    from d2v.safe_load import RefusedFile

    run_dir, hostile = _hostile_copy(runs, "zero0", tmp_path, canary, "mp_rank_00_model_states.pt", "builtins.exec")
    with pytest.raises(RefusedFile, match=hostile):
        load_student(run_dir)


# -- pretrained directories (--init-from, finetune --init) -----------------------------------

@pytest.mark.parametrize("name,kind", [("pytorch_model.bin", "os.system"), ("pytorch_model.bin", "torchscript"),
                                       ("model.safetensors", "builtins.exec"), ("student.safetensors", "os.system")])
def test_init_from_refuses_hostile_weight_files(tmp_path, canary, name, kind):
    from d2v.config import resolve
    from d2v.interop import init_from
    from d2v.models import build_model
    from d2v.safe_load import RefusedFile

    cfg = resolve("audio_tiny")
    directory = tmp_path / "pretrained"
    directory.mkdir()
    if name == "student.safetensors":  # a d2v plain export
        from d2v.config import to_dict

        (directory / "config.json").write_text(json.dumps(to_dict(cfg)))
    else:  # a transformers directory
        from d2v.interop.hf_layout import hf_config

        (directory / "config.json").write_text(json.dumps(hf_config(cfg)))
    hostile = make_hostile(kind, directory / name, canary, around=lambda evil: {"encoder.w": evil})
    with pytest.raises(RefusedFile) as err:
        init_from(build_model(cfg), str(directory), cfg)
    assert hostile in str(err.value)


def test_the_trainer_engine_itself_reads_weights_only(runs, tmp_path, canary):
    """Without d2v's Checkpointer: the engine a Trainer builds refuses a hostile file itself, and
    a non-torch DeepSpeed checkpoint engine is refused by name."""
    from d2v.safe_load import RefusedFile
    from d2v.train.safe_checkpoint_engine import install_safe_checkpoint_engine
    from d2v.train.trainer import Trainer

    run_dir, hostile = _hostile_copy(runs, "zero2", tmp_path, canary, "*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    trainer = Trainer(_config(run_dir, 4), _template("zero2.json"))
    with pytest.raises(RefusedFile, match=hostile):
        trainer.engine.load_checkpoint(os.path.join(run_dir, "checkpoints"), tag="step_00000004")

    class OtherEngine:
        pass

    trainer.engine.checkpoint_engine = OtherEngine()
    with pytest.raises(ValueError, match="OtherEngine checkpoint engine"):
        install_safe_checkpoint_engine(trainer.engine)
