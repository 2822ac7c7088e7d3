"""Shared fixtures: paths to the public data beside the checkout, GPU skipping."""

from __future__ import annotations

import pytest
import torch

from pipeline.paths import shared_data_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set PIPELINE_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data):
    return shared_data / "tokenizers" / "gpt2"
