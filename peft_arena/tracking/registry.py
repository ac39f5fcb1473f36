"""The model registry: one registered model per (base, domain), aliases moved with a written record, URIs resolved.

* :func:`register_merged_model` logs a merged HF folder as an MLflow model and registers it; on any failure it
  deletes what it created, so nothing half-registered is left behind.
* :func:`move_alias` moves ``candidate``/``champion`` and records who, when, why and on which scores on the version.
* :func:`record_scores` writes an evaluation's headline scores onto the version it evaluated.
* :func:`load_policy` / :func:`evaluate_policy` / :func:`apply_policy`: the declarative gates of ``registry/policy.yaml``
  that decide whether a version may become ``champion``.
* :func:`resolve_model_uri` turns ``models:/NAME@ALIAS``, ``models:/NAME/N``, ``models:/<model_id>``, ``runs:/ID/path``,
  a local folder or a hub id into a folder ``from_pretrained`` takes, and says exactly which version it was.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Headline scores of an evaluate run (metric ``score/<key>``), percentage points on the 0-100 scale.
SCORE_KEYS = ("target_avg", "general_avg", "target_gain_pp", "general_delta_pp", "forget_pp")
SCORE_TAG = "arena.score."  # version tag prefix: arena.score.target_avg = "41.2"
ALIAS_HISTORY_TAG = "arena.alias_history"
EVAL_HISTORY_TAG = "arena.eval_history"
CANDIDATE, CHAMPION = "candidate", "champion"
_TAG_LIMIT = 8000  # MLflow's limit on a tag value
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


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


# ----------------------------------------------------------------------------------------------- resolving URIs


@dataclass
class ResolvedModel:
    local_path: str  # folder for from_pretrained (HF model or trained-adapter folder), or a hub id passed through
    registered_model: str | None = None
    version: str | None = None
    alias: str | None = None  # the alias the URI named, if any
    source_run: str | None = None  # the training run the model came from, where known
    model_id: str | None = None  # MLflow LoggedModel id (m-…)
    tags: dict[str, str] = field(default_factory=dict)  # version tags (registry) or run tags (runs:/)
    uri: str = ""  # what was asked for

    @property
    def version_uri(self) -> str | None:
        """The exact version, whatever alias was asked for: ``models:/NAME/N``."""
        return f"models:/{self.registered_model}/{self.version}" if self.registered_model else None


_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[\w-]+)/?$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_MODELS_ID = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)(?:/(?P<path>.*))?$")


def resolve_model_uri(uri: str) -> ResolvedModel:
    """Resolve what ``evaluate``/``spectral`` were asked to load and download it if it lives in MLflow.

    ``models:/NAME@ALIAS`` and ``models:/NAME/N`` resolve to one version (recorded in the result); the merged
    model is downloaded once per LoggedModel into the cache (models in a local artifact store are used in place).
    A local folder is used as is; anything else of the form ``org/name`` is a hub id, passed through.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    if m := _MODELS_ALIAS.match(uri):
        name, alias = m["name"], m["alias"]
        _require_registered_model(client, name)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            known = ", ".join(sorted(client.get_registered_model(name).aliases)) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (its aliases: {known})") from None
        return _resolved_version(client, mv, uri, alias)
    if m := _MODELS_VERSION.match(uri):
        name, version = m["name"], m["version"]
        _require_registered_model(client, name)
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"registered model {name!r} has no version {version} "
                                f"(latest: {_latest_version(client, name)})") from None
        return _resolved_version(client, mv, uri, None)
    if m := _MODELS_ID.match(uri):
        try:
            logged = client.get_logged_model(m["model_id"])
        except MlflowException:
            raise RegistryError(f"no logged model {m['model_id']!r} in {_tracking_uri()}") from None
        return ResolvedModel(str(_hf_folder(client, logged)), model_id=logged.model_id,
                             source_run=logged.tags.get("arena.source_run") or logged.source_run_id,
                             tags=dict(logged.tags), uri=uri)
    if m := _RUNS.match(uri):
        import mlflow

        run_id, path = m["run_id"], (m["path"] or "").strip("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"no run {run_id!r} in {_tracking_uri()}") from None
        dst = Path(tempfile.mkdtemp(prefix=f"arena-run-{run_id[:8]}-"))
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path or None, dst_path=str(dst))
        except (MlflowException, OSError) as exc:
            shutil.rmtree(dst, ignore_errors=True)
            raise RegistryError(f"run {run_id} has no artifact {path!r}: {exc}") from None
        tags = dict(run.data.tags)
        # runs:/ID/adapter of a training run is about that run; a promote run points at its own source.
        source = run_id if tags.get("arena.stage", "").startswith("train_") else tags.get("arena.source_run", run_id)
        return ResolvedModel(local, source_run=source, tags=tags, uri=uri)
    if uri.startswith(("models:/", "runs:/")):
        raise RegistryError(f"cannot parse {uri!r}: use models:/NAME@ALIAS, models:/NAME/N, models:/m-ID or runs:/ID/path")
    path = Path(uri).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RegistryError(f"{uri} is a file; give the model folder")
        return ResolvedModel(str(path.resolve()), uri=uri)
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        return ResolvedModel(uri, uri=uri)  # hub id: from_pretrained fetches (or fails offline with the hub's error)
    raise RegistryError(f"{uri!r} is neither an MLflow model URI, an existing folder, nor a hub id (org/name)")


