"""Thin helpers over ``mlflow.search_runs`` for the arena: pick experiments, filter by the ``arena.*`` tags.

Everything here returns what ``mlflow.search_runs`` returns (a pandas DataFrame with ``tags.*``, ``metrics.*``,
``params.*`` columns), so a user can reproduce any table of the report with one ``search_runs`` call.
"""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TRAIN_STAGES = ("train_sft", "train_grpo")
# filter keyword -> the run tag it matches
TAG_FILTERS = {"domain": "arena.domain", "base": "arena.base_model", "train": "arena.train", "method": "arena.method"}


class SearchError(ValueError):
    """An experiment or run that does not exist, or a filter that cannot be expressed."""


@contextmanager
def using_tracking_uri(tracking_uri: str | None) -> Iterator[None]:
    """Point the fluent MLflow API at ``tracking_uri`` for the block (None: leave it as it is)."""
    import mlflow

    if not tracking_uri:
        yield
        return
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def filter_string(stage: str | Iterable[str] | None = None, *, domain: str | None = None, base: str | None = None,
                  train: str | None = None, method: str | None = None, extra: str | None = None) -> str:
    """An MLflow filter (``AND`` of tag equalities) for one arena stage and the leaderboard's filters.

    One stage per filter: MLflow filters have no ``OR``, so :func:`arena_runs` searches several stages one by one.
    """
    clauses = []
    if stage:
        if not isinstance(stage, str):
            raise SearchError("filter_string takes one stage; search stages one by one (MLflow filters have no OR)")
        clauses.append(f"tags.`arena.stage` = {_quote(stage)}")
    for key, value in {"domain": domain, "base": base, "train": train, "method": method}.items():
        if value:
            clauses.append(f"tags.`{TAG_FILTERS[key]}` = {_quote(value)}")
    if extra:
        clauses.append(extra)
    return " AND ".join(clauses)


def experiment_ids(experiment_names: Iterable[str] | str | None = None) -> list[str] | None:
    """Ids of the named experiments (comma lists allowed); None means every experiment. Unknown names raise."""
    import mlflow

    if not experiment_names:
        return None
    names = [n.strip() for n in (experiment_names.split(",") if isinstance(experiment_names, str)
                                 else experiment_names) if n and n.strip()]
    if not names:
        return None
    ids, missing = [], []
    for name in names:
        exp = mlflow.get_experiment_by_name(name)
        (ids.append(exp.experiment_id) if exp is not None else missing.append(name))
    if missing:
        known = ", ".join(e.name for e in mlflow.search_experiments(max_results=50)) or "none"
        raise SearchError(f"no experiment named {', '.join(missing)} in {mlflow.get_tracking_uri()} (known: {known})")
    return ids


def arena_runs(stage: str | Iterable[str] | None = None, experiment_names: Iterable[str] | str | None = None, *,
               domain: str | None = None, base: str | None = None, train: str | None = None,
               method: str | None = None, extra: str | None = None, status: str | None = "FINISHED",
               tracking_uri: str | None = None):
    """``mlflow.search_runs`` over the arena's runs of one or several stages, newest first.

    ``status="FINISHED"`` leaves failed and running runs out (None keeps all). Several stages are searched one by
    one and concatenated (MLflow filters have no OR).
    """
    import mlflow
    import pandas as pd

    stages = [stage] if isinstance(stage, str) or stage is None else list(stage)
    with using_tracking_uri(tracking_uri):
        ids = experiment_ids(experiment_names)
        frames = []
        for one in stages:
            where = filter_string(one, domain=domain, base=base, train=train, method=method, extra=extra)
            if status:
                where = " AND ".join(filter(None, [where, f"attributes.status = {_quote(status)}"]))
            frames.append(mlflow.search_runs(experiment_ids=ids, search_all_experiments=ids is None,
                                             filter_string=where, order_by=["attributes.start_time DESC"]))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "experiment_id", "status", "start_time"])
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.sort_values("start_time", ascending=False, ignore_index=True)


def runs_by_id(run_ids: Iterable[str], tracking_uri: str | None = None):
    """``search_runs`` rows of the given run ids (any experiment), in chunks MLflow accepts."""
    import mlflow
    import pandas as pd

    ids = sorted({r for r in run_ids if r})
    frames = []
    with using_tracking_uri(tracking_uri):
        for i in range(0, len(ids), 100):
            chunk = ", ".join(_quote(r) for r in ids[i:i + 100])
            frames.append(mlflow.search_runs(search_all_experiments=True,
                                             filter_string=f"attributes.run_id IN ({chunk})"))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])


@dataclass
class ArenaRun:
    run_id: str
    experiment_id: str
    status: str
    name: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]


_RUN_REF = re.compile(r"^(?:runs:/)?(?P<run_id>[0-9a-f]{32})(?:/(?P<path>.*))?$")


def parse_run_ref(ref: str) -> tuple[str, str | None]:
    """``"runs:/ID/adapter"`` or a bare run id → ``(run_id, artifact path or None)``."""
    m = _RUN_REF.match(ref.strip())
    if not m:
        raise SearchError(f"{ref!r} is not a run id or runs:/RUN_ID/path URI")
    return m["run_id"], (m["path"] or "").strip("/") or None


def get_run(ref: str) -> ArenaRun:
    """One run by id or ``runs:/`` URI; a clear error if the store has no such run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id, _ = parse_run_ref(ref)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise SearchError(f"no run {run_id} in {mlflow.get_tracking_uri()}; check MLFLOW_TRACKING_URI") from None
    return ArenaRun(run.info.run_id, run.info.experiment_id, run.info.status, run.info.run_name or "",
                    dict(run.data.tags), dict(run.data.metrics), dict(run.data.params))


def download_run_artifacts(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download a run's artifact folder to ``dst`` (created); a clear error if the run did not log it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise SearchError(f"run {run_id} has no artifact {artifact_path!r} ({exc})") from None


def download_latest_artifacts(df, artifact_path: str, dst: str | Path,
                              key: str = "tags.arena.source_run") -> dict[str, Path]:
    """For each distinct ``key`` of a search_runs frame (newest first), download the newest run's artifact folder
    under ``dst``. Returns ``{key value: local folder}``; runs that did not log the artifact are skipped."""
    out: dict[str, Path] = {}
    root = Path(dst)
    for _, row in df.iterrows():
        value = row.get(key)
        if not isinstance(value, str) or value in out:
            continue
        try:
            out[value] = download_run_artifacts(row["run_id"], artifact_path, root / row["run_id"])
        except SearchError:
            shutil.rmtree(root / row["run_id"], ignore_errors=True)
    return out


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged point of one metric of a run, by step (the newest value per step)."""
    import mlflow

    points: dict[int, tuple[int, float]] = {}
    for m in mlflow.MlflowClient().get_metric_history(run_id, key):
        if m.step not in points or m.timestamp >= points[m.step][0]:
            points[m.step] = (m.timestamp, m.value)
    return [(step, value) for step, (_, value) in sorted(points.items())]
