"""data2vec 2.0 in transformers (README, interop): every 2.0 modality, student and EMA teacher,
exported with `write_hf` and loaded with `AutoModel.from_pretrained(OUT, trust_remote_code=True)`
in a process that runs outside the checkout and cannot import d2v; its `last_hidden_state` must be
d2v's encoder output (fp32, eval) on padded and unpadded batches, and `pipeline("feature-extraction",
OUT)` on a file must give what d2v's own data pipeline and encoder give. Then the directories come
back: --init-from and fine-tuning's --init load them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from word_tokenizer import word_tokenizer  # noqa: E402

PRESETS = ["audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"]
# 0 where the modelling file repeats d2v's operations in order (audio, image). Text loads into
# transformers' Data2VecTextModel, whose embedding sums word + token type + position where d2v sums
# word + position + token type: float addition is not associative, one rounding per element.
BOUND = {"audio": 0.0, "image": 0.0, "text": 1e-5}

# Runs in a temporary directory with d2v made unimportable: only the export directory counts.
OUTSIDE = r'''
import json, sys
sys.modules["d2v"] = None  # `import d2v` raises: the export must stand on its own
import numpy as np, soundfile, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, pipeline

for job in json.load(open(sys.argv[1])):
    model = AutoModel.from_pretrained(job["dir"], trust_remote_code=True, **job["kwargs"]).eval()
    inputs = load_file(job["inputs"])
    out = {}
    with torch.no_grad():
        for batch in job["batches"]:
            kw = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith(batch + "/")}
            out[batch] = model(**kw).last_hidden_state.contiguous()
    pipe = pipeline("feature-extraction", job["dir"], trust_remote_code=True, model_kwargs=job["kwargs"])
    arg = job["file"]
    if arg.endswith(".wav"):
        arg = soundfile.read(arg, dtype="float32")[0]
    out["pipeline"] = pipe(arg, return_tensors=True)[0].contiguous()
    out["module"] = torch.tensor([ord(c) for c in type(model).__module__])
    save_file(out, job["result"])
leaked = sorted(m for m in sys.modules if m.startswith("d2v") and sys.modules[m] is not None)
assert not leaked, leaked
'''


def _model(preset, seed=0):
    from d2v.config import get_preset
    from d2v.models import build_model

    torch.manual_seed(seed)
    cfg = get_preset(preset)
    model = build_model(cfg)
    with torch.no_grad():  # every weight off its initial value (unit ALiBi scales, zero biases...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model.eval()


def _batches(cfg):
    """name -> (transformers kwargs, d2v source, d2v lengths): a padded and an unpadded batch."""
    g = torch.Generator().manual_seed(1)
    m = cfg.model
    if m.modality == "audio":
        x = torch.randn(2, 8000, generator=g)
        x[1, 5600:] = 0.0
        lengths = torch.tensor([8000, 5600])
        mask = (torch.arange(8000)[None, :] < lengths[:, None]).long()
        full = torch.randn(2, 6400, generator=g)
        return {"padded": ({"input_values": x, "attention_mask": mask}, x, lengths),
                "unpadded": ({"input_values": full}, full, None)}
    if m.modality == "image":
        x = torch.randn(3, m.image.in_chans, m.image.image_size, m.image.image_size, generator=g)
        return {"unpadded": ({"pixel_values": x}, x, None)}
    ids = torch.randint(4, m.text.vocab_size - 1, (2, 24), generator=g)
    ids[:, 0], ids[0, -1] = m.text.bos_id, m.text.eos_id
    padded = ids.clone()
    padded[1, 17:] = m.text.pad_id
    return {"padded": ({"input_ids": padded, "attention_mask": padded.ne(m.text.pad_id).long()}, padded, None),
            "unpadded": ({"input_ids": ids}, ids, None)}


def _d2v_hidden(model, source, lengths):
    """d2v's encoder output over the whole input (image: CLS first) and the non-padded positions."""
    with torch.no_grad():
        feats = model.features(source, lengths)
        h = model.encode(feats.x, feats.padding_mask, keep_extra_tokens=True)
    valid = torch.ones(h.shape[:2], dtype=torch.bool) if feats.padding_mask is None else ~feats.padding_mask
    return h, valid