def _resolved_version(client, mv, uri: str, alias: str | None) -> ResolvedModel:
    model_id = _model_id_of(mv)
    if model_id:
        local = _hf_folder(client, client.get_logged_model(model_id))
    else:  # versions registered from runs:/ sources (not by promote) carry no LoggedModel
        import mlflow

        # name/version are not unique across stores, so this layout is rebuilt each time instead of cached
        local = _hf_layout(Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source)),
                           Path(tempfile.mkdtemp(prefix=f"arena-{mv.name}-v{mv.version}-")))
    return ResolvedModel(str(local), registered_model=mv.name, version=str(mv.version), alias=alias,
                         source_run=mv.tags.get("arena.source_run"), model_id=model_id, tags=dict(mv.tags), uri=uri)


def lookup_version(uri: str):
    """The ``ModelVersion`` that ``models:/NAME/N`` or ``models:/NAME@ALIAS`` names, without downloading it."""
    from mlflow.exceptions import MlflowException

    client = _client()
    if m := _MODELS_ALIAS.match(uri):
        _require_registered_model(client, m["name"])
        try:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        except MlflowException:
            raise RegistryError(f"registered model {m['name']!r} has no alias {m['alias']!r}") from None
    if m := _MODELS_VERSION.match(uri):
        return _require_version(client, m["name"], m["version"])
    raise RegistryError(f"{uri!r} names no registry version: use models:/NAME/N or models:/NAME@ALIAS")


def _model_id_of(mv) -> str | None:
    # The OSS SQL registry does not persist ModelVersion.model_id; the source "models:/m-…" carries it.
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = _MODELS_ID.match(mv.source or "")
    return m["model_id"] if m else None


def _download_cache() -> Path:
    from peft_arena.models import cache_dir

    return cache_dir() / "registry"


def _hf_folder(client, logged) -> Path:
    """A folder with the model's weights, config and tokenizer side by side, ready for ``from_pretrained``.

    The transformers flavor stores weights under ``model/`` and the tokenizer under ``components/tokenizer/``;
    the ready folder links both (no copy). A local artifact store is read in place; a remote one is downloaded
    once per LoggedModel (ids are unique, so the cache never goes stale).
    """
    import mlflow

    ready = _download_cache() / logged.model_id
    if (ready / "hf" / "config.json").exists():  # exists() follows the links: False when the store moved
        return ready / "hf"
    shutil.rmtree(ready / "hf", ignore_errors=True)
    location = logged.artifact_location
    parsed = urlparse(location)
    if parsed.scheme in ("", "file") and Path(parsed.path).is_dir():
        artifacts = Path(parsed.path)
    else:
        ready.mkdir(parents=True, exist_ok=True)
        artifacts = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{logged.model_id}",
                                                             dst_path=str(ready / "artifacts")))
    return _hf_layout(artifacts, ready)


