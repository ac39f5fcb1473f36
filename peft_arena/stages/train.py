"""The train_sft and train_grpo stages: tag the run, train, log the trained artifact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft_arena.config import ConfigError, GRPOStageConfig, SFTConfig, config_params
from peft_arena.methods import get_method
from peft_arena.models import resolve_base
from peft_arena.tracking import notes
from peft_arena.tracking.naming import run_name

# The resolved config is logged as `cfg.<key>`: unprefixed names belong to `mlflow run -P` and to the HF
# MLflowCallback (TrainingArguments), and MLflow refuses to change a logged param.
_NOT_PARAMS = ("output_dir", "run_name")


def _lineage(cfg, train: str, label: str, base) -> dict[str, str]:
    return {
        "arena.method": cfg.adapter,
        "arena.method_label": label,
        "arena.domain": cfg.domain,
        "arena.base_model": base.short,
        "arena.base_source": base.source,
        "arena.base_display": base.display,
        "arena.train": train,
    }


def effective_params(cfg, data: str, lr: float) -> dict:
    """The settings the run really used, as ``cfg.<key>``: "use the default" placeholders resolved (``lr`` 0 →
    the method's rate, ``data`` "" → the domain's default source, ``limit`` 0 → ``all``), unset options left out."""
    params = {}
    for key, value in config_params(cfg).items():
        if key in _NOT_PARAMS or value in ("", None):
            continue
        params[f"cfg.{key}"] = value
    params.update({"cfg.data": data, "cfg.lr": lr})
    if "cfg.limit" in params and not cfg.limit:
        params["cfg.limit"] = "all"
    return params


def _prepare(cfg, stage: str, train: str, tracker):
    spec = get_method(cfg.adapter)  # unknown method -> MethodError before any work
    options = spec.resolve(cfg.method_options)
    if cfg.domain not in ("math", "med"):
        raise ValueError(f"unknown domain {cfg.domain!r}: use math or med")
    base = resolve_base(cfg.base_model)
    label = spec.label(options)
    from peft_arena.training.sft import default_data

    data = cfg.data or default_data(cfg.domain)
    name = cfg.run_name or run_name(stage, train, cfg.adapter, label, cfg.domain, base.short)
    if not cfg.run_name and (cfg.data or cfg.recipe):  # say which data and preset a non-default run used
        name = "-".join([name, *([_data_label(cfg.data)] if cfg.data else []), *([cfg.recipe] if cfg.recipe else [])])
    tags = {**_lineage(cfg, train, label, base), "arena.data": data, "mlflow.runName": name}
    if cfg.recipe:
        tags["arena.recipe"] = cfg.recipe
    if train == "sft":
        lr = cfg.lr or spec.sft_lr
    else:
        lr = cfg.lr or cfg.grpo_options.get("learning_rate") or spec.grpo_lr
    params = effective_params(cfg, data, lr)
    out = Path(cfg.output_dir) / tracker.run_id
    if getattr(tracker, "resuming", False):
        out = _resumed_output(tracker, params, out)
    tracker.set_tags(tags)
    tracker.log_params(params)
    return out, base, name


def _resumed_output(tracker, params: dict, default: Path) -> Path:
    """A resumed run must get its own settings again (a different lr would not continue the same training);
    its outputs and checkpoints stay where the first process put them."""
    from peft_arena.training.checkpoints import CHECKPOINT_DIR_TAG

    logged = {k: v for k, v in tracker.logged_params().items() if k.startswith("cfg.")}
    given = {k: str(v)[:6000] for k, v in params.items()}
    differ = sorted(k for k in set(logged) | set(given) if k in logged and logged[k] != given.get(k))
    if differ:
        key = differ[0]
        raise ConfigError(f"--resume: run {tracker.run_id} has {key[4:]}={logged[key]!r}, not "
                          f"{given.get(key, '(unset)')!r}: resume with the run's own settings (or none at all)"
                          + (f"; {len(differ) - 1} more differ" if len(differ) > 1 else ""))
    folder = tracker.run_tags().get(CHECKPOINT_DIR_TAG) if hasattr(tracker, "run_tags") else None
    return Path(folder).parent if folder else default


def _data_label(data: str) -> str:
    """A named source as is; a file by its stem (``/data/math_sft.parquet`` → ``math_sft``)."""
    return Path(data).stem if ("/" in data or "." in Path(data).name) and not Path(data).is_dir() else data


def run_train_sft(cfg: SFTConfig, tracker) -> dict:
    from peft_arena.training.startup import StartupClock

    clock = StartupClock()  # startup/* metrics: from the process's start to the first optimizer step
    clock.mark("run_setup")  # the interpreter, the CLI, the MLflow run
    clock.prefetch(cfg.base_model)  # a local folder's shards read into the page cache while the imports run
    from peft_arena.training.sft import train_sft

    clock.mark("module_imports")  # torch, transformers, peft, ... as training/sft.py imports them
    out, base, name = _prepare(cfg, "train_sft", "sft", tracker)
    result = _logged(train_sft(cfg, tracker, out, resume=getattr(tracker, "resuming", False), startup=clock), out,
                     tracker)
    _describe(cfg, "sft", base, name, result, result.get("examples"), tracker)
    return result


def _describe(cfg, train: str, base, name: str, result: dict, examples: int | None, tracker) -> None:
    """The adapter as a LoggedModel named after the run, and the run's description."""
    from peft_arena.training.sft import default_data

    tracker.log_adapter_model(
        name, result["adapter_uri"],
        {"arena.method": cfg.adapter, "arena.method_label": result.get("label", ""), "arena.train": train,
         "arena.domain": cfg.domain, "arena.base_model": base.short},
        {"trainable_params": result.get("trainable_params"), "steps": result.get("steps"),
         **{f"method.{k}": v for k, v in get_method(cfg.adapter).resolve(cfg.method_options).items()}})
    tracker.describe(notes.training(train, cfg.adapter, result.get("label", ""), cfg.domain, base.short,
                                    cfg.data or default_data(cfg.domain), examples, result.get("steps"), result,
                                    result.get("adapter_uri"), result.get("monitor_stopped")))