def _demo_file(cfg, directory, tokenizer):
    """A file of the modality and d2v's reading of it (its data pipeline's decode and transform)."""
    m = cfg.model
    if m.modality == "audio":
        import soundfile

        from d2v.data.audio import decode_audio, normalize_waveform

        t = np.arange(7000) / 16000
        # a quiet chirp with a DC offset: its variance (5e-5) is where the normalisation's epsilon counts
        wave = (0.01 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.002).astype(np.float32)
        path = os.path.join(directory, "demo.wav")
        soundfile.write(path, wave, 16000, subtype="PCM_16")
        with open(path, "rb") as f:
            wav = normalize_waveform(decode_audio(f.read(), 16000))
        return path, torch.from_numpy(wav)[None]
    if m.modality == "image":
        from PIL import Image

        from d2v.data.image import ImageTransform, decode_image

        rgb = np.random.default_rng(0).integers(0, 256, (45, 37, 3), dtype=np.uint8)
        path = os.path.join(directory, "demo.png")
        Image.fromarray(rgb).save(path)
        with open(path, "rb") as f:
            image = decode_image({"png": f.read()})
        transform = ImageTransform(m.image.image_size, m.image.mean, m.image.std, train=False)
        return path, transform(image, torch.Generator())[None]
    from d2v.data.tokenizer import Tokenizer

    text = "w5 w9 w11 w5 w1200"
    ids = Tokenizer(tokenizer).encode(text)
    return text, torch.tensor([[m.text.bos_id, *ids, m.text.eos_id]])  # a document as d2v's shards hold it


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Student and teacher exports of every 2.0 modality, read back in one process outside the
    checkout: name -> (cfg, d2v network, export dir, batches, demo reference, outside results)."""
    from d2v.interop import write_hf
    from d2v.models import build_model
    from d2v.teacher import Teacher

    root = tmp_path_factory.mktemp("hf_v2")
    jobs, cases = [], {}
    for preset in PRESETS + ["audio_tiny"]:  # 1.0 audio: transformers' model, d2v's preprocessing
        cfg, model = _model(preset)
        tok = None
        if cfg.model.modality == "text":
            tok = word_tokenizer(root / "tok.json", cfg.model.text.vocab_size)
        state = Teacher(model, cfg.teacher).export_state()
        state = {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}  # an EMA that moved away
        teacher_net = build_model(cfg).eval()  # the student's network with the teacher's weights where it has them
        teacher_net.load_state_dict({**model.state_dict(), **state})
        whom = (("student", model, None), ("teacher", teacher_net, state))
        for who, net, teacher in whom if model.drops_masked else whom[:1]:
            name = f"{preset}-{who}"
            out = str(root / name)
            meta = write_hf(out, cfg, model.state_dict(), teacher=teacher, tokenizer=tok)
            batches = _batches(cfg)
            save_file({f"{b}/{k}": v.contiguous() for b, (kw, _, _) in batches.items() for k, v in kw.items()},
                      str(root / f"{name}.in.safetensors"))
            file_arg, demo_source = _demo_file(cfg, str(root), tok)
            kwargs = {"add_pooling_layer": False} if cfg.model.modality == "text" else {}
            jobs.append({"dir": out, "kwargs": kwargs, "inputs": str(root / f"{name}.in.safetensors"),
                         "batches": sorted(batches), "file": file_arg, "result": str(root / f"{name}.out.safetensors")})
            cases[name] = (cfg, net, out, meta, batches, demo_source)
    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"), PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "-c", OUTSIDE, str(root / "jobs.json")], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: (*case, load_file(str(root / f"{name}.out.safetensors"))) for name, case in cases.items()}


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("preset", PRESETS)
def test_v2_export_equals_d2v_outside_the_checkout(exports, preset, who):
    cfg, net, out, meta, batches, _, got = exports[f"{preset}-{who}"]
    modality = cfg.model.modality
    for batch, (_, source, lengths) in batches.items():
        ref, valid = _d2v_hidden(net, source, lengths)
        assert got[batch].shape == ref.shape, batch
        err = (got[batch] - ref)[valid].abs().max().item()
        print(f"\n{preset} {who} {batch}: max |HF - d2v| = {err:.3g}")
        assert err <= BOUND[modality], (batch, err)
    module = "".join(chr(c) for c in got["module"].tolist())
    if modality == "text":
        assert module == "transformers.models.data2vec.modeling_data2vec_text"
    else:  # d2v's modelling file, loaded from the export's copy
        assert module.endswith("modeling_data2vec2") and os.path.exists(os.path.join(out, "modeling_data2vec2.py"))
    assert meta["weights"] == who
    assert all(n.startswith("decoder.") for n in meta["not_exported"]) and meta["not_exported"]


@pytest.mark.parametrize("preset", PRESETS)
def test_v2_pipeline_on_a_file_equals_d2v_pipeline(exports, preset):
    """Preprocessing saved with the export: audio normalisation, image resize and mean/std, the
    tokenizer with its <s> ... </s> marks."""
    cfg, net, _, _, _, demo_source, got = exports[f"{preset}-student"]
    ref = _d2v_hidden(net, demo_source, None)[0][0]
    assert got["pipeline"].shape == ref.shape
    err = (got["pipeline"] - ref).abs().max().item()
    print(f"\n{preset} pipeline on a file: max |HF - d2v| = {err:.3g}")
    assert err <= BOUND[cfg.model.modality]


def test_audio_1_0_export_keeps_transformers_model_and_ships_d2v_normalisation(exports):
    """Wav2Vec2FeatureExtractor's variance epsilon (1e-7) is not d2v's (1e-5): on quiet speech its
    features differ by the order of the signal, so 1.0 audio exports carry d2v's feature extractor."""
    cfg, net, out, _, batches, demo_source, got = exports["audio_tiny-student"]
    assert "".join(chr(c) for c in got["module"].tolist()) == "transformers.models.data2vec.modeling_data2vec_audio"
    for batch, (_, source, lengths) in batches.items():
        ref, valid = _d2v_hidden(net, source, lengths)
        assert (got[batch] - ref)[valid].abs().max().item() == 0.0, batch
    ref = _d2v_hidden(net, demo_source, None)[0][0]
    assert (got["pipeline"] - ref).abs().max().item() == 0.0
    config = json.load(open(os.path.join(out, "config.json")))
    assert "AutoModel" not in config["auto_map"] and config["architectures"] == ["Data2VecAudioModel"]


