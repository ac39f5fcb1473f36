"""``peft-arena doctor``: repair what dead processes left in the store, and prune local copies and caches.

1. **Dead runs**: a RUNNING run whose heartbeat says its process is gone (``tracking/heartbeat.py``) is ended
   FAILED at its last heartbeat, with the reason in ``arena.error``.
2. **Half registrations**: a registry version still ``arena.registration=pending`` whose promote run is no longer
   RUNNING is removed (aliases back on their previous holders, version and LoggedModel deleted).
3. **Disk** (``prune_outputs`` / ``prune_download_cache``), see their docstrings for the policy.

Steps 1 and 2 are cheap (two searches) and run at the start of every ``peft-arena`` stage command; the verb does
all three and prints what it did.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from peft_arena.tracking.heartbeat import HEARTBEAT_TAG, liveness
from peft_arena.tracking.runs import ERROR_TAG

KEEP_FAILED_DAYS = 7.0  # local outputs of FAILED/KILLED training runs (their checkpoints, for --resume)
CACHE_KEEP_DAYS = 14.0  # registry download cache entries unused for longer are removed
CACHE_MAX_GB = 50.0  # … and the least recently used go while the cache is larger than this
_RECENT_S = 3600  # a cache entry used within the last hour is never evicted (a stage may be reading it)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None
    if number < 0:
        raise ValueError(f"{name}={value!r} must be >= 0")
    return number


def end_dead_runs(exclude: set[str] = frozenset(), dry_run: bool = False) -> list[dict]:
    """End FAILED every RUNNING run (any experiment) whose heartbeat shows its process died. Runs without a
    heartbeat (started outside peft_arena, or before it had one) are reported, never touched."""
    import mlflow

    client = mlflow.MlflowClient()
    found = []
    for run in mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                                  output_format="list"):
        run_id = run.info.run_id
        if run_id in exclude:
            continue
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if beat is None:
            if run.data.tags.get("arena.stage"):
                found.append({"run_id": run_id, "action": "left", "stage": run.data.tags.get("arena.stage"),
                              "why": "RUNNING without a heartbeat (started by an older peft_arena?): cannot tell if "
                                     "it is alive; end it by hand if it is not"})
            continue
        alive, why = liveness(beat)
        if alive:
            continue
        reason = f"process died: {why} (ended by peft-arena doctor)"
        entry = {"run_id": run_id, "stage": run.data.tags.get("arena.stage"), "action": "ended FAILED", "why": reason}
        if not dry_run:
            fresh = client.get_run(run_id)
            if fresh.info.status != "RUNNING":  # ended meanwhile (by itself or another doctor)
                continue
            client.set_tag(run_id, ERROR_TAG, reason)
            end_ms = _beat_ms(beat) or int(time.time() * 1000)
            client.set_terminated(run_id, "FAILED", end_time=max(end_ms, fresh.info.start_time or 0))
            if entry["stage"] == "promote":
                entry["removed_logged_models"] = _remove_unregistered_models(client, run)
        found.append(entry)
    return found


def _remove_unregistered_models(client, run) -> list[str]:
    """The LoggedModels a dead promote run logged that no completely registered version uses (it was killed while
    logging the merged model, before registering it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from peft_arena.tracking.uris import model_id_of
    from peft_arena.tracking.versions import PENDING_TAG, PROMOTE_RUN_TAG

    used = {model_id_of(mv) for mv in client.search_model_versions(
        f"tags.`{PROMOTE_RUN_TAG}` = '{run.info.run_id}'") if mv.tags.get(PENDING_TAG) == "complete"}
    removed = []
    for logged in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                              filter_string=f"source_run_id = '{run.info.run_id}'"):
        if logged.model_id in used:
            continue
        try:
            client.delete_logged_model(logged.model_id)
            removed.append(logged.model_id)
        except MlflowException:
            pass
    return removed


def _beat_ms(beat: str) -> int | None:
    import json

    try:
        return int(float(json.loads(beat)["at"]) * 1000)
    except (ValueError, KeyError, TypeError):
        return None


