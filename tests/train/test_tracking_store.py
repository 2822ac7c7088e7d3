"""A local sqlite tracking store keeps its artifacts beside the database, not in ./mlruns.

MLflow's default artifact root for a database store is `./mlruns` of the working
directory: the quickstart in the container wrote `loss.png` into the image's code
directory that way (docker/smoke_test.sh, check 1).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.train.config import TrackingSection
from pipeline.train.tracking import Tracker, start_parent_run


def test_artifacts_stay_in_the_run_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "note.txt").write_text("x")
    uri = f"sqlite:///{run_dir}/mlflow.db"

    tracker = Tracker(TrackingSection(tracking_uri=uri), run_dir, is_rank0=True)
    assert tracker.active
    tracker.log_artifact(run_dir / "note.txt")
    tracker.finish()
    parent = start_parent_run(uri, "grouped", "parent", {"a": 1})
    assert parent is not None

    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())
    logged = list((run_dir / "mlartifacts").rglob("note.txt"))
    assert len(logged) == 1 and Path(logged[0]).read_text() == "x"