def test_v2_config_json_is_explicit_and_names_the_modelling_file(exports):
    cfg, _, out, _, _, _, _ = exports["audio_tiny_v2-student"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModel"] == "modeling_data2vec2.Data2Vec2AudioModel"
    assert config["alibi"] is True and config["conv_pos_depth"] == cfg.model.audio.conv_pos_depth
    pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert pre["do_normalize"] is True and pre["sampling_rate"] == 16000
    cfg, _, out, _, _, _, _ = exports["image_tiny_v2-student"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_prenet_layers"] == cfg.model.v2.prenet_depth and config["num_hidden_layers"] == cfg.model.depth
    cfg, _, out, _, _, _, _ = exports["text_tiny_v2-student"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["Data2VecTextModel"] and "auto_map" not in config


def test_modelling_file_recomputes_the_fixed_tables_as_d2v():
    """A model built from its config alone (no weights) has d2v's ALiBi slopes and sin-cos table."""
    from d2v.interop import hf_data2vec2
    from d2v.kernels import alibi_slopes
    from d2v.models.positions import sincos_2d

    for heads in (4, 12, 16):
        assert torch.equal(hf_data2vec2.alibi_slopes(heads), alibi_slopes(heads))
    assert torch.equal(hf_data2vec2.sincos_table(14, 768), sincos_2d((14, 14), 768))


@pytest.mark.parametrize("preset", ["audio_tiny_v2", "image_tiny_v2", "text_tiny_v2"])
def test_v2_export_comes_back_through_init_from_and_finetune_init(exports, preset):
    from d2v.finetune.model import load_backbone
    from d2v.interop import init_from, pretrained_config
    from d2v.models import build_model

    cfg, _, out, _, _, _, _ = exports[f"{preset}-teacher"]
    own = pretrained_config(out)
    assert own.model.drops_masked and own.model.v2.prenet_depth == cfg.model.v2.prenet_depth
    torch.manual_seed(5)
    fresh = build_model(cfg)
    report = init_from(fresh, out, cfg)
    assert sorted({n.split(".")[0] for n in report.kept_init}) == ["decoder"]
    from d2v.interop.hf_layout import d2v_to_hf_name
    from d2v.interop.hf_v2 import is_custom, to_stock_depth

    exported = load_file(os.path.join(out, "model.safetensors"))

    for name, tensor in fresh.state_dict().items():
        if name.startswith("decoder."):
            continue
        key = name if is_custom(cfg) else d2v_to_hf_name(cfg.model.modality,
                                                        to_stock_depth(name, cfg.model.v2.prenet_depth))
        assert torch.equal(tensor, exported[key]), name
    backbone = load_backbone(out, cfg.model, random_init=False, seed=0)
    for name, tensor in fresh.state_dict().items():
        if not name.startswith("decoder."):
            assert torch.equal(backbone.state_dict()[name], tensor), name


def test_init_from_refuses_a_v2_export_for_another_architecture(exports):
    from d2v.config import get_preset
    from d2v.interop import init_from
    from d2v.models import build_model

    _, _, out, _, _, _, _ = exports["image_tiny_v2-student"]
    other = get_preset("image_tiny_v2")
    other.model.v2.prenet_depth = 0
    other.model.depth = 4
    with pytest.raises(ValueError, match="prenet_depth"):
        init_from(build_model(other), out, other)
    with pytest.raises(ValueError, match="v2.enabled"):
        one = get_preset("image_tiny")
        init_from(build_model(one), out, one)


# What a user does with an export beyond the parity check, run outside the checkout as above:
# processors, pipelines on every input form, dtype, batching, transformers' own options, and a
# transformers re-save of each 2.0 export. A probe records its result or the error it raised.
PROBES = r'''
import json, sys
sys.modules["d2v"] = None
import numpy as np, soundfile, torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, pipeline

job = json.load(open(sys.argv[1]))
res, ten = {}, {}


def probe(name, fn):
    try:
        value = fn()
    except Exception as err:  # the test asserts on the message
        value = f"{type(err).__name__}: {err}"
    res[name] = value if isinstance(value, (str, float, int)) else f"returned {type(value).__name__}"


rng = np.random.default_rng(3)
a, b = rng.standard_normal(12000).astype(np.float32), rng.standard_normal(6000).astype(np.float32)
ten["wave_a"], ten["wave_b"] = torch.from_numpy(a), torch.from_numpy(b)
for key, d in job["audio"].items():
    probe(f"{key}/processor", lambda: type(AutoProcessor.from_pretrained(d, trust_remote_code=True)).__name__)
    pipe = pipeline("feature-extraction", d, trust_remote_code=True)
    one, two = pipe([a, b], batch_size=2, return_tensors=True)
    ten[f"{key}/batch_a"], ten[f"{key}/batch_b"] = one[0].contiguous(), two[0].contiguous()
    ten[f"{key}/alone_b"] = pipe(b, return_tensors=True)[0].contiguous()
    wav = soundfile.read(job["wav"], dtype="float32")[0]
    ten[f"{key}/array"] = pipe(wav, return_tensors=True)[0].contiguous()
    for form, arg in (("path", job["wav"]), ("bytes", open(job["wav"], "rb").read()),
                      ("raw", {"raw": wav, "sampling_rate": 16000}), ("dict_array", {"array": wav}),
                      ("tensor", torch.from_numpy(wav))):
        probe(f"{key}/{form}", lambda: float((pipe(arg, return_tensors=True)[0] - ten[f"{key}/array"]).abs().max()))
    probe(f"{key}/rate_kwarg", lambda: pipe(a, sampling_rate=8000))
    probe(f"{key}/rate_dict", lambda: pipe({"raw": a, "sampling_rate": 8000}))
    low = pipeline("feature-extraction", d, trust_remote_code=True, dtype=torch.bfloat16)
    probe(f"{key}/bf16",
          lambda: float((low(a, return_tensors=True)[0].float() - pipe(a, return_tensors=True)[0]).abs().max()))

d = job["audio"]["v2"]
x = torch.from_numpy(a)[None]
probe("sdpa", lambda: AutoModel.from_pretrained(d, trust_remote_code=True,
                                                attn_implementation="sdpa").config._attn_implementation)
model = AutoModel.from_pretrained(d, trust_remote_code=True)
probe("output_attentions", lambda: model(input_values=x, output_attentions=True))
probe("misspelled", lambda: model(input_values=x, attenton_mask=torch.ones_like(x)))


def grads(checkpointing):
    m = AutoModel.from_pretrained(d, trust_remote_code=True).train()
    if checkpointing:
        m.gradient_checkpointing_enable()
    torch.manual_seed(0)
    m(input_values=x).last_hidden_state.square().mean().backward()
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def checkpointed():
    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    return max(float((plain[n] - ckpt[n]).abs().max()) for n in plain)


probe("checkpointing", checkpointed)
for key, (d, kwargs) in job["resave"].items():
    probe(f"resave/{key}", lambda: AutoModel.from_pretrained(d, trust_remote_code=True, **kwargs).save_pretrained(
        f"{job['root']}/resaved-{key}") or "ok")
save_file(ten, f"{job['root']}/probes.safetensors")
json.dump(res, open(f"{job['root']}/probes.json", "w"))
'''


@pytest.fixture(scope="module")
def probes(exports):
    """Results of PROBES on the exports: (results by name, tensors by name, folder of the re-saved copies)."""
    import soundfile

    root = os.path.dirname(exports["audio_tiny_v2-student"][2])
    wav = os.path.join(root, "probe.wav")
    t = np.arange(9000) / 16000
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, subtype="PCM_16")
    job = {"root": root, "wav": wav,
           "audio": {"v2": exports["audio_tiny_v2-student"][2], "v1": exports["audio_tiny-student"][2]},
           "resave": {p: (exports[f"{p}-student"][2], {"add_pooling_layer": False} if p.startswith("text") else {})
                      for p in PRESETS}}
    with open(os.path.join(root, "probes_job.json"), "w") as f:
        json.dump(job, f)
    outside = os.path.join(root, "elsewhere")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=os.path.join(root, "hf_home"), PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "-c", PROBES, os.path.join(root, "probes_job.json")], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(root, "probes.json")) as f:
        results = json.load(f)
    return results, load_file(os.path.join(root, "probes.safetensors")), root


