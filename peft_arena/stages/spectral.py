"""The spectral stage: profile a finetuned model against its base and log metrics, files and plots.

The trained artifact (adapter) is preferred over a merged model when the lineage knows it: low-rank updates are
then analysed exactly from their factors, and no merged-weight rounding enters ΔW.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from peft_arena.config import ConfigError, SpectralConfig
from peft_arena.models import resolve_base
from peft_arena.stages.lineage import lineage_of
from peft_arena.tracking import notes
from peft_arena.tracking.naming import run_name


def _int_list(text: str, what: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma list of integers, got {text!r}") from None


def _str_list(text: str) -> list[str] | None:
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


def run_spectral(cfg: SpectralConfig, tracker) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from peft_arena.spectral.analysis import analyze
    from peft_arena.spectral import plots

    if not cfg.model_uri:
        raise ConfigError("model_uri is required: a training run's adapter (runs:/ID/adapter), a registry URI "
                          "(models:/NAME@ALIAS) or a model folder")
    layers = _int_list(cfg.layers, "layers")
    modules = _str_list(cfg.modules)
    target = lineage_of(cfg.model_uri, prefer_adapter=True)
    if target.kind == "base":
        raise ConfigError(f"{cfg.model_uri} is a base model, not a finetuned one: spectral profiles the update a "
                          "finetuning made; pass a training run's adapter (runs:/ID/adapter) or a registry URI")
    lineage = target.lineage
    if cfg.base_model:
        base_source = resolve_base(cfg.base_model).source
    elif lineage.get("arena.base_source"):
        base_source = lineage["arena.base_source"]
    else:
        raise ConfigError(f"the base of {cfg.model_uri} is unknown (no lineage tags): pass base_model")
    name = cfg.run_name or run_name("spectral", lineage.get("arena.train"), lineage.get("arena.method"),
                                    lineage.get("arena.method_label"), lineage.get("arena.domain"),
                                    lineage.get("arena.base_model"))
    tracker.set_tags({**lineage, "arena.model_uri": cfg.model_uri, "arena.spectral_input": target.kind,
                      "mlflow.runName": name, **({"arena.source_run": target.source_run} if target.source_run
                                                 else {})})
    tracker.log_params({f"cfg.{k}": v for k, v in vars(cfg).items() if k != "run_name" and v not in ("", None)})

    out = Path(tempfile.mkdtemp(prefix="arena-spectral-"))
    try:
        summary = analyze(base_source, target.path, layers=layers, modules=modules, window=cfg.window,
                          top_k=cfg.top_k, device=cfg.device, out_dir=str(out))
        if summary.get("norms", {}).get("num_changed_tensors") == 0:
            raise ValueError(f"{cfg.model_uri} has no update: every analysed weight equals its base's "
                             f"({base_source}); it is the base model or an untrained adapter, so there is nothing "
                             "to profile")
        tracker.log_metrics(summary["metrics"])  # per-type means; every matrix's numbers go to the table
        tracker.log_metrics({"spectral/total_s": summary["timings"]["total"]})
        tracker.log_table(pd.DataFrame(summary["per_matrix_rows"]), "spectral/per_matrix.json")
        tracker.log_artifacts(out, "spectral")  # spectral_summary.json keeps the per-stage timings
        layer_names = _str_list(cfg.plot_layers) or plots.middle_layer_matrices([out], ("mlp.down_proj", "self_attn.q_proj"), fallback=2)
        figures = {
            "plots/retention_adaptation.png": plots.plot_layer_curves(str(out), layer_names),
            "plots/effective_rank.png": plots.plot_effective_rank(str(out)),
            "plots/distributions.png": plots.plot_distributions(str(out)),
        }
        for artifact, fig in figures.items():
            tracker.log_figure(fig, artifact)
            plt.close(fig)
        headline = {k: v for k, v in summary["metrics"].items() if k.startswith("spectral/all/")}
        tracker.describe(notes.spectral(cfg.model_uri, base_source, summary["num_matrices"], headline))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        target.cleanup()
    return {"metrics": summary["metrics"], "timings": summary["timings"]}
