"""Registering a merged model: log it as an MLflow model of the promote run, register a version, move its alias.

:func:`register_merged_model` is all or nothing: on any failure it deletes what it created, so nothing
half-registered is left behind.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from peft_arena.tracking import aliases
from peft_arena.tracking.versions import RegistryError, alias_holder, mlflow_client


def register_merged_model(merged_dir: str | Path | None, name: str, tags: dict[str, Any], tracker_run_id: str, *,
                          dtype: str = "float32", alias: str | None = None, reason: str = "", actor: str | None = None,
                          model=None, tokenizer=None):
    """Log a merged model as model ``model`` of the promote run and register it: a HF folder (``merged_dir``,
    weights + tokenizer, loaded in ``dtype``) or an in-memory ``model`` with its ``tokenizer``, which MLflow then
    writes once (promote's merge on the GPU never goes through an intermediate folder).

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

    if model is None:
        merged_dir = Path(merged_dir)
        if not (merged_dir / "config.json").exists():
            raise RegistryError(f"{merged_dir} is not a HF model folder (no config.json)")
    elif tokenizer is None:
        raise RegistryError("register_merged_model(model=...) needs the tokenizer too")
    client = mlflow_client()
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
        owned = model is None  # an in-memory model (promote's merge) is written once, by log_model
        if owned:
            model, tokenizer = load_model(str(merged_dir), dtype=dtype), load_tokenizer(str(merged_dir))
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, task="llm/v1/completions", name="model",
            run_id=tracker_run_id, model_id=logged_id, pip_requirements=_pip_pins(),
            metadata={"arena": clean_tags}, model_card=_model_card(name, clean_tags))
        if owned:
            del model
        version = mlflow.register_model(f"models:/{logged_id}", name, tags=clean_tags)
        if version.status != "READY":
            raise RegistryError(f"version {version.version} of {name!r} ended {version.status}: {version.status_message}")
        if alias:
            previous = alias_holder(client, name, alias)
            aliases.move_alias(name, alias, version.version, reason or "registered by promote", None, actor)
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

