"""What every registry module shares: the registry's names and errors, and looking up models, versions and aliases.

The registry is split by concern: :mod:`.uris` (resolve a model URI to a folder), :mod:`.registration` (register a
merged model, all or nothing), :mod:`.aliases` (move aliases, record scores, with a written history) and
:mod:`.policy` (the champion gates of ``registry/policy.yaml``). :mod:`.registry` re-exports their public names.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

# Headline scores of an evaluate run (metric ``score/<key>``), percentage points on the 0-100 scale.
SCORE_KEYS = ("target_avg", "general_avg", "target_gain_pp", "general_delta_pp", "forget_pp")
SCORES_TAG = "arena.scores"  # one version tag: {"target_avg": 41.2, "forget_pp": 0.5, ...} (the newest evaluation)
SCORE_TAG = "arena.score."  # the tag prefix before issue 16 (arena.score.target_avg = "41.2"), still read
ALIAS_HISTORY_TAG = "arena.alias_history"
EVAL_HISTORY_TAG = "arena.eval_history"
CANDIDATE, CHAMPION = "candidate", "champion"
TAG_LIMIT = 8000  # MLflow's limit on a tag value
# A version promote is still registering is tagged "pending" (refused by the URI resolvers) until "complete".
PENDING_TAG = "arena.registration"
PROMOTE_RUN_TAG = "arena.promote_run"  # the promote run that registered a version
PREVIOUS_TAG_PREFIX = "arena.registration.previous."  # + alias: the version that held it before (to undo)


class RegistryError(ValueError):
    """A model URI, registered model, version or alias that does not exist, or a registry step that cannot run."""


class PolicyError(ValueError):
    """A promotion policy file that is missing or malformed."""


# ----------------------------------------------------------------------------------------------- names


def registered_name(base_short: str, domain: str) -> str:
    """The registered model for a (base, domain): ``registered_name("qwen2.5-7b", "math") == "qwen2.5-7b-math"``."""
    if not base_short or not domain:
        raise RegistryError(f"a registered name needs a base and a domain (got base={base_short!r}, domain={domain!r})")
    name = f"{base_short}-{domain}".lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-")


# ----------------------------------------------------------------------------------------------- look-ups


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def require_registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50)
                       if not m.name.startswith("arena-lock."))  # tracking/locks.py's server-side locks
        raise RegistryError(f"no registered model {name!r} in {tracking_uri()} "
                            f"(registered: {', '.join(names) or 'none'})") from None


def require_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    require_registered_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version} "
                            f"(latest: {latest_version(client, name)})") from None


def alias_holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def latest_version(client, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'", max_results=200)
    return str(max((int(v.version) for v in versions), default=0) or "none")


def now() -> str:
    """UTC now, as recorded in alias and evaluation histories."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fit_tag(value: str) -> str:
    """``value`` cut to MLflow's tag-value limit."""
    return value if len(value) <= TAG_LIMIT else value[: TAG_LIMIT - 1] + "…"

