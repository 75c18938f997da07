"""d2v: data2vec pretraining on DeepSpeed. torch is installed first (see the Makefile) so that
no dependency pulls a CUDA build onto a CPU machine."""
from setuptools import find_packages, setup

setup(
    name="d2v",
    version="0.1.0",
    description="data2vec (1.0 and 2.0) pretraining for speech, vision and text on DeepSpeed, with Triton kernels",
    python_requires=">=3.10",
    # One import name, d2v: a second top-level name could collide with another distribution's.
    packages=find_packages(include=["d2v", "d2v.*"]),
    # The DeepSpeed templates ship inside the package (the checkout's ds_configs/ links to them),
    # so `--ds_config zero2.json` works from any directory.
    package_data={"d2v": ["ds_configs/*.json", "ds_configs/README.md"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy",
        "pyyaml",
        "webdataset>=0.2.90",
        "soundfile",
        "scipy",
        "safetensors",
        "tensorboard",
        "tqdm",
        "pillow",
        "sentencepiece",
        "tokenizers",
        "braceexpand",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "triton": ["triton>=3.1"],
        # eSpeak NG (GPL) synthesizes the speech demo; scikit-learn ships the image demo's
        # digits and photographs and fits the linear probe.
        "demo": ["espeakng-loader>=0.2", "scikit-learn"],
        "bench": ["matplotlib"],
        "hf": ["transformers>=4.40"],
        # xformers wheels are built for one CUDA torch; install them only on GPU machines.
        "gpu": ["xformers"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["d2v=d2v.__main__:main"]},
)