def _hf_layout(artifacts: Path, ready: Path) -> Path:
    if (artifacts / "config.json").exists():  # a plain HF folder was registered
        return artifacts
    weights, tokenizer = artifacts / "model", artifacts / "components" / "tokenizer"
    if not (weights / "config.json").exists():
        raise RegistryError(f"{artifacts} holds no HF model (no model/config.json); was it logged by `promote`?")
    tmp = Path(tempfile.mkdtemp(prefix="hf.", dir=_mkdir(ready)))
    for src in [*weights.iterdir(), *(tokenizer.iterdir() if tokenizer.is_dir() else [])]:
        if not (tmp / src.name).exists():
            (tmp / src.name).symlink_to(src.resolve())
    try:
        tmp.rename(ready / "hf")
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return ready / "hf"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------- registering


def register_merged_model(merged_dir: str | Path, name: str, tags: dict[str, Any], tracker_run_id: str, *,
                          dtype: str = "float32", alias: str | None = None, reason: str = "", actor: str | None = None):
    """Log a merged HF folder (weights + tokenizer) as model ``model`` of the promote run and register it.

    The version gets ``tags`` (arena.method, arena.train, arena.domain, arena.base_model, arena.source_run);
    the LoggedModel gets them too, so ``search_logged_models`` can filter. With ``alias`` the alias is moved to
    the new version (:func:`move_alias`, recorded with ``reason``) as part of the same all-or-nothing step.
    On any failure the version, the registered model (if this call created it) and the LoggedModel are deleted
    and the alias is pointed back at its previous holder, then the error is raised. Returns the ``ModelVersion``.
    """
    import mlflow
    import mlflow.transformers
    from mlflow.exceptions import MlflowException

    from peft_arena.models import load_model, load_tokenizer

    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").exists():
        raise RegistryError(f"{merged_dir} is not a HF model folder (no config.json)")
    client = _client()
    clean_tags = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    created_model, logged_id, version, previous = False, None, None, None
    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, tags={"arena.registry": "peft-arena"},
                description="Merged finetuned models of one (base, domain); aliases: candidate (newest promoted), "
                            "champion (moved only through registry/policy.yaml).")
            created_model = True
        run = client.get_run(tracker_run_id)
        logged = mlflow.initialize_logged_model(name="model", source_run_id=tracker_run_id, tags=clean_tags,
                                                experiment_id=run.info.experiment_id)
        logged_id = logged.model_id
        # mlflow 3.17's local-checkpoint path (transformers_model=<folder>) breaks on transformers 5, whose
        # pipelines.check_task returns the pipeline class as a dotted string; logging the loaded components is
        # the supported path that works. Requirements are pinned explicitly: inferring them would import torchvision.
        model, tokenizer = load_model(str(merged_dir), dtype=dtype), load_tokenizer(str(merged_dir))
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, task="llm/v1/completions", name="model",
            run_id=tracker_run_id, model_id=logged_id, pip_requirements=_pip_pins(),
            metadata={"arena": clean_tags}, model_card=_model_card(name, clean_tags))
        del model
        version = mlflow.register_model(f"models:/{logged_id}", name, tags=clean_tags)
        if version.status != "READY":
            raise RegistryError(f"version {version.version} of {name!r} ended {version.status}: {version.status_message}")
        if alias:
            previous = _alias_holder(client, name, alias)
            move_alias(name, alias, version.version, reason or "registered by promote", None, actor)
        return client.get_model_version(name, version.version)
    except BaseException:
        _undo_registration(client, name, version, created_model, logged_id)
        if alias and previous is not None:
            client.set_registered_model_alias(name, alias, previous.version)
        raise


def _model_card(name: str, tags: dict[str, str]):
    """A model card naming the merge's lineage (a given card also stops MLflow looking one up on the hub)."""
    from huggingface_hub import ModelCard

    lines = "\n".join(f"- `{k}`: {v}" for k, v in sorted(tags.items()))
    return ModelCard(f"---\nlibrary_name: transformers\ntags: [peft-arena]\n---\n# {name}\n\nA finetuned model merged into its base by peft_arena's `promote` stage.\n\n{lines}\n")