def _logged(result: dict, out: Path, tracker) -> dict:
    """The adapter is in MLflow now (``runs:/<run>/adapter``): the local working copy goes (disk hygiene; the
    copies of runs that did not finish are kept for ``--resume`` and pruned by ``peft-arena doctor``)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    result.pop("adapter_dir", None)
    return {**result, "adapter_uri": f"runs:/{tracker.run_id}/adapter"}


def run_train_grpo(cfg: GRPOStageConfig, tracker) -> dict:
    from peft_arena.data import load_records
    from peft_arena.training.grpo import GRPORecipe, train_grpo
    from peft_arena.training.sft import default_data
    from peft_arena.training.monitor import attach_monitor

    out, base, name = _prepare(cfg, "train_grpo", "grpo", tracker)
    known = {f.name for f in dataclasses.fields(GRPORecipe)}
    unknown = sorted(set(cfg.grpo_options) - known)
    if unknown:
        raise ConfigError(f"unknown GRPO option(s) {', '.join('grpo.' + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    recipe = GRPORecipe(**{**cfg.grpo_options, "max_steps": cfg.max_steps, "seed": cfg.seed,
                           **({"learning_rate": cfg.lr} if cfg.lr else {})})
    records = load_records(cfg.data or default_data(cfg.domain), cfg.domain, limit=cfg.limit or None, seed=cfg.seed)
    records, monitor = attach_monitor(cfg, records, tracker, out, train="grpo", domain=cfg.domain,
                                      source=cfg.data or default_data(cfg.domain), seed=cfg.seed)
    from peft_arena.training.sft import log_training_data

    log_training_data(tracker, records, cfg.data or default_data(cfg.domain))
    result = _logged(train_grpo(base.source, base.source, cfg.adapter, cfg.method_options, records, cfg.domain,
                                recipe, str(out), tracker, extra_callbacks=monitor, save_steps=cfg.save_steps,
                                resume=getattr(tracker, "resuming", False)), out, tracker)
    _describe(cfg, "grpo", base, name, {**result, "monitor_stopped": monitor[0].stopped if monitor else None},
              len(records), tracker)
    return result