@pytest.mark.parametrize("preset", PRESETS)
def test_v2_export_resaved_by_transformers_comes_back(exports, probes, preset):
    """save_pretrained drops d2v_export.json: config.json alone must rebuild the architecture, for
    pretraining's --init-from (checked against the run) and fine-tuning's --init (built from it)."""
    from d2v.finetune.config import read_pretrain_config
    from d2v.finetune.model import load_backbone
    from d2v.interop import init_from
    from d2v.models import build_model

    results, _, root = probes
    assert results[f"resave/{preset}"] == "ok"
    cfg, net, _, _, _, _, _ = exports[f"{preset}-student"]
    new = os.path.join(root, f"resaved-{preset}")
    assert not os.path.exists(os.path.join(new, "d2v_export.json"))
    fresh = build_model(cfg)
    init_from(fresh, new, cfg)
    own = read_pretrain_config(new)
    assert own.model.drops_masked and own.model.modality == cfg.model.modality
    backbone = load_backbone(new, own.model, random_init=False, seed=0)
    for name, tensor in net.state_dict().items():
        if not name.startswith("decoder."):
            assert torch.equal(fresh.state_dict()[name], tensor), name
            assert torch.equal(backbone.state_dict()[name], tensor), name


def test_stock_text_without_the_2_0_mark_is_refused_without_switching_method(probes):
    """A stock text directory that does not say it is 2.0 reads as 1.0; a 2.0 run refuses it and
    points at the method, never at the override model.v2.enabled=false (which keeps 2.0's settings)."""
    import shutil

    from d2v.config import get_preset
    from d2v.interop import init_from
    from d2v.interop.hf_v2 import STOCK_PRENET_KEY
    from d2v.models import build_model

    _, _, root = probes
    bare = os.path.join(root, "resaved-text-unmarked")
    shutil.copytree(os.path.join(root, "resaved-text_tiny_v2"), bare, dirs_exist_ok=True)
    with open(os.path.join(bare, "config.json")) as f:
        config = json.load(f)
    del config[STOCK_PRENET_KEY]
    with open(os.path.join(bare, "config.json"), "w") as f:
        json.dump(config, f)
    cfg = get_preset("text_tiny_v2")
    with pytest.raises(ValueError, match="data2vec 1.0") as err:
        init_from(build_model(cfg), bare, cfg)
    assert "v2.enabled=" not in str(err.value)