def _undo_registration(client, name: str, version, created_model: bool, logged_id: str | None) -> None:
    from mlflow.exceptions import MlflowException

    steps = []
    if version is not None:
        steps.append(lambda: client.delete_model_version(name, version.version))
    if created_model:
        steps.append(lambda: client.delete_registered_model(name))
    if logged_id is not None:
        steps.append(lambda: client.delete_logged_model(logged_id))
    for step in steps:
        try:
            step()
        except MlflowException:  # already gone; the original error is what the user needs to see
            pass


def _pip_pins() -> list[str]:
    pins = []
    for dist in ("torch", "transformers", "accelerate", "safetensors", "tokenizers"):
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return pins


# ----------------------------------------------------------------------------------------------- aliases and scores


def default_actor() -> str:
    """Who moved an alias: ``user@host`` (stages append the run that did it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def move_alias(name: str, alias: str, version: str | int, reason: str, scores: dict[str, float] | None = None,
               actor: str | None = None) -> None:
    """Point ``alias`` at ``version`` and record the move on the versions involved.

    The new holder gets ``arena.alias.<alias>.set_at/set_by/why/scores`` and an entry in ``arena.alias_history``;
    the previous holder (if another version) gets ``arena.alias.<alias>.removed_at/why`` and a history entry.
    """
    if not reason:
        raise RegistryError("an alias move needs a reason (it is recorded on the version)")
    client = _client()
    version = str(version)
    _require_version(client, name, version)
    actor = actor or default_actor()
    at = _now()
    scores = {k: float(v) for k, v in (scores or {}).items()}
    previous = _alias_holder(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    prefix = f"arena.alias.{alias}."
    if previous is not None and str(previous.version) != version:
        why = f"{alias} moved to version {version}: {reason}"
        client.set_model_version_tag(name, previous.version, prefix + "removed_at", at)
        client.set_model_version_tag(name, previous.version, prefix + "removed_why", _fit(why))
        _append_history(client, name, previous.version, ALIAS_HISTORY_TAG,
                        {"alias": alias, "action": "removed", "at": at, "by": actor, "why": why})
    for key, value in {"set_at": at, "set_by": actor, "why": reason, "scores": json.dumps(scores)}.items():
        client.set_model_version_tag(name, version, prefix + key, _fit(value))
    _append_history(client, name, version, ALIAS_HISTORY_TAG,
                    {"alias": alias, "action": "set", "at": at, "by": actor, "why": reason, "scores": scores,
                     "replaced_version": None if previous is None else str(previous.version)})


def alias_history(name: str, version: str | int) -> list[dict]:
    """Every recorded alias move on a version, oldest first."""
    mv = _require_version(_client(), name, str(version))
    return json.loads(mv.tags.get(ALIAS_HISTORY_TAG, "[]"))


def record_scores(name: str, version: str | int, scores: dict[str, float], eval_run_id: str,
                  eval_key: str | None = None) -> None:
    """Write an evaluation's headline scores on the version it evaluated (``arena.score.<key>`` tags).

    ``scores`` keys may carry the metric prefix (``score/target_avg``) or not. The latest evaluation's scores
    are the version's scores; every evaluation stays listed in ``arena.eval_history``.
    """
    client = _client()
    version = str(version)
    _require_version(client, name, version)
    clean = {k.removeprefix("score/"): float(v) for k, v in scores.items()}
    unknown = set(clean) - set(SCORE_KEYS)
    if unknown:
        raise RegistryError(f"unknown score keys {sorted(unknown)}; record_scores takes {', '.join(SCORE_KEYS)}")
    at = _now()
    for key, value in clean.items():
        client.set_model_version_tag(name, version, SCORE_TAG + key, repr(round(value, 6)))
    client.set_model_version_tag(name, version, "arena.scored_by_run", eval_run_id)
    client.set_model_version_tag(name, version, "arena.scored_at", at)
    if eval_key:
        client.set_model_version_tag(name, version, "arena.eval_key", eval_key)
    _append_history(client, name, version, EVAL_HISTORY_TAG,
                    {"run": eval_run_id, "at": at, "eval_key": eval_key, "scores": clean})


def version_scores(tags: dict[str, str]) -> dict[str, float]:
    """The scores :func:`record_scores` wrote, read back from a version's tags."""
    return {k[len(SCORE_TAG):]: float(v) for k, v in tags.items() if k.startswith(SCORE_TAG)}


