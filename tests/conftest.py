"""Test layers. Every test module belongs to one layer, marked on each of its tests:

    unit         pure functions and single modules, seconds in all
    kernels      Triton kernels (interpreted on CPU) and their GPU-compile checks
    integration  whole trainers, exports and benchmarks in one process
    distributed  2-rank DeepSpeed launches (one launch per module, many cases inside)

`pytest -m unit` is the quick loop; `make test` runs every layer. A new test module must be
added to LAYERS (collection fails otherwise), so no test escapes its layer."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

LAYERS = {
    "unit": ["test_config", "test_presets", "test_layers", "test_masking_span", "test_masking_image_text",
             "test_masking_v2", "test_targets", "test_collectives", "test_gpu_paths", "test_models_audio",
             "test_models_image_text", "test_v2", "test_teacher", "test_data_audio", "test_data_image_text",
             "test_untrusted_files", "test_prepare_checks", "test_eval_seeds", "test_asr_decode", "test_asr",
             "test_image_recipe"],
    "kernels": ["test_kernels_attention", "test_kernels_targets", "test_kernels_compile"],
    "integration": ["test_train_single", "test_interop", "test_finetune", "test_benchmarks", "test_gpu_check",
                    "test_nothing_lost", "test_install", "test_run_plan", "test_fairseq_import", "test_run_identity",
                    "test_hf_v2", "test_glue", "test_image_finetune"],
    "distributed": ["test_dist_pretrain", "test_dist_v2", "test_zero", "test_cluster_ops", "test_host_sync",
                    "test_asr_e2e"],
}
_LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def pytest_configure(config):
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: {layer} tests (tests/conftest.py)")


_LAYER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Adds each test's setup, call and teardown time to its layer (printed at the end)."""
    layer = _LAYER_OF.get(report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py"))
    if layer is not None:
        _LAYER_SECONDS[layer] = _LAYER_SECONDS.get(layer, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if _LAYER_SECONDS:
        terminalreporter.write_line("seconds per layer: " + ", ".join(
            f"{layer} {_LAYER_SECONDS[layer]:.0f}" for layer in LAYERS if layer in _LAYER_SECONDS))


def pytest_collection_modifyitems(config, items):
    unknown = sorted({item.module.__name__ for item in items if item.module.__name__ not in _LAYER_OF})
    if unknown:
        raise pytest.UsageError(f"test modules without a layer: {unknown}; add them to LAYERS in tests/conftest.py")
    for item in items:
        item.add_marker(getattr(pytest.mark, _LAYER_OF[item.module.__name__]))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The built-in demo data of every modality as prepared shards, built once per session:
    {"root": folder, "audio": make_audio_demo's summary (120 utterances), "image": ..., "text": ...}."""
    pytest.importorskip("espeakng_loader", reason="the speech demo needs the `demo` extra (espeakng-loader)")
    from d2v.data.demo import make_audio_demo
    from d2v.data.demo_image import build_image_demo
    from d2v.data.demo_text import build_text_demo

    root = tmp_path_factory.mktemp("demo_data")
    return {"root": root, "audio": make_audio_demo(str(root / "audio"), utterances=120, workers=1),
            "image": build_image_demo(str(root / "image")), "text": build_text_demo(str(root / "text"))}
