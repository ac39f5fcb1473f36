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

from peft_arena.tracking.heartbeat import Heartbeat
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


class ResumeError(ValueError):
    """A ``--resume RUN_ID`` that names no run this stage can continue."""


def _check_resumable(client, run_id: str, stage: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ResumeError(f"cannot resume {run_id!r}: no such run in this tracking store") from None
    if run.info.lifecycle_stage == "deleted":
        raise ResumeError(f"cannot resume run {run_id}: it is deleted")
    if run.data.tags.get("arena.stage") != stage:
        raise ResumeError(f"cannot resume run {run_id} as {stage}: it is a run of stage "
                          f"{run.data.tags.get('arena.stage', '(none)')}")
    if run.info.status == "FINISHED":
        raise ResumeError(f"cannot resume run {run_id}: it already FINISHED (start a new run instead)")
    if run.info.status == "RUNNING":
        from peft_arena.tracking.heartbeat import HEARTBEAT_TAG, liveness

        alive, why = liveness(run.data.tags.get(HEARTBEAT_TAG))
        if alive:
            raise ResumeError(f"cannot resume run {run_id}: it is still running ({why})")
    return run


def _reopen(mlflow, old, launcher: str | None):
    """Reopen a dead or failed run. ``mlflow run -P resume=ID`` created a launcher run of its own; it keeps no
    training: it is renamed ``resume-of-<ID>`` and tagged ``arena.resumed_into`` (no ``arena.stage``, so the arena's
    searches skip it), and ``mlflow run`` ends it with the process's status. (It is not deleted: ``mlflow run``
    sets the status of its run at the end and fails on a deleted one.)"""
    client = mlflow.MlflowClient()
    run_id = old.info.run_id
    if launcher and launcher != run_id:
        client.set_tag(launcher, "arena.resumed_into", run_id)
        client.set_tag(launcher, "mlflow.runName", f"resume-of-{run_id}")
        client.set_tag(launcher, "mlflow.note.content",
                       f"Launcher of `mlflow run -P resume={run_id}`: the training went on in run {run_id}.")
    previous = old.data.tags.get(ERROR_TAG)
    if previous:  # the reason it stopped is kept, under another name; the run is no longer failed
        client.set_tag(run_id, "arena.resumed_after_error", previous[:8000])
        client.delete_tag(run_id, ERROR_TAG)
    return mlflow.start_run(run_id=run_id)


@contextmanager
def arena_run(stage: str, run_name: str | None = None, tags: dict | None = None,
              resume: str = "") -> Iterator[MlflowTracker]:
    """Resume (under ``mlflow run``) or start the stage's run; on error record the reason and end it FAILED.

    ``resume``: the id of an earlier run of this stage that did not finish (killed, failed): it is reopened and the
    stage goes on in it (``tracker.resuming``). A refused resume fails the run ``mlflow run`` created, if any.
    """
    import mlflow

    refused = None
    if resume:
        try:
            old = _check_resumable(mlflow.MlflowClient(), resume, stage)
        except ResumeError as exc:
            if not os.environ.get("MLFLOW_RUN_ID"):
                raise  # nothing was started: one line, nothing to clean up
            refused = exc
    if resume and refused is None:
        run = _reopen(mlflow, old, os.environ.pop("MLFLOW_RUN_ID", None))
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # resumes MLFLOW_RUN_ID and removes it from the environment
    else:
        run = mlflow.start_run(experiment_id=_experiment_id(mlflow), run_name=run_name or None)
    tracker = MlflowTracker(run.info.run_id)
    heartbeat = Heartbeat(run.info.run_id)  # a process that dies leaves a lease that runs out
    try:
        heartbeat.start()
        tracker.set_tags({"arena.stage": stage, **versions(), **(tags or {})})
        if run_name:
            tracker.set_tags({"mlflow.runName": run_name})
        if refused is not None:
            raise refused
        if resume:
            tracker.start_resume()
        yield tracker
    except BaseException as exc:
        heartbeat.stop()
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            tracker.set_tags({ERROR_TAG: reason})
            tracker.log_text("".join(traceback.format_exception(exc)), "error.txt")
        finally:
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        heartbeat.stop()
        mlflow.end_run("FINISHED")


@contextmanager
def side_run(stage: str, run_name: str, tags: dict | None = None) -> Iterator[MlflowTracker]:
    """A second, separate run next to the active one (e.g. the base model's evaluation that an evaluate
    stage needs and caches); it ends FINISHED, or FAILED with the reason, on its own."""
    import mlflow

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id if active else _experiment_id(mlflow)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"arena.stage": stage, **versions(), **(tags or {})})
    tracker = MlflowTracker(run.info.run_id)
    heartbeat = Heartbeat(run.info.run_id)
    try:
        heartbeat.start()
        yield tracker
    except BaseException as exc:
        heartbeat.stop()
        client.set_tag(run.info.run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:8000])
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    else:
        heartbeat.stop()
        client.set_terminated(run.info.run_id, "FINISHED")


@contextmanager
def launcher_run(stage: str) -> Iterator[str]:
    """The run of a multi-process training job, held by the process that launches the workers; yields its id.

    Takes the run ``mlflow run`` created (``MLFLOW_RUN_ID``) or creates one. Rank 0 of the launched job resumes
    it, logs into it and ends it. If the launcher raises (a bad config, a worker that died) while the run is still
    open, the run ends FAILED with the reason; a reason rank 0 already recorded is kept.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        run_id = client.create_run(_experiment_id(mlflow), tags={"arena.stage": stage, **versions()}).info.run_id
    try:
        yield run_id
    except BaseException as exc:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, ERROR_TAG, (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:8000])
            client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        client.set_tag(run_id, ERROR_TAG, f"the training processes exited without finishing the run ({status})")
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"the training processes exited but run {run_id} is {status}, not FINISHED")


def run_metrics(run_id: str) -> dict[str, float]:
    """Latest value of every metric of a run."""
    import mlflow

    return dict(mlflow.MlflowClient().get_run(run_id).data.metrics)


def run_tags(run_id: str) -> dict[str, str]:
    """Tags of a run (lineage lookups: what base a training run used)."""
    import mlflow

    return dict(mlflow.MlflowClient().get_run(run_id).data.tags)


def find_base_evaluation(base_short: str, eval_key: str) -> tuple[str, dict[str, float]] | None:
    """The newest finished evaluation of ``base_short`` with exactly these settings, as (run_id, metrics)."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(f"tags.`arena.stage` = 'evaluate' AND tags.`arena.is_base` = 'true' AND "
                       f"tags.`arena.base_model` = '{base_short}' AND tags.`arena.eval_key` = '{eval_key}' AND "
                       "attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    if not runs:
        return None
    return runs[0].info.run_id, dict(runs[0].data.metrics)