def remove_half_registrations(dry_run: bool = False) -> list[dict]:
    """Remove registry versions left ``pending`` by a promote run that is not RUNNING any more."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from peft_arena.tracking.registration import undo_pending
    from peft_arena.tracking.versions import PENDING_TAG, PROMOTE_RUN_TAG

    client = mlflow.MlflowClient()
    done = []
    for mv in client.search_model_versions(f"tags.`{PENDING_TAG}` = 'pending'"):
        run_id = mv.tags.get(PROMOTE_RUN_TAG)
        try:
            status = client.get_run(run_id).info.status if run_id else "unknown"
        except MlflowException:
            status = "deleted"
        if status == "RUNNING":
            continue  # still registering (its heartbeat was judged alive above)
        why = f"left half-registered by promote run {run_id} ({status})"
        if dry_run:
            done.append({"name": mv.name, "version": str(mv.version), "removed": False, "why": why})
        else:
            done.append(undo_pending(mv.name, str(mv.version), why))
    return done


def sweep(exclude: set[str] = frozenset(), quiet: bool = False) -> dict:
    """The cheap part, run before every stage command: dead runs, then half registrations (in that order, so a
    promote killed just now is cleaned up at once). Prints one line per repair unless ``quiet``."""
    ended = [e for e in end_dead_runs(exclude) if e["action"] != "left"]
    removed = [e for e in remove_half_registrations() if e.get("removed")]
    if not quiet:
        for e in ended:
            print(f"[peft-arena] doctor: run {e['run_id']} ({e['stage']}) ended FAILED: {e['why']}", file=sys.stderr)
        for e in removed:
            print(f"[peft-arena] doctor: removed version {e['version']} of {e['name']!r}: {e['why']}", file=sys.stderr)
    return {"ended_runs": ended, "removed_versions": removed}


# ----------------------------------------------------------------------------------------------- disk


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):  # links (the cache's ready folders) are not followed
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def prune_outputs(outputs: str | Path = ".arena/outputs", dry_run: bool = False) -> list[dict]:
    """Remove local working copies ``<outputs>/<run_id>`` of training runs once they are not needed.

    Policy: a FINISHED run's folder goes at once (its adapter is logged to MLflow); a FAILED or KILLED run's folder
    (its checkpoints, for ``--resume``) goes when untouched for ``PEFT_ARENA_KEEP_FAILED_DAYS`` days (default 7);
    a RUNNING run's folder, and a folder whose run is not in this store, is never touched.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    root = Path(outputs)
    if not root.is_dir():
        return []
    keep_s = _env_float("PEFT_ARENA_KEEP_FAILED_DAYS", KEEP_FAILED_DAYS) * 86400
    client = mlflow.MlflowClient()
    done = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            status = client.get_run(folder.name).info.status
        except MlflowException:
            continue  # not a run of this store
        if status == "FINISHED":
            why = "run FINISHED: its adapter is in MLflow"
        elif status in ("FAILED", "KILLED") and time.time() - _newest_mtime(folder) > keep_s:
            why = f"run {status}, untouched for more than {keep_s / 86400:g} days"
        else:
            continue
        size = _size(folder)
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
        done.append({"path": str(folder), "bytes": size, "why": why})
    return done


def prune_download_cache(cache: str | Path | None = None, dry_run: bool = False) -> list[dict]:
    """Prune the registry download cache (``<PEFT_ARENA_CACHE>/registry/<model_id>``, one entry per LoggedModel).

    Policy: an entry unused (its folder's mtime, touched on every use) for ``PEFT_ARENA_CACHE_KEEP_DAYS`` days
    (default 14) goes; then the least recently used go while the cache holds more than ``PEFT_ARENA_CACHE_MAX_GB``
    GiB (default 50). An entry used within the last hour is never evicted. A removed entry is downloaded again
    when next needed (ids are unique, so an entry is never stale).
    """
    from peft_arena.tracking.uris import download_cache

    root = Path(cache) if cache else download_cache()
    if not root.is_dir():
        return []
    keep_s = _env_float("PEFT_ARENA_CACHE_KEEP_DAYS", CACHE_KEEP_DAYS) * 86400
    cap = _env_float("PEFT_ARENA_CACHE_MAX_GB", CACHE_MAX_GB) * 2**30
    now = time.time()
    entries = sorted(((p.stat().st_mtime, p) for p in root.iterdir() if p.is_dir()), key=lambda e: e[0])
    sizes = {p: _size(p) for _, p in entries}
    total = sum(sizes.values())
    done = []
    for used, path in entries:  # oldest first
        age = now - used
        if age > keep_s:
            why = f"unused for {age / 86400:.1f} days (keep {keep_s / 86400:g})"
        elif total > cap and age > _RECENT_S:
            why = f"cache {total / 2**30:.2f} GiB over its {cap / 2**30:g} GiB cap (least recently used)"
        else:
            continue
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        total -= sizes[path]
        done.append({"path": str(path), "bytes": sizes[path], "why": why})
    return done


def run_doctor(outputs: str | Path = ".arena/outputs", dry_run: bool = False) -> dict:
    """Everything the verb does, as a dict (what was found and what was done)."""
    ended = end_dead_runs(dry_run=dry_run)
    return {
        "dry_run": dry_run,
        "dead_runs": [e for e in ended if e["action"] != "left"],
        "unjudged_runs": [e for e in ended if e["action"] == "left"],
        "half_registrations": remove_half_registrations(dry_run=dry_run),
        "pruned_outputs": prune_outputs(outputs, dry_run=dry_run),
        "pruned_cache": prune_download_cache(dry_run=dry_run),
    }
