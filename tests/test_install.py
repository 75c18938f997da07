"""d2v as a user installs it: the wheel holds no import name but d2v's, the checkout shadows no
other distribution, and the installed wheel runs from a directory outside the checkout beside
PyPI's `kernels` (which transformers imports when it is present).

The installed environment is a fresh venv holding only the d2v wheel (non-editable); a .pth file
lends it this environment's site-packages (torch, DeepSpeed, transformers, PyPI's kernels), so
nothing is downloaded and nothing of the checkout is on its path."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _top_level_names(wheel: str) -> set[str]:
    """Import names a wheel installs: its top-level folders and modules (metadata folders aside)."""
    names = set()
    for entry in zipfile.ZipFile(wheel).namelist():
        top = entry.split("/")[0]
        if top.endswith((".dist-info", ".data")):
            continue
        names.add(top[:-3] if top.endswith(".py") else top)
    return names


def test_the_top_level_name_reader_sees_folders_and_modules(tmp_path):
    wheel = tmp_path / "x-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("d2v/__init__.py", "kernels/__init__.py", "helper.py", "x-1.dist-info/METADATA"):
            z.writestr(name, "")
    assert _top_level_names(str(wheel)) == {"d2v", "kernels", "helper"}


def _installed_import_names() -> dict[str, str]:
    """{top-level import name: distribution} for every distribution installed here but d2v, from
    the first path component of each file in its RECORD."""
    owners = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name == "d2v":
            continue
        for line in (dist.read_text("RECORD") or "").splitlines():
            top = line.split(",")[0].split("/")[0]
            if top and not top.endswith((".dist-info", ".data", ".pth")) and top != "..":
                owners.setdefault(top[:-3] if top.endswith(".py") else top, name)
    return owners


def test_the_checkout_root_shadows_no_installed_distribution():
    """`python -m pytest` and the launchers put the checkout root first on sys.path: a package or
    module there (the checkout's benchmarks/ scripts are one) must not share a name with anything
    installed beside d2v."""
    importable = {e[:-3] if e.endswith(".py") else e for e in os.listdir(ROOT)
                  if e.endswith(".py") or os.path.isfile(os.path.join(ROOT, e, "__init__.py"))} - {"setup"}
    owners = _installed_import_names()
    assert "d2v" in importable and "torch" in owners
    clashes = {name: owners[name] for name in importable if name in owners}
    assert not clashes, f"checkout names that shadow installed distributions: {clashes}"


def test_import_kernels_from_the_checkout_root_is_not_d2v():
    """The checkout's kernels/ folder holds documentation only: `import kernels` there gives PyPI's
    package where it is installed (transformers imports it), and nothing of d2v's otherwise."""
    proc = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                          capture_output=True, text=True)
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert proc.returncode != 0 or proc.stdout.strip() == "None", proc.stdout  # a namespace at most
        return
    assert proc.returncode == 0, proc.stderr
    assert os.path.samefile(proc.stdout.strip(), dist.locate_file("kernels/__init__.py")), proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the source: an in-tree build/ folder keeps files deleted since, and
    setuptools would pack them."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "d2v"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "runs", "demo_data", "wheels", "__pycache__", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (path,) = out.glob("d2v-*.whl")
    return str(path)