def _append_history(client, name: str, version: str, tag: str, entry: dict) -> None:
    mv = client.get_model_version(name, version)
    history = json.loads(mv.tags.get(tag, "[]"))
    history.append(entry)
    text = json.dumps(history)
    while len(text) > _TAG_LIMIT and len(history) > 1:  # keep the newest entries within MLflow's tag limit
        history.pop(0)
        text = json.dumps(history)
    client.set_model_version_tag(name, version, tag, text)


def _fit(value: str) -> str:
    return value if len(value) <= _TAG_LIMIT else value[: _TAG_LIMIT - 1] + "…"


# ----------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Gates:
    """The thresholds a version must pass to take an alias (one set per domain)."""

    max_forget_pp: float = 2.0
    min_target_gain_pp: float = 1.0
    min_margin_over_champion_pp: float = 0.0
    same_eval_settings: bool = True


@dataclass(frozen=True)
class Policy:
    default: Gates
    domains: dict[str, Gates]
    alias: str = CHAMPION
    source: str = ""

    def gates(self, domain: str | None) -> Gates:
        return self.domains.get(domain or "", self.default)


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    gates: dict[str, Any] = field(default_factory=dict)  # the thresholds that applied

    def summary(self) -> str:
        return ("promote: " if self.promote else "keep: ") + "; ".join(self.reasons)


