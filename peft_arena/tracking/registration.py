"""Registering a merged model: log it as an MLflow model of the promote run, register a version, move its alias.

:func:`register_merged_model` is all or nothing: on any failure it deletes what it created, so nothing
half-registered is left behind.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from peft_arena.tracking import aliases
from peft_arena.tracking.locks import store_lock
from peft_arena.tracking.versions import (PENDING_TAG, PREVIOUS_TAG_PREFIX, PROMOTE_RUN_TAG, RegistryError, alias_holder,
                                          mlflow_client)


def register_merged_model(merged_dir: str | Path | None, name: str, tags: dict[str, Any], tracker_run_id: str, *,
                          dtype: str = "float32", alias: str | None = None, reason: str = "", actor: str | None = None,
                          model=None, tokenizer=None, model_name: str = "model"):
    """Log a merged model as LoggedModel ``model_name`` of the promote run and register it: a HF folder (``merged_dir``,
    weights + tokenizer, loaded in ``dtype``) or an in-memory ``model`` with its ``tokenizer``, which MLflow then
    writes once (promote's merge on the GPU never goes through an intermediate folder).

    The version gets ``tags`` (arena.method, arena.train, arena.domain, arena.base_model, arena.source_run);
    the LoggedModel gets them too, so ``search_logged_models`` can filter. With ``alias`` the alias is moved to
    the new version (:func:`move_alias`, recorded with ``reason``) as part of the same all-or-nothing step.

    Atomic from the outside: the version is created with ``arena.registration=pending`` (URIs naming it are
    refused) and turns ``complete`` only as the very last step, after its alias moved. The registry steps run under
    the store lock ``registry/<name>``, so concurrent promotions into one name serialise there (model creation,
    version, alias and its history). On any failure the version, the registered model (if it is left without
    versions) and the LoggedModel are deleted and the alias is pointed back at its previous holder, then the error
    is raised; a process killed half-way leaves a ``pending`` version that :func:`undo_pending` (``peft-arena
    doctor``, run at the start of every command) removes the same way. Returns the ``ModelVersion``.
    """
    import mlflow
    import mlflow.transformers

    from peft_arena.models import load_model, load_tokenizer

    if model is None:
        merged_dir = Path(merged_dir)
        if not (merged_dir / "config.json").exists():
            raise RegistryError(f"{merged_dir} is not a HF model folder (no config.json)")
    elif tokenizer is None:
        raise RegistryError("register_merged_model(model=...) needs the tokenizer too")
    client = mlflow_client()
    clean_tags = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    logged_id = None
    try:
        run = client.get_run(tracker_run_id)
        logged = mlflow.initialize_logged_model(name=model_name, source_run_id=tracker_run_id, tags=clean_tags,
                                                experiment_id=run.info.experiment_id)
        logged_id = logged.model_id
        # mlflow 3.17's local-checkpoint path (transformers_model=<folder>) breaks on transformers 5, whose
        # pipelines.check_task returns the pipeline class as a dotted string; logging the loaded components is
        # the supported path that works. Requirements are pinned explicitly: inferring them would import torchvision.
        owned = model is None  # an in-memory model (promote's merge) is written once, by log_model
        if owned:
            model, tokenizer = load_model(str(merged_dir), dtype=dtype), load_tokenizer(str(merged_dir))
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, task="llm/v1/completions", name=model_name,
            run_id=tracker_run_id, model_id=logged_id, pip_requirements=_pip_pins(),
            metadata={"arena": clean_tags}, model_card=_model_card(name, clean_tags))
        if owned:
            del model
        with store_lock(f"registry/{name}"):
            return _register_locked(client, name, logged_id, clean_tags, tracker_run_id, alias, reason, actor)
    except BaseException:
        if logged_id is not None:
            _quietly(lambda: client.delete_logged_model(logged_id))
        raise


def _register_locked(client, name: str, logged_id: str, tags: dict[str, str], promote_run: str, alias: str | None,
                     reason: str, actor: str | None):
    import mlflow

    created_model, version, previous = ensure_registered_model(client, name), None, None
    try:
        version = mlflow.register_model(f"models:/{logged_id}", name, tags={
            **tags, PENDING_TAG: "pending", PROMOTE_RUN_TAG: promote_run,
            **({PREVIOUS_TAG_PREFIX + alias: ""} if alias else {})})
        if version.status != "READY":
            raise RegistryError(f"version {version.version} of {name!r} ended {version.status}: {version.status_message}")
        if alias:
            previous = alias_holder(client, name, alias)
            # written before the alias moves, so a killed process leaves what undo_pending needs to put it back
            client.set_model_version_tag(name, version.version, PREVIOUS_TAG_PREFIX + alias,
                                         "" if previous is None else str(previous.version))
            aliases.move_alias(name, alias, version.version, reason or "registered by promote", None, actor)
        client.set_model_version_tag(name, version.version, PENDING_TAG, "complete")  # usable from here on
        if alias:  # only an undo of a pending version needs it; the alias history keeps the replaced version
            _quietly(lambda: client.delete_model_version_tag(name, version.version, PREVIOUS_TAG_PREFIX + alias))
        aliases.describe_version(client, name, str(version.version))
        return client.get_model_version(name, version.version)
    except BaseException:
        _undo(client, name, None if version is None else str(version.version), created_model)
        raise


def ensure_registered_model(client, name: str) -> bool:
    """Create the registered model ``name`` unless it exists; True when this call created it. Safe when several
    processes create it at once (the losers of the race find it created)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException:
        pass
    try:
        client.create_registered_model(
            name, tags={"arena.registry": "peft-arena"},
            description="Merged finetuned models of one (base, domain); aliases: candidate (newest promoted), "
                        "champion (moved only through registry/policy.yaml).")
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def undo_pending(name: str, version: str, why: str) -> dict:
    """Remove a version a killed promote left ``pending``: point its aliases back at their previous holders, delete
    the version and its LoggedModel, and the registered model if that leaves it empty. Returns what was done."""
    client = mlflow_client()
    with store_lock(f"registry/{name}"):
        try:
            mv = client.get_model_version(name, version)
        except Exception:  # removed meanwhile by another doctor
            return {"name": name, "version": version, "removed": False, "why": "already gone"}
        if mv.tags.get(PENDING_TAG) != "pending":
            return {"name": name, "version": version, "removed": False, "why": "completed meanwhile"}
        from peft_arena.tracking.uris import model_id_of

        restored = _undo(client, name, version, created_model=True, mv=mv)
        logged_id = model_id_of(mv)
        if logged_id:
            _quietly(lambda: client.delete_logged_model(logged_id))
    return {"name": name, "version": version, "removed": True, "why": why, "aliases_restored": restored,
            "promote_run": mv.tags.get(PROMOTE_RUN_TAG)}


def _undo(client, name: str, version: str | None, created_model: bool, mv=None) -> dict:
    """Put aliases that point at ``version`` back on their recorded previous holders, delete the version and, if
    this process created the registered model and it is now empty, the model. Errors here are swallowed: the
    original error is what the user needs to see."""
    restored = {}
    if version is not None:
        mv = mv or _quietly(lambda: client.get_model_version(name, version))
        held = _quietly(lambda: client.get_registered_model(name).aliases) or {}
        for alias, holder in held.items():
            if str(holder) != version:
                continue
            before = (mv.tags if mv else {}).get(PREVIOUS_TAG_PREFIX + alias, "")
            if before and _quietly(lambda: client.get_model_version(name, before)) is not None:
                _quietly(lambda: client.set_registered_model_alias(name, alias, before))
                restored[alias] = before
            else:
                _quietly(lambda: client.delete_registered_model_alias(name, alias))
                restored[alias] = None
        _quietly(lambda: client.delete_model_version(name, version))
    if created_model and not _quietly(lambda: client.search_model_versions(f"name = '{name}'", max_results=1)):
        _quietly(lambda: client.delete_registered_model(name))
    return restored


def _quietly(step):
    from mlflow.exceptions import MlflowException

    try:
        return step()
    except MlflowException:
        return None


def _model_card(name: str, tags: dict[str, str]):
    """A model card naming the merge's lineage (a given card also stops MLflow looking one up on the hub)."""
    from huggingface_hub import ModelCard

    lines = "\n".join(f"- `{k}`: {v}" for k, v in sorted(tags.items()))
    return ModelCard(f"---\nlibrary_name: transformers\ntags: [peft-arena]\n---\n# {name}\n\nA finetuned model merged into its base by peft_arena's `promote` stage.\n\n{lines}\n")


def _pip_pins() -> list[str]:
    pins = []
    for dist in ("torch", "transformers", "accelerate", "safetensors", "tokenizers"):
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return pins