def test_init_from_a_run_directory_says_export_it_first(tmp_path):
    from d2v.config import get_preset, to_dict
    from d2v.interop import init_from
    from d2v.models import build_model

    cfg = get_preset("audio_tiny_v2")
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    with pytest.raises(ValueError, match="export the run first"):
        init_from(build_model(cfg), str(tmp_path), cfg)


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_audio_export_auto_processor_is_the_feature_extractor(probes, which):
    """transformers looks for ...ImageProcessor before ...FeatureExtractor: auto_map must name it."""
    assert probes[0][f"{which}/processor"] == "Data2Vec2FeatureExtractor"


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_audio_pipeline_reads_files_bytes_dicts_and_tensors_and_refuses_other_rates(probes, which):
    results = probes[0]
    for form in ("path", "bytes", "raw", "dict_array", "tensor"):
        assert results[f"{which}/{form}"] == 0.0, (form, results[f"{which}/{form}"])
    for form in ("rate_kwarg", "rate_dict"):
        assert results[f"{which}/{form}"].startswith("ValueError") and "8000" in results[f"{which}/{form}"], form


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_audio_pipeline_runs_in_bf16(probes, which):
    err = probes[0][f"{which}/bf16"]
    assert isinstance(err, float), err
    assert err < 0.5  # bf16 keeps 8 bits of mantissa; features are O(1) after the final LayerNorm


