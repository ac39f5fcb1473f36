"""One MLflow run per stage: resume the run ``mlflow run`` created, tag it, end it FAILED with the reason.

``mlflow run`` creates the run in the parent process and hands its id over as ``MLFLOW_RUN_ID``. The entry point
resumes it once, at the top, and keeps it open; the HF ``MLflowCallback`` then logs into the same run instead of
starting its own (DESIGN.md, MLflow conventions).
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from peft_arena.tracking.tracker import MlflowTracker

DEFAULT_EXPERIMENT = "peft-arena"
ERROR_TAG = "arena.error"


def versions() -> dict[str, str]:
    """Lineage tags: the versions of the libraries that decide what a run computed."""
    out = {}
    for dist in ("torch", "transformers", "peft", "trl", "mlflow", "peft-arena"):
        try:
            out[f"arena.version.{dist.replace('-', '_')}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "peft-arena":
                from peft_arena import __version__

                out["arena.version.peft_arena"] = __version__
    return out


def _experiment_id(mlflow) -> str | None:
    """The experiment a new run goes to: MLFLOW_EXPERIMENT_ID/NAME, else ``peft-arena``.

    For a sqlite store the artifacts are pinned next to the database file, so that a store moved or opened
    from another working directory keeps its artifacts.
    """
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def arena_run(stage: str, run_name: str | None = None, tags: dict | None = None) -> Iterator[MlflowTracker]:
    """Resume (under ``mlflow run``) or start the stage's run; on error record the reason and end it FAILED."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # resumes MLFLOW_RUN_ID and removes it from the environment
    else:
        run = mlflow.start_run(experiment_id=_experiment_id(mlflow), run_name=run_name or None)
    tracker = MlflowTracker(run.info.run_id)
    tracker.set_tags({"arena.stage": stage, **versions(), **(tags or {})})
    if run_name:
        tracker.set_tags({"mlflow.runName": run_name})
    try:
        yield tracker
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            tracker.set_tags({ERROR_TAG: reason})
            tracker.log_text("".join(traceback.format_exception(exc)), "error.txt")
        finally:
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
