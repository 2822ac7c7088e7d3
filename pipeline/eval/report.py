"""Writing results: JSON, markdown, and MLflow (best effort: a dead server never kills a run)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from pipeline.paths import REPO_ROOT

log = logging.getLogger(__name__)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(results: dict[str, Any], out_dir: str | Path, stem: str, markdown: str) -> list[Path]:
    """`<out>/<stem>.json` (with provenance) and `<out>/<stem>.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "git_revision": git_revision()}
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(results, indent=1) + "\n")
    md.write_text(markdown)
    return [js, md]


def log_mlflow(metrics: list[tuple[str, float, int | None]], artifacts: list[Path], *,
               run_id: str | None = None, experiment: str | None = None,
               params: dict[str, Any] | None = None) -> str | None:
    """Log `(key, value, step)` metrics and files to an existing run (`run_id`) or a new run
    in `experiment`; tracking URI from MLFLOW_TRACKING_URI. Returns the run id, None on failure."""
    if run_id is None and experiment is None:
        return None
    try:
        import mlflow

        if run_id is None:
            mlflow.set_experiment(experiment)
        with mlflow.start_run(run_id=run_id) as run:
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            for key, value, step in metrics:
                if value == value:  # skip NaN
                    mlflow.log_metric(key, float(value), step=step or 0)
            for path in artifacts:
                mlflow.log_artifact(str(path), artifact_path="eval")
            return run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking must never kill an evaluation
        log.warning("MLflow logging failed (%s); results are in the JSON files", e)
        return None