def load_policy(path: str | Path = "registry/policy.yaml", alias: str = CHAMPION) -> Policy:
    """Read the gates for ``alias`` from a policy YAML (``default`` plus per-domain overrides)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy file {path} not found; pass policy=<path to registry/policy.yaml>")
    data = yaml.safe_load(path.read_text()) or {}
    if alias not in data:
        raise PolicyError(f"{path} has no section {alias!r} (sections: {', '.join(data) or 'none'})")
    section = data[alias] or {}
    extra = set(section) - {"default", "domains"}
    if extra:
        raise PolicyError(f"{path}: {alias} takes only 'default' and 'domains', not {sorted(extra)}")
    default = _gates(path, f"{alias}.default", section.get("default") or {}, Gates())
    domains = {str(d): _gates(path, f"{alias}.domains.{d}", g or {}, default)
               for d, g in (section.get("domains") or {}).items()}
    return Policy(default=default, domains=domains, alias=alias, source=str(path))


def _gates(path: Path, where: str, values: dict, base: Gates) -> Gates:
    known = {f.name: f.type for f in fields(Gates)}
    unknown = set(values) - set(known)
    if unknown:
        raise PolicyError(f"{path}: {where} has unknown keys {sorted(unknown)} (known: {', '.join(known)})")
    merged = asdict(base)
    for key, value in values.items():
        if key == "same_eval_settings":
            if not isinstance(value, bool):
                raise PolicyError(f"{path}: {where}.{key} must be true or false")
            merged[key] = value
        else:
            try:
                merged[key] = float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"{path}: {where}.{key}={value!r} is not a number") from None
    return Gates(**merged)


def evaluate_policy(policy: Policy, domain: str | None, candidate_scores: dict[str, Any],
                    champion_scores: dict[str, Any] | None) -> Decision:
    """Decide whether a candidate may take the policy's alias. Pure: no MLflow calls.

    Scores are dicts with ``target_avg``, ``target_gain_pp``, ``forget_pp`` (``score/`` prefixes allowed) and
    optionally ``eval_key``. ``champion_scores`` is None when no version holds the alias yet. Every gate is
    reported in ``reasons``, passed or failed, so the record says what the decision was based on.
    """
    gates = policy.gates(domain)
    cand = {k.removeprefix("score/"): v for k, v in candidate_scores.items()}
    reasons, ok = [], True

    def need(key: str) -> float | None:
        nonlocal ok
        if cand.get(key) is None:
            ok = False
            reasons.append(f"missing score {key}; evaluate the version first")
            return None
        return float(cand[key])

    forget, gain, target = need("forget_pp"), need("target_gain_pp"), need("target_avg")
    if forget is not None:
        passed = forget <= gates.max_forget_pp
        ok &= passed
        reasons.append(f"forgetting {forget:.2f} pp {'<=' if passed else '>'} {gates.max_forget_pp:g} pp")
    if gain is not None:
        passed = gain >= gates.min_target_gain_pp
        ok &= passed
        reasons.append(f"target gain {gain:+.2f} pp {'>=' if passed else '<'} {gates.min_target_gain_pp:g} pp")
    if champion_scores is None:
        reasons.append(f"no {policy.alias} yet")
    elif target is not None:
        champ = {k.removeprefix("score/"): v for k, v in champion_scores.items()}
        if gates.same_eval_settings and cand.get("eval_key") != champ.get("eval_key"):
            ok = False
            reasons.append(f"scored with other eval settings than the {policy.alias} (eval_key "
                           f"{cand.get('eval_key')} vs {champ.get('eval_key')}); evaluate both with the same settings")
        elif champ.get("target_avg") is None:
            ok = False
            reasons.append(f"the {policy.alias} has no recorded target_avg; evaluate it first")
        else:
            margin = target - float(champ["target_avg"])
            passed = margin > gates.min_margin_over_champion_pp
            ok &= passed
            reasons.append(f"target {target:.2f} vs {policy.alias} {float(champ['target_avg']):.2f} "
                           f"({margin:+.2f} pp, needs > {gates.min_margin_over_champion_pp:g})")
    return Decision(bool(ok), reasons, {"domain": domain, **asdict(gates)})


def apply_policy(name: str, version: str | int, policy: Policy | str | Path = "registry/policy.yaml",
                 actor: str | None = None) -> Decision:
    """Apply the policy to an evaluated version: move the policy's alias to it only when every gate passes.

    Scores come from the version's tags (written by :func:`record_scores`); the champion's from its own tags.
    The decision, promote or not, is recorded on the version (``arena.policy.<alias>.*``).
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    client = _client()
    version = str(version)
    mv = _require_version(client, name, version)
    scores = version_scores(mv.tags)
    if not scores:
        raise RegistryError(f"version {version} of {name!r} has no recorded scores; "
                            f"run evaluate on models:/{name}/{version} first")
    domain = mv.tags.get("arena.domain")
    holder = _alias_holder(client, name, policy.alias)
    if holder is not None and str(holder.version) == version:
        decision = Decision(False, [f"version {version} already holds {policy.alias}"], {"domain": domain})
    else:
        champion_scores = None
        if holder is not None:
            champion_scores = {**version_scores(holder.tags), "eval_key": holder.tags.get("arena.eval_key")}
        decision = evaluate_policy(policy, domain, {**scores, "eval_key": mv.tags.get("arena.eval_key")},
                                   champion_scores)
    prefix = f"arena.policy.{policy.alias}."
    client.set_model_version_tag(name, version, prefix + "decision", "promote" if decision.promote else "keep")
    client.set_model_version_tag(name, version, prefix + "reasons", _fit(json.dumps(decision.reasons)))
    client.set_model_version_tag(name, version, prefix + "decided_at", _now())
    if decision.promote:
        move_alias(name, policy.alias, version, f"policy {policy.source or 'gates'}: " + "; ".join(decision.reasons),
                   scores, actor)
    return decision


# ----------------------------------------------------------------------------------------------- helpers


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _require_registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(f"no registered model {name!r} in {_tracking_uri()} "
                            f"(registered: {', '.join(names) or 'none'})") from None


def _require_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    _require_registered_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version} "
                            f"(latest: {_latest_version(client, name)})") from None


def _alias_holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _latest_version(client, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'", max_results=200)
    return str(max((int(v.version) for v in versions), default=0) or "none")
