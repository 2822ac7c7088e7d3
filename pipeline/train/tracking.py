"""MLflow tracking from rank 0 that never kills a run.

A tracking server that is down at start, or goes down mid-run, costs a warning:
the first failed call switches tracking off and training carries on. Every step's
metrics also go to `metrics.jsonl` in the run directory, so nothing depends on
the server to be read back.

MLflow gets every step's values too, sent in batches (`flush_every` steps, every
validation, every checkpoint, at least every 30 s, and at the end): one call per
step cost ~5 ms against a local sqlite store, a tenth of a tiny model's step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import flatten
from pipeline.train.config import TrackingSection

log = logging.getLogger(__name__)
# Read once: mlflow.set_tracking_uri() writes this variable, and a later run in the same
# process (the default recipe's second stage) must not inherit the first run's store.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def _flatten(tree: dict[str, Any]) -> dict[str, str]:
    """Dotted keys and string values, as MLflow params take them."""
    return {key: str(value)[:6000] for key, value in flatten(tree).items()}  # MLflow's limit on a param value


def store_problem(uri: str) -> str | None:
    """Why a local sqlite store cannot be written (None if it can, or the URI is not sqlite).

    MLflow retries a sqlite store it cannot open for ~100 s before giving up; a file check
    here turns tracking off at once instead, as `MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` does for
    a server."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db, "ab"):  # sqlite treats a new, empty file as an empty database
            pass
    except OSError as exc:
        return f"the sqlite store {db} is not writable ({exc.strerror or exc})"
    return None


def _ensure_experiment(client, uri: str, name: str) -> str:
    """The experiment's id, creating it if needed. In a local sqlite store, artifacts go
    beside the database: MLflow's default for a database store is `./mlruns` of whatever
    the working directory is (the checkout, or the code directory of a container image)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


class Tracker:
    """Rank-0 metrics: always `metrics.jsonl`, and MLflow while it answers."""

    FLUSH_SECONDS = 30.0
    BATCH = 1000  # MLflow's limit on metrics per log_batch call

    def __init__(self, cfg: TrackingSection, run_dir: Path, *, is_rank0: bool, flush_every: int = 1):
        self.is_rank0 = is_rank0
        self.active = False
        self.uri = ""
        self.metrics_file = run_dir / "metrics.jsonl"
        self.flush_every = max(1, flush_every)
        self._pending: list = []  # mlflow.entities.Metric rows not sent yet
        self._last_flush = time.monotonic()
        if not (is_rank0 and cfg.enabled):
            return
        # Fail fast instead of MLflow's default minutes of retries against a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        uri = cfg.tracking_uri or _ENV_TRACKING_URI or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.uri = uri
        problem = store_problem(uri)
        if problem:
            log.warning("MLflow tracking is off: %s; training continues without it (metrics.jsonl has "
                        "every step)", problem)
            return
        try:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(uri)
            _ensure_experiment(mlflow.tracking.MlflowClient(uri), uri, cfg.experiment)
            mlflow.set_experiment(cfg.experiment)
            tags = {"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else None
            self.run = mlflow.start_run(run_name=cfg.run_name or None, tags=tags)
            self._client = mlflow.tracking.MlflowClient(uri)
            self.active = True
            log.info("MLflow run %s at %s", self.run.info.run_id, uri)
        except Exception as exc:  # noqa: BLE001 - any failure of the tracking server
            log.warning("MLflow tracking at %s is unavailable (%s); training continues without it", uri, exc)

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.active = False
            log.warning("MLflow %s failed (%s); tracking is off for the rest of the run", what, exc)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.active else None

    def log_params(self, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        self._call("log_params", lambda: [self._mlflow.log_params(dict(list(flat.items())[i : i + 100]))
                                          for i in range(0, len(flat), 100)])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_rank0:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if (step % self.flush_every == 0 or "val_loss" in metrics
                or time.monotonic() - self._last_flush >= self.FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Send the buffered metric rows to MLflow."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if not (self.active and pending):
            return
        run_id = self.run.info.run_id
        self._call("log_metrics", lambda: [self._client.log_batch(run_id, metrics=pending[i : i + self.BATCH])
                                           for i in range(0, len(pending), self.BATCH)])

    def drop_rows_after(self, step: int) -> int:
        """Remove the metrics.jsonl rows of steps after `step` (a resumed run replays them,
        and would otherwise log each twice); the number of rows dropped."""
        if not (self.is_rank0 and self.metrics_file.is_file()):
            return 0
        lines = [line for line in self.metrics_file.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a row torn by the kill: dropped with the replayed ones
        if len(kept) < len(lines):
            tmp = self.metrics_file.with_name(self.metrics_file.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_file)
            log.info("%s: dropped %d rows after step %d (replayed on resume)", self.metrics_file,
                     len(lines) - len(kept), step)
        return len(lines) - len(kept)

    def log_artifact(self, path: Path) -> None:
        if path.exists():
            self._call("log_artifact", self._mlflow.log_artifact if self.active else None, str(path))

    def finish(self) -> None:
        self.flush()
        self._call("end_run", self._mlflow.end_run if self.active else None)


def start_parent_run(uri: str, experiment: str, name: str, params: dict[str, Any]) -> str | None:
    """Create a run that groups a recipe's stage runs (they name it as `tracking.parent_run_id`);
    its id, or None (with a warning) when tracking is unavailable."""
    problem = store_problem(uri)
    if problem:
        log.warning("MLflow parent run not created: %s; stages log on their own", problem)
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp_id = _ensure_experiment(client, uri, experiment)
        run = client.create_run(exp_id, run_name=name)
        flat = _flatten(params)
        for key, value in flat.items():
            client.log_param(run.info.run_id, key, value)
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow at %s is unavailable for the parent run (%s); stages log on their own", uri, exc)
        return None


def finish_run(uri: str, run_id: str | None, metrics: dict[str, float] | None = None,
               paths: list[Path] = ()) -> None:
    """Log final metrics and files to a run created by `start_parent_run`, and close it."""
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, value)
        for path in paths:
            if Path(path).exists():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not finish MLflow run %s (%s)", run_id, exc)


def log_artifacts_to_run(uri: str, run_id: str | None, paths: list[Path]) -> None:
    """Add files to a finished run (e.g. the recipe's evaluation summary); a warning if that fails."""
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in paths:
            if Path(path).exists():
                client.log_artifact(run_id, str(path))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not add artifacts to MLflow run %s (%s)", run_id, exc)


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """Training and validation loss vs step, from metrics.jsonl."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    curves = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "val_loss")}
    return plot_curves(curves, png, ylabel="loss", styles={"loss": "-"})


def plot_curves(curves: dict[str, list[tuple[float, float]]], png: Path, *, ylabel: str,
                styles: dict[str, str] | None = None) -> Path:
    """One line per named (step, value) series against step (Agg backend, no display);
    style "o-" unless `styles` names another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), (styles or {}).get(name, "o-"), label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
