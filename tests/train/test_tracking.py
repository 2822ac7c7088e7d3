"""Tracking never stalls a run: an unwritable sqlite store turns MLflow off at once.

Before, MLflow retried a sqlite store it could not open for ~100 s before tracking turned
off (a server that is down already failed fast: MLFLOW_HTTP_REQUEST_MAX_RETRIES=0).
"""

from __future__ import annotations

import logging

from pipeline.train.config import TrackingSection
from pipeline.train.tracking import Tracker, start_parent_run, store_problem

UNWRITABLE = "sqlite:////proc/no-such-dir/mlflow.db"  # nobody, root included, creates files in /proc


def test_an_unwritable_sqlite_store_turns_tracking_off_before_mlflow_is_asked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        tracker = Tracker(TrackingSection(tracking_uri=UNWRITABLE), tmp_path, is_rank0=True)
    assert not tracker.active and tracker.run_id is None
    assert "the sqlite store /proc/no-such-dir/mlflow.db is not writable" in caplog.text
    tracker.log_metrics({"loss": 1.0}, step=1)  # metrics.jsonl still gets every step
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'
    assert start_parent_run(UNWRITABLE, "exp", "parent", {}) is None


def test_a_writable_sqlite_store_passes_the_check(tmp_path):
    assert store_problem(f"sqlite:///{tmp_path}/sub/mlflow.db") is None
    assert store_problem("http://127.0.0.1:1") is None  # servers fail fast on their own
