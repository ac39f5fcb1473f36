"""Aliases and scores on registry versions, each change written down on the version it concerns.

* :func:`move_alias` moves ``candidate``/``champion`` and records who, when, why and on which scores.
* :func:`record_scores` lists an evaluation on the version it evaluated; only a full evaluation's headline scores
  become the version's scores (provisional ones never do).
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import socket

from peft_arena.tracking.locks import store_lock
from peft_arena.tracking.versions import (ALIAS_HISTORY_TAG, EVAL_HISTORY_TAG, SCORE_KEYS, SCORE_TAG, SCORES_TAG,
                                          TAG_LIMIT, RegistryError, alias_holder, mlflow_client, now, require_version)



def default_actor() -> str:
    """Who moved an alias: ``user@host`` (stages append the run that did it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def move_alias(name: str, alias: str, version: str | int, reason: str, scores: dict[str, float] | None = None,
               actor: str | None = None) -> None:
    """Point ``alias`` at ``version`` and record the move on the versions involved.

    Both versions get an entry in ``arena.alias_history`` (who, when, why, on which scores) and a new
    description (:func:`describe_version`): the new holder a ``set`` entry, the previous holder a ``removed`` one.
    Runs under the store lock ``registry/<name>``: concurrent moves are serialised, so each records the holder it
    really replaced and no history entry is lost.
    """
    with store_lock(f"registry/{name}"):
        _move_alias(name, alias, version, reason, scores, actor)


def _move_alias(name: str, alias: str, version: str | int, reason: str, scores: dict[str, float] | None,
                actor: str | None) -> None:
    if not reason:
        raise RegistryError("an alias move needs a reason (it is recorded on the version)")
    client = mlflow_client()
    version = str(version)
    require_version(client, name, version)
    actor = actor or default_actor()
    at = now()
    scores = {k: float(v) for k, v in (scores or {}).items()}
    previous = alias_holder(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    if previous is not None and str(previous.version) != version:
        why = f"{alias} moved to version {version}: {reason}"
        _append_history(client, name, previous.version, ALIAS_HISTORY_TAG,
                        {"alias": alias, "action": "removed", "at": at, "by": actor, "why": why})
        describe_version(client, name, previous.version)
    _append_history(client, name, version, ALIAS_HISTORY_TAG,
                    {"alias": alias, "action": "set", "at": at, "by": actor, "why": reason,
                     **({"scores": scores} if scores else {}),
                     "replaced_version": None if previous is None else str(previous.version)})
    describe_version(client, name, version)


def record_decision(name: str, version: str | int, alias: str, promote: bool, reasons: list[str],
                    actor: str | None = None) -> None:
    """A policy decision that left the alias where it was, in the version's alias history (a promotion is recorded
    by :func:`move_alias`)."""
    if promote:
        return
    client = mlflow_client()
    _append_history(client, name, str(version), ALIAS_HISTORY_TAG,
                    {"alias": alias, "action": "kept", "at": now(), "by": actor or default_actor(),
                     "why": "; ".join(reasons)})
    describe_version(client, name, str(version))


def alias_history(name: str, version: str | int) -> list[dict]:
    """Every recorded alias move on a version, oldest first."""
    mv = require_version(mlflow_client(), name, str(version))
    return json.loads(mv.tags.get(ALIAS_HISTORY_TAG, "[]"))


def _under_registry_lock(fn):
    """Run ``fn(name, …)`` under the store lock ``registry/<name>``: MLflow's SQL store inserts a new version tag
    without an upsert, so two evaluations writing the same tag at once fail with a UNIQUE constraint error."""

    @functools.wraps(fn)
    def locked(name: str, *args, **kwargs):
        with store_lock(f"registry/{name}"):
            return fn(name, *args, **kwargs)

    return locked


@_under_registry_lock
def record_scores(name: str, version: str | int, scores: dict[str, float], eval_run_id: str,
                  eval_key: str | None = None, *, provenance: str, detail: dict[str, str] | None = None) -> None:
    """Record an evaluation of the version it evaluated; only a full evaluation's scores become the version's scores.

    ``provenance`` is the evaluation's ``arena.provenance`` (``full`` or ``provisional``); ``detail`` the
    per-benchmark provenance. A ``full`` evaluation writes its headline scores as the ``arena.scores`` JSON tag
    (with ``arena.score_provenance=full`` and ``arena.eval_key``; the run is in the history): the latest full
    evaluation's scores are the version's scores. A provisional evaluation writes no score tag (sample or
    subset numbers are never a version's scores); it is only listed, like every evaluation, in
    ``arena.eval_history`` with its provenance. ``scores`` keys may carry the metric prefix (``score/``) or not.
    """
    if provenance not in ("full", "provisional"):
        raise RegistryError(f"provenance must be 'full' or 'provisional', not {provenance!r}")
    client = mlflow_client()
    version = str(version)
    require_version(client, name, version)
    clean = {k.removeprefix("score/"): float(v) for k, v in scores.items()}
    unknown = set(clean) - set(SCORE_KEYS)
    if unknown:
        raise RegistryError(f"unknown score keys {sorted(unknown)}; record_scores takes {', '.join(SCORE_KEYS)}")
    at = now()
    if provenance == "full":
        stale = [k for k in client.get_model_version(name, version).tags if k.startswith(SCORE_TAG)]
        for key in stale:  # the per-key tags of before issue 16: arena.scores replaces them
            client.delete_model_version_tag(name, version, key)
        client.set_model_version_tag(name, version, SCORES_TAG,
                                     json.dumps({k: round(clean[k], 4) for k in SCORE_KEYS if k in clean}))
        client.set_model_version_tag(name, version, "arena.score_provenance", "full")
        if eval_key:
            client.set_model_version_tag(name, version, "arena.eval_key", eval_key)
    entry = {"run": eval_run_id, "at": at, "eval_key": eval_key, "provenance": provenance, "scores": clean}
    if detail and provenance != "full":
        entry["detail"] = {b: p for b, p in detail.items() if p != "full"}
    _append_history(client, name, version, EVAL_HISTORY_TAG, entry)
    describe_version(client, name, version)


def eval_history(tags: dict[str, str]) -> list[dict]:
    """Every evaluation :func:`record_scores` listed on a version (from its tags), oldest first."""
    return json.loads(tags.get(EVAL_HISTORY_TAG, "[]"))


def version_scores(tags: dict[str, str]) -> dict[str, float]:
    """The scores :func:`record_scores` wrote, read back from a version's tags (``arena.scores``; a version scored
    before issue 16 has ``arena.score.<key>`` tags instead, read as such)."""
    if SCORES_TAG in tags:
        return {k: float(v) for k, v in json.loads(tags[SCORES_TAG]).items()}
    return {k[len(SCORE_TAG):]: float(v) for k, v in tags.items() if k.startswith(SCORE_TAG)}


def describe_version(client, name: str, version: str) -> None:
    """The version's description: what it is, its newest scores, and its alias and evaluation history."""
    mv = client.get_model_version(name, version)
    t = mv.tags
    lines = [f"**{t.get('arena.train', '?').upper()} {t.get('arena.method', '?')} {t.get('arena.method_label', '')}** "
             f"on {t.get('arena.base_model', '?')} ({t.get('arena.domain', '?')}), merged from training run "
             f"`{t.get('arena.source_run', '?')}` by promote run `{t.get('arena.promote_run', '?')}`."]
    scores = version_scores(t)
    if scores:
        lines.append("Scores (%, pp; newest full evaluation): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    aliases = json.loads(t.get(ALIAS_HISTORY_TAG, "[]"))
    if aliases:
        lines.append("| when | alias | action | by | why |\n|---|---|---|---|---|\n" + "\n".join(
            f"| {e.get('at', '')} | {e.get('alias', '')} | {e.get('action', '')} | {e.get('by', '')} | "
            f"{str(e.get('why', '')).replace('|', '/')} |" for e in aliases))
    evals = json.loads(t.get(EVAL_HISTORY_TAG, "[]"))
    if evals:
        lines.append("Evaluations: " + ", ".join(f"run `{e.get('run')}` ({e.get('provenance', '?')}, {e.get('at', '')})"
                                                 for e in evals[-5:]))
    client.update_model_version(name, version, description="\n\n".join(lines)[:TAG_LIMIT])


def _append_history(client, name: str, version: str, tag: str, entry: dict) -> None:
    with store_lock(f"registry/{name}"):  # read-modify-write of one tag: a concurrent append must not be lost
        _append_history_locked(client, name, version, tag, entry)


def _append_history_locked(client, name: str, version: str, tag: str, entry: dict) -> None:
    mv = client.get_model_version(name, version)
    history = json.loads(mv.tags.get(tag, "[]"))
    history.append(entry)
    text = json.dumps(history)
    while len(text) > TAG_LIMIT and len(history) > 1:  # keep the newest entries within MLflow's tag limit
        history.pop(0)
        text = json.dumps(history)
    client.set_model_version_tag(name, version, tag, text)