def test_audio_pipeline_batches_keep_each_clips_own_frames(exports, probes):
    """batch_size=2: each clip's frames only, equal to d2v's encoder on the same padded batch (a
    padded row is not the clip alone: the positional conv zeroes padding only before its first
    layer, docs/method.md §8)."""
    from d2v.data.audio import normalize_waveform
    from d2v.shapes import conv_output_length

    cfg, net, _, _, _, _, _ = exports["audio_tiny_v2-student"]
    _, ten, _ = probes
    a, b = ten["wave_a"].numpy(), ten["wave_b"].numpy()
    frames = [conv_output_length(len(w), cfg.model.audio.conv_layers) for w in (a, b)]
    assert ten["v2/batch_a"].shape[0] == frames[0] and ten["v2/batch_b"].shape[0] == frames[1]
    assert ten["v1/batch_b"].shape[0] == frames[1]
    source = torch.zeros(2, len(a))
    source[0] = torch.from_numpy(normalize_waveform(a))
    source[1, :len(b)] = torch.from_numpy(normalize_waveform(b))
    ref, _ = _d2v_hidden(net, source, torch.tensor([len(a), len(b)]))
    assert torch.equal(ten["v2/batch_a"], ref[0, :frames[0]])
    assert torch.equal(ten["v2/batch_b"], ref[1, :frames[1]])
    assert ten["v2/alone_b"].shape == ten["v2/batch_b"].shape


