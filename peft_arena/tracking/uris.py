"""Resolving model URIs: ``models:/NAME@ALIAS``, ``models:/NAME/N``, ``models:/<model_id>``, ``runs:/ID/path``,
a local folder or a hub id become a folder ``from_pretrained`` takes, with exactly which version it was.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from peft_arena.tracking.versions import (PENDING_TAG, PROMOTE_RUN_TAG, RegistryError, latest_version, mlflow_client,
                                          require_registered_model, require_version, tracking_uri)



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

    client = mlflow_client()
    if m := _MODELS_ALIAS.match(uri):
        name, alias = m["name"], m["alias"]
        require_registered_model(client, name)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            known = ", ".join(sorted(client.get_registered_model(name).aliases)) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (its aliases: {known})") from None
        return _resolved_version(client, mv, uri, alias)
    if m := _MODELS_VERSION.match(uri):
        name, version = m["name"], m["version"]
        require_registered_model(client, name)
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"registered model {name!r} has no version {version} "
                                f"(latest: {latest_version(client, name)})") from None
        return _resolved_version(client, mv, uri, None)
    if m := _MODELS_ID.match(uri):
        try:
            logged = client.get_logged_model(m["model_id"])
        except MlflowException:
            raise RegistryError(f"no logged model {m['model_id']!r} in {tracking_uri()}") from None
        return ResolvedModel(str(_hf_folder(client, logged)), model_id=logged.model_id,
                             source_run=logged.tags.get("arena.source_run") or logged.source_run_id,
                             tags=dict(logged.tags), uri=uri)
    if m := _RUNS.match(uri):
        import mlflow

        run_id, path = m["run_id"], (m["path"] or "").strip("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"no run {run_id!r} in {tracking_uri()}") from None
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


def require_usable(mv):
    """``mv`` unless a promote is still registering it (or was killed doing so): such a version is not usable."""
    if mv.tags.get(PENDING_TAG) == "pending":
        run = mv.tags.get(PROMOTE_RUN_TAG, "?")
        raise RegistryError(f"version {mv.version} of {mv.name!r} is not registered completely: promote run {run} is "
                            "still registering it, or died doing so (then `peft-arena doctor` removes it)")
    return mv


def _resolved_version(client, mv, uri: str, alias: str | None) -> ResolvedModel:
    require_usable(mv)
    model_id = model_id_of(mv)
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

    client = mlflow_client()
    if m := _MODELS_ALIAS.match(uri):
        require_registered_model(client, m["name"])
        try:
            return require_usable(client.get_model_version_by_alias(m["name"], m["alias"]))
        except MlflowException:
            raise RegistryError(f"registered model {m['name']!r} has no alias {m['alias']!r}") from None
    if m := _MODELS_VERSION.match(uri):
        return require_usable(require_version(client, m["name"], m["version"]))
    raise RegistryError(f"{uri!r} names no registry version: use models:/NAME/N or models:/NAME@ALIAS")


def model_id_of(mv) -> str | None:
    # The OSS SQL registry does not persist ModelVersion.model_id; the source "models:/m-…" carries it.
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = _MODELS_ID.match(mv.source or "")
    return m["model_id"] if m else None


def download_cache() -> Path:
    from peft_arena.models import cache_dir

    return cache_dir() / "registry"


def _hf_folder(client, logged) -> Path:
    """A folder with the model's weights, config and tokenizer side by side, ready for ``from_pretrained``.

    The transformers flavor stores weights under ``model/`` and the tokenizer under ``components/tokenizer/``;
    the ready folder links both (no copy). A local artifact store is read in place; a remote one is downloaded
    once per LoggedModel (ids are unique, so the cache never goes stale).
    """
    import mlflow

    ready = download_cache() / logged.model_id
    if (ready / "hf" / "config.json").exists():  # exists() follows the links: False when the store moved
        os.utime(ready)  # last use, for the cache's pruning (tracking/doctor.prune_download_cache)
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

