"""MLflow side of an arena sweep: child runs under the parent, finished runs to reuse, runs a dead process left.

A sweep's stage runs are children of its parent run (``mlflow.parentRunId``, so the MLflow UI nests them) and
carry ``arena.sweep.parent``, ``arena.sweep.chain`` (``sft-lora-math``) and ``arena.sweep.config_hash`` (the
hash of everything that decides what the stage computes, see :mod:`peft_arena.sweep.plan`).
"""

from __future__ import annotations

import os

PARENT_TAG = "arena.sweep.parent"
CHAIN_TAG = "arena.sweep.chain"
HASH_TAG = "arena.sweep.config_hash"


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def experiment_of(run_id: str) -> str:
    return _client().get_run(run_id).info.experiment_id


def current_experiment_id(create: bool = False) -> str | None:
    """The experiment new runs go to (MLFLOW_EXPERIMENT_ID/NAME, else ``peft-arena``); None when it does not exist
    yet and ``create`` is False (a dry run creates nothing)."""
    import mlflow

    from peft_arena.tracking.runs import DEFAULT_EXPERIMENT, _experiment_id

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    if create:
        return _experiment_id(mlflow)
    exp = mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    return exp.experiment_id if exp is not None else None


def experiment_name(experiment_id: str) -> str:
    return _client().get_experiment(experiment_id).name


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_finished(stage: str, config_hash: str, experiment_id: str | None,
                  source_run: str | None = None) -> dict | None:
    """The newest FINISHED run of ``stage`` with this config hash (and about ``source_run``, when given):
    ``{"run_id", "tags"}``, or None."""
    if experiment_id is None:
        return None
    where = [f"tags.`arena.stage` = {_quote(stage)}", f"tags.`{HASH_TAG}` = {_quote(config_hash)}",
             "attributes.status = 'FINISHED'"]
    if source_run:
        where.append(f"tags.`arena.source_run` = {_quote(source_run)}")
    runs = _client().search_runs([experiment_id], " AND ".join(where), order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "tags": dict(runs[0].data.tags)}


def last_failure(stage: str, config_hash: str, experiment_id: str | None) -> dict | None:
    """The newest FAILED/KILLED run of ``stage`` with this config hash (what a re-run retries), or None."""
    if experiment_id is None:
        return None
    runs = _client().search_runs(
        [experiment_id], f"tags.`arena.stage` = {_quote(stage)} AND tags.`{HASH_TAG}` = {_quote(config_hash)} "
                         "AND attributes.status != 'FINISHED' AND attributes.status != 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "error": runs[0].data.tags.get("arena.error", runs[0].info.status)}


def create_child_run(parent_run_id: str, experiment_id: str, stage: str, chain: str, config_hash: str) -> str:
    """A new run nested under the sweep's parent run, for a stage process to resume (``MLFLOW_RUN_ID``)."""
    import json
    import time

    from peft_arena.tracking.heartbeat import HEARTBEAT_TAG, identity, interval_s
    from peft_arena.tracking.runs import versions

    # the creating process's lease until the stage resumes the run and beats itself: `doctor` leaves it alone
    lease = json.dumps({**identity(), "at": round(time.time(), 3), "every": interval_s()})
    run = _client().create_run(experiment_id, tags={
        "mlflow.parentRunId": parent_run_id, PARENT_TAG: parent_run_id, CHAIN_TAG: chain, HASH_TAG: config_hash,
        "arena.stage": stage, HEARTBEAT_TAG: lease, **versions()})
    return run.info.run_id


def fail_running_children(parent_run_id: str, chain: str, reason: str) -> list[str]:
    """End FAILED (reason in ``arena.error``) the runs of one chain that its dead process left RUNNING."""
    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)} AND tags.`{CHAIN_TAG}` = {_quote(chain)} "
                              "AND attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "arena.error", reason[:8000])
        client.set_terminated(run.info.run_id, "FAILED")
    return [r.info.run_id for r in runs]


def children(parent_run_id: str) -> list[dict]:
    """The parent's child runs: ``{"run_id", "status", "stage", "chain", "error"}``, oldest first."""
    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = {_quote(parent_run_id)}",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return [{"run_id": r.info.run_id, "status": r.info.status, "stage": r.data.tags.get("arena.stage"),
             "chain": r.data.tags.get(CHAIN_TAG), "error": r.data.tags.get("arena.error")} for r in runs]
