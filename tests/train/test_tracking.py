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


def test_metrics_reach_mlflow_in_batches_and_every_step_arrives(tmp_path):
    """Steps wait for the next multiple of flush_every (or a validation row), then all go at
    once; finish sends the rest. Every step's value ends up in the store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(TrackingSection(tracking_uri=uri), tmp_path, is_rank0=True, flush_every=5)
    client, run_id = MlflowClient(uri), tracker.run_id

    def logged() -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))

    for step in range(1, 5):
        tracker.log_metrics({"loss": float(step)}, step)
    assert logged() == []
    tracker.log_metrics({"loss": 5.0}, 5)
    assert logged() == [(s, float(s)) for s in range(1, 6)]
    tracker.log_metrics({"loss": 6.0, "val_loss": 0.5}, 6)  # a validation row goes at once
    assert logged()[-1] == (6, 6.0) and client.get_metric_history(run_id, "val_loss")[0].value == 0.5
    tracker.log_metrics({"loss": 7.0}, 7)
    tracker.finish()
    assert logged() == [(s, float(s)) for s in range(1, 8)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7
