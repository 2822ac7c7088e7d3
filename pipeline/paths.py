"""Where the repository and the shared data live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The shared public data (tokenizers, GSM8K, ProsQA) beside the checkout.

    `PIPELINE_SHARED_DATA` overrides the default `<repo>/../shared/data`.
    """
    return Path(os.environ.get("PIPELINE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