def test_the_wheel_installs_only_d2v_import_names_and_ships_what_the_cli_reads(wheel):
    assert _top_level_names(wheel) == {"d2v"}
    files = set(zipfile.ZipFile(wheel).namelist())
    needed = {"d2v/kernels/__init__.py", "d2v/launchers/pretrain.py", "d2v/launchers/finetune.py",
              "d2v/interop/hf_data2vec2.py",  # the modelling file `export --format hf` copies
              *(f"d2v/ds_configs/{n}.json" for n in ("cpu", "zero1", "zero2", "zero3", "zero3_offload"))}
    assert needed <= files, sorted(needed - files)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(python, work dir): a venv with the d2v wheel and the `hf` extra, and a folder outside the checkout."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "zz_lent_site_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # after the venv's own: its d2v comes first
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index"]
    subprocess.run(pip + ["--no-deps", "--ignore-installed", wheel], check=True, capture_output=True, text=True)
    # Every requirement of d2v[hf] is met without a download (the lent site-packages).
    proc = subprocess.run(pip + ["d2v[hf]"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path_factory.mktemp("user")
    return python, str(work)


def _run(installed, *args, timeout=300):
    python, work = installed
    # Nothing of this session: no path to the checkout, no rendezvous an in-process test set up.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_installed_d2v_is_the_wheel_beside_pypis_kernels(installed):
    found = json.loads(_run(installed, "-c", textwrap.dedent("""
        import json, d2v, d2v.kernels, kernels
        print(json.dumps({"d2v": d2v.__file__, "kernels": kernels.__file__,
                          "alibi": callable(d2v.kernels.alibi_slopes)}))""")))
    venv = os.path.dirname(os.path.dirname(installed[0]))
    assert found["d2v"].startswith(venv) and not found["d2v"].startswith(ROOT), found
    assert os.path.samefile(found["kernels"],
                            importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")), found
    assert found["alibi"]


def test_installed_describe(installed):
    out = _run(installed, "-m", "d2v", "describe", "audio_tiny_v2", "--json")
    assert json.loads(out)["preset"] == "audio_tiny_v2"


def test_installed_pretrain_then_hf_export_loaded_by_transformers(installed):
    """The documented `--ds_config ds_configs/cpu.json` from a folder that has none: the shipped template."""
    out = _run(installed, "-m", "d2v.launchers.pretrain", "--ds_config", "ds_configs/cpu.json",
               "--preset", "audio_tiny", "--out", "run", "train.max_steps=2", "train.log_every=1",
               "train.precision=fp32")
    assert "done: 2 steps" in out, out
    _run(installed, "-m", "d2v", "export", "run", "plain")
    _run(installed, "-m", "d2v", "export", "run", "hf", "--format", "hf")
    err = float(_run(installed, "-c", textwrap.dedent("""
        import torch
        from transformers import AutoModel
        from d2v.export import load_exported

        student, _, cfg = load_exported("plain")
        hf, info = AutoModel.from_pretrained("hf", output_loading_info=True)
        assert not any(info.values()), info
        x = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats = student.eval().features(x, None)
            ref = student.encode(feats.x, feats.padding_mask, keep_extra_tokens=True)
            got = hf.eval()(x).last_hidden_state
        print((got - ref).abs().max().item())""")).split()[-1])
    assert err <= 1e-5


def test_installed_import_fairseq_data2vec2_audio(installed, tmp_path):
    """Building a 2.0 audio model reads d2v.kernels' ALiBi slopes: what PyPI's kernels shadowed."""
    from test_fairseq_import import _model, _omegaconf, _save_fairseq, _v2_fairseq_state

    cfg, model = _model("audio_tiny_v2")
    fs = _v2_fairseq_state(model.state_dict(), "AUDIO", "audio")
    tree = {"model": {"_name": "data2vec_multi", "num_heads": cfg.model.num_heads, "norm_eps": cfg.model.norm_eps,
                      "modalities": {"audio": {"feature_encoder_spec": str(list(cfg.model.audio.conv_layers)),
                                               "decoder": {"decoder_residual": True}}}}}
    ckpt = str(tmp_path / "v2.pt")
    _save_fairseq(ckpt, lambda c: {"cfg": _omegaconf(c, tree), "model": fs})
    _run(installed, "-m", "d2v", "import-fairseq", ckpt, "imported")
    from d2v.export import load_exported

    student, _, _ = load_exported(os.path.join(installed[1], "imported"))
    assert student.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(student.state_dict()[k], v) for k, v in model.state_dict().items())
