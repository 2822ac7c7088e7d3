"""Fixtures for the task tests: the official ProsQA items (read from the shared data, never copied)."""

from __future__ import annotations

import pytest

from pipeline.tasks import prosqa


@pytest.fixture(scope="session")
def prosqa_official(shared_data):
    """{"valid": [...300], "test": [...500]} as the files hold them."""
    return {split: prosqa.load_prosqa(split, shared_data / "prosqa") for split in prosqa.OFFICIAL_SPLITS}