def test_model_takes_transformers_options_and_refuses_what_it_cannot_do(probes):
    results = probes[0]
    assert results["sdpa"] == "sdpa"
    assert results["output_attentions"].startswith("ValueError")
    assert results["misspelled"].startswith("TypeError") and "attenton_mask" in results["misspelled"]
    assert results["checkpointing"] == 0.0  # recomputed activations give the same gradients


def test_image_processor_accepts_what_transformers_processors_accept():
    """Channels first or last, numpy or torch, uint8 or float 0-1, batched 4-D: all the same pixels."""
    from d2v.interop.hf_data2vec2 import Data2Vec2ImageProcessor

    proc = Data2Vec2ImageProcessor(size=32)
    hwc = np.random.default_rng(0).integers(0, 256, (45, 37, 3), dtype=np.uint8)
    ref = proc(hwc)["pixel_values"]
    assert ref.shape == (1, 3, 32, 32)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    for form in (chw, torch.from_numpy(chw), hwc.astype(np.float32) / 255, torch.from_numpy(hwc).float() / 255):
        assert torch.equal(proc(form)["pixel_values"], ref)
    batch = proc(np.stack([hwc, hwc[::-1].copy()]))["pixel_values"]
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[:1], ref)
    from PIL import Image

    assert torch.equal(proc(hwc[..., 0])["pixel_values"], proc(Image.fromarray(hwc[..., 0]))["pixel_values"])
    with pytest.raises(ValueError, match="0-1"):
        proc(hwc.astype(np.float32))  # float pixels in 0-255 are ambiguous: refused, not clipped
    with pytest.raises(ValueError, match="cannot read str"):
        proc("image.png")


def test_text_cls_finetune_takes_the_tokenizer_the_export_ships(exports):
    """--init OUT of a text export: the tokenizer inside OUT, encoding as the pretraining one."""
    from d2v.data.tokenizer import Tokenizer
    from d2v.finetune.resolve import resolve_finetune

    cfg, _, out, _, _, _, _ = exports["text_tiny_v2-student"]
    ft, _ = resolve_finetune("text_cls", init=out, overrides=["finetune.train_data=a.tsv", "finetune.eval_data=b.tsv"])
    assert os.path.dirname(ft.finetune.tokenizer) == out
    text = "w5 w9 w11 w5 w1200 zzz"
    assert Tokenizer(ft.finetune.tokenizer).encode(text) == Tokenizer(os.path.join(os.path.dirname(out),
                                                                                    "tok.json")).encode(text)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_32"])
def test_pipeline_reads_pcm_wav_without_soundfile(tmp_path, subtype):
    """The standard-library reader the modelling file falls back on reads what soundfile reads."""
    import io

    import soundfile

    from d2v.interop.hf_data2vec2 import _read_pcm_wav

    stereo = 0.5 * np.sin(np.arange(600)[:, None] * np.array([[0.01, 0.03]])).astype(np.float32)
    path = str(tmp_path / "x.wav")
    soundfile.write(path, stereo, 16000, subtype=subtype)
    want, rate = soundfile.read(path, dtype="float32", always_2d=True)
    with open(path, "rb") as f:
        got, got_rate = _read_pcm_wav(io.BytesIO(f.read()))
    assert got_rate == rate == 16000 and np.array_equal(got, want)
