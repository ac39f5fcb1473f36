"""Arena analysis on ``mlflow.search_runs``: leaderboard, base points, Pareto front and plot, family summaries.

Every table starts from the runs' tags and metrics (DESIGN.md contracts), so the same numbers can be pulled by hand::

    mlflow.search_runs(search_all_experiments=True, filter_string="tags.`arena.stage` = 'evaluate'")

The leaderboard has one row per evaluated trained model and evaluation key (``arena.eval_key``: suite, settings,
data), the newest finished evaluation under that key, joined with its training run (label, trainable parameters)
and its newest spectral run (a few summary numbers). Like is compared with like: the Pareto front, the family
summary and the plot's panels are per (domain, base, eval_key), each with the base model evaluated under the same
key. Provisional evaluations (``arena.provenance=provisional``: bundled samples, limit subsets, partial task
lists, protocol overrides) are left out unless ``include_provisional=True``; then the ``provenance`` column says
which rows they are.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Iterable

import numpy as np
import pandas as pd

from peft_arena.tracking import search

# leaderboard column -> evaluate-run metric
SCORE_METRICS = {
    "target": "score/target_avg",
    "general": "score/general_avg",
    "gain_pp": "score/target_gain_pp",
    "general_delta_pp": "score/general_delta_pp",
    "forget_pp": "score/forget_pp",
}
# spectral numbers shown on the leaderboard: means over every analysed matrix (spectral/all/<metric>)
KEY_SPECTRAL = ("eff_rank", "intruders", "rel_delta_fro", "smoothness_retention", "smoothness_adaptation")
LEADERBOARD_COLUMNS = ["method", "label", "family", "train", "domain", "base", "trainable_params", "trainable_pct",
                       "target", "general", "gain_pp", "forget_pp", "general_delta_pp", "on_front", "provenance",
                       *[f"spectral_{m}" for m in KEY_SPECTRAL],
                       "suite", "eval_key", "eval_run_id", "source_run", "model_uri", "registered_model",
                       "model_version"]
BASE_COLUMNS = ["base", "domain", "target", "general", "provenance", "suite", "eval_key", "eval_run_id", "model_uri"]
GROUP = ["domain", "base", "eval_key"]  # points are comparable only within one (domain, base, evaluation key)
FULL, PROVISIONAL = "full", "provisional"


def _tag(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"tags.{name}"
    return df[col] if col in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def _metric(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"metrics.{name}"
    return df[col].astype(float) if col in df else pd.Series([float("nan")] * len(df), index=df.index)


def provenance(df: pd.DataFrame) -> pd.Series:
    """``full`` or ``provisional`` per evaluate run: the ``arena.provenance`` tag; runs logged before that tag
    existed are full only when every benchmark of ``arena.data_provenance`` says ``full``."""
    tag = _tag(df, "arena.provenance")
    legacy = _tag(df, "arena.data_provenance").map(_legacy_provenance)
    return tag.where(tag.isin([FULL, PROVISIONAL]), legacy)


def _legacy_provenance(value) -> str:
    try:
        detail = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        detail = None
    return FULL if isinstance(detail, dict) and detail and all(v == FULL for v in detail.values()) else PROVISIONAL


def leaderboard(experiment_names: Iterable[str] | str | None = None, *, domain: str | None = None,
                base: str | None = None, train: str | None = None, method: str | None = None,
                include_provisional: bool = False, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per evaluated trained model and evaluation key, best target first within each (domain, base, key).

    Columns: method, label, family, train, domain, base, trainable_params, trainable_pct (of the model's total),
    target, general, gain_pp, forget_pp, general_delta_pp (against the base evaluated under the same key),
    on_front (on its (domain, base, eval_key) Pareto front), provenance (``full``/``provisional``),
    spectral_<metric> (means over every analysed matrix, when a spectral run exists), suite, eval_key,
    eval_run_id, source_run, model_uri, registered_model, model_version. A model evaluated several times under
    one key keeps its newest finished evaluation; evaluations under other keys are other rows, never mixed.
    Provisional evaluations are left out unless ``include_provisional``. Filters match the runs' ``arena.*`` tags.
    """
    evals = search.arena_runs("evaluate", experiment_names, domain=domain, base=base, train=train, method=method,
                              tracking_uri=tracking_uri)
    if len(evals):
        evals = evals[_tag(evals, "arena.is_base").fillna("false").str.lower() != "true"]
        evals = evals.assign(_provenance=provenance(evals))
        if not include_provisional:
            evals = evals[evals["_provenance"] == FULL]
    if not len(evals):
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    model_key = _tag(evals, "arena.source_run").fillna(_tag(evals, "arena.model_uri")).fillna(evals["run_id"])
    eval_key = _tag(evals, "arena.eval_key").fillna(evals["run_id"])
    # newest first from search: the first row per (model, evaluation key) wins; a full evaluation is never hidden
    # by a provisional one (their keys differ anyway: the provenance is part of the settings the key hashes)
    evals = evals.assign(_model=model_key, _key=eval_key).drop_duplicates(["_model", "_key", "_provenance"],
                                                                         keep="first")
    source_runs = [r for r in _tag(evals, "arena.source_run").dropna().unique()]
    trains = search.runs_by_id(source_runs, tracking_uri=tracking_uri).set_index("run_id") \
        if source_runs else pd.DataFrame()
    spectral = _spectral_by_source(experiment_names, tracking_uri)

    rows = []
    for _, ev in evals.iterrows():
        src = ev.get("tags.arena.source_run")
        tr = trains.loc[src] if isinstance(src, str) and src in trains.index else None
        trainable = _get(tr, "metrics.arena/trainable_params")
        total = _get(tr, "metrics.arena/total_params")
        row = {
            "method": ev.get("tags.arena.method") or _get(tr, "tags.arena.method"),
            "label": _get(tr, "tags.arena.method_label") or ev.get("tags.arena.method_label"),
            "train": ev.get("tags.arena.train") or _get(tr, "tags.arena.train"),
            "domain": ev.get("tags.arena.domain"),
            "base": ev.get("tags.arena.base_model"),
            "trainable_params": trainable,
            "trainable_pct": 100.0 * trainable / total if trainable is not None and total else None,
            **{col: ev.get(f"metrics.{metric}") for col, metric in SCORE_METRICS.items()},
            "provenance": ev["_provenance"],
            "suite": ev.get("tags.arena.suite"),
            "eval_key": ev.get("tags.arena.eval_key"),
            "eval_run_id": ev["run_id"],
            "source_run": src if isinstance(src, str) else None,
            "model_uri": ev.get("tags.arena.model_uri"),
            "registered_model": ev.get("tags.arena.registered_model"),
            "model_version": ev.get("tags.arena.model_version"),
        }
        spec = spectral.get(row["source_run"]) if row["source_run"] else None
        for m in KEY_SPECTRAL:
            row[f"spectral_{m}"] = None if spec is None else spec.get(f"metrics.spectral/all/{m}")
        rows.append(row)
    df = pd.DataFrame(rows)
    df["family"] = df["method"].map(method_family)
    df["on_front"] = False
    for _, group in df.groupby(GROUP, dropna=False):
        df.loc[pareto_front(group).index, "on_front"] = True
    df = df.sort_values([*GROUP, "target"], ascending=[*[True] * len(GROUP), False], ignore_index=True)
    df["trainable_params"] = pd.to_numeric(df["trainable_params"]).round().astype("Int64")
    return df.reindex(columns=LEADERBOARD_COLUMNS)


def _get(row, key):
    if row is None or key not in row.index:
        return None
    value = row[key]
    return None if pd.isna(value) else value


def _spectral_by_source(experiment_names, tracking_uri) -> dict[str, pd.Series]:
    runs = search.arena_runs("spectral", experiment_names, tracking_uri=tracking_uri)
    out: dict[str, pd.Series] = {}
    for _, row in runs.iterrows():  # newest first: the first row per source run wins
        src = row.get("tags.arena.source_run")
        if isinstance(src, str) and src not in out:
            out[src] = row
    return out


def model_name(row) -> str:
    """``sft-oft-b32`` for a leaderboard row (the label is left out when it only repeats the method)."""
    parts = [row.get("train"), row.get("method")]
    if row.get("label") != row.get("method"):
        parts.append(row.get("label"))
    return "-".join(str(p) for p in parts if isinstance(p, str) and p)


def method_family(method: str | None) -> str | None:
    """The PEFT family of a registry method name (``pissa`` → ``lora``); an unregistered name is its own family."""
    if not isinstance(method, str):
        return None
    from peft_arena.methods import METHODS

    spec = METHODS.get(method)
    return spec.family if spec is not None else method


def base_points(experiment_names: Iterable[str] | str | None = None, *, domain: str | None = None,
                base: str | None = None, include_provisional: bool = False,
                tracking_uri: str | None = None) -> pd.DataFrame:
    """The base models' own scores (evaluate runs tagged ``arena.is_base=true``), newest per (base, domain, eval_key);
    provisional ones only with ``include_provisional``."""
    runs = search.arena_runs("evaluate", experiment_names, domain=domain, base=base, tracking_uri=tracking_uri,
                             extra="tags.`arena.is_base` = 'true'")
    if len(runs) and not include_provisional:
        runs = runs[provenance(runs) == FULL]
    if not len(runs):
        return pd.DataFrame(columns=BASE_COLUMNS)
    df = pd.DataFrame({
        "base": _tag(runs, "arena.base_model"), "domain": _tag(runs, "arena.domain"),
        "target": _metric(runs, SCORE_METRICS["target"]), "general": _metric(runs, SCORE_METRICS["general"]),
        "provenance": provenance(runs), "suite": _tag(runs, "arena.suite"),
        # a base is domain-agnostic: its per-domain target averages place it in each domain's panel
        "target_math": _metric(runs, "score/target_math_avg"), "target_med": _metric(runs, "score/target_med_avg"),
        "eval_key": _tag(runs, "arena.eval_key"), "eval_run_id": runs["run_id"],
        "model_uri": _tag(runs, "arena.model_uri"),
    })
    return df.drop_duplicates(["base", "domain", "eval_key"], keep="first").reset_index(drop=True)


def pareto_front(df: pd.DataFrame, x: str = "general", y: str = "target") -> pd.DataFrame:
    """The rows no other row beats on both ``x`` and ``y`` (maximising both), sorted by ``x``.

    A row is dominated when another is at least as good on both and strictly better on one; exact ties all stay.
    Rows missing either score are left out.
    """
    pts = df.dropna(subset=[x, y])
    keep = []
    for idx, row in pts.iterrows():
        dominated = ((pts[x] >= row[x]) & (pts[y] >= row[y]) & ((pts[x] > row[x]) | (pts[y] > row[y]))).any()
        if not dominated:
            keep.append(idx)
    return pts.loc[keep].sort_values(x)


def plot_pareto(df: pd.DataFrame, base_df: pd.DataFrame | None = None):
    """Target (y) against general (x) average, one panel per (domain, base, evaluation key): every model, the Pareto
    front (a black step line through ringed points), and the base model evaluated under the same key as a black
    star. Colours are methods (the arena's one method-colour legend, :mod:`peft_arena.plotting.style`); markers
    are training kinds (circle SFT, triangle GRPO), explained in the legend only when a panel has both. A panel's
    title names its suite and key, and says when it is provisional."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from peft_arena.plotting.style import REFERENCE, TRAIN_MARKERS, method_color, method_handles

    base_df = base_df if base_df is not None else pd.DataFrame(columns=BASE_COLUMNS)
    keys = sorted({tuple(k) for k in df[GROUP].itertuples(index=False)}, key=str) or sorted(
        {tuple(k) for k in base_df[GROUP].itertuples(index=False)}, key=str)
    if not keys:
        raise ValueError("nothing to plot: no evaluated models and no base evaluations")
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 5.0), squeeze=False)
    for ax, (domain, base, key) in zip(axes[0], keys):
        sub = df[(df["domain"] == domain) & (df["base"] == base) & (df["eval_key"] == key)]
        missing = sub.apply(lambda r: _missing(r["general"]) or _missing(r["target"]), axis=1) if len(sub) else []
        if len(sub) and missing.any():  # a suite without the paper's general or target average: no point here
            ax.text(0.02, 0.02, f"{int(missing.sum())} model(s) without both averages under this key (not plotted)",
                    transform=ax.transAxes, fontsize=7, color="grey")
            sub = sub[~missing]
        trains = sorted({t for t in sub.get("train", []) if isinstance(t, str)})
        for _, r in sub.iterrows():
            ax.scatter(r["general"], r["target"], s=46, color=method_color(r.get("method")),
                       marker=TRAIN_MARKERS.get(r.get("train"), "s"), edgecolor="black", linewidth=0.4, zorder=3)
            ax.annotate(model_name(r), (r["general"], r["target"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        handles = method_handles([m for m in sub.get("method", []) if isinstance(m, str)],
                                 marker=TRAIN_MARKERS.get(trains[0], "s") if len(trains) == 1 else "o")
        if len(trains) > 1:
            handles += [Line2D([], [], color=REFERENCE, marker=TRAIN_MARKERS.get(t, "s"), markerfacecolor="none",
                               linestyle="", label=t.upper()) for t in trains]
        front = pareto_front(sub)
        if len(front):
            if len(front) > 1:
                ax.step(front["general"], front["target"], where="pre", color=REFERENCE, linewidth=1.0, alpha=0.6,
                        zorder=2, label="Pareto front")
            ax.scatter(front["general"], front["target"], s=150, facecolors="none", edgecolors=REFERENCE,
                       linewidths=0.9, zorder=2)
            handles.append(Line2D([], [], color=REFERENCE, alpha=0.6 if len(front) > 1 else 1.0,
                                  linestyle="-" if len(front) > 1 else "", marker="o", markersize=10,
                                  markerfacecolor="none", label="Pareto front"))
        same_domain = (base_df["domain"] == domain) | base_df["domain"].isna() | (base_df["domain"] == "")
        bsub = base_df[same_domain & (base_df["base"] == base) & (base_df["eval_key"] == key)]
        for _, b in bsub.iterrows():
            target = b.get(f"target_{domain}")
            target = b["target"] if _missing(target) else target
            if _missing(target) or _missing(b["general"]):
                continue
            ax.scatter(b["general"], target, s=160, marker="*", color=REFERENCE, zorder=4, label="base model")
            ax.axvline(b["general"], color=REFERENCE, linestyle=":", linewidth=0.8)
            ax.axhline(target, color=REFERENCE, linestyle=":", linewidth=0.8)
            if not any(h.get_label() == "base model" for h in handles):
                handles.append(Line2D([], [], color=REFERENCE, marker="*", markersize=11, linestyle="",
                                      label="base model"))
        ax.set_xlabel("general average (%)  — stability")
        ax.set_ylabel("target average (%)  — plasticity")
        suite = next((s for s in [*sub.get("suite", []), *bsub.get("suite", [])] if isinstance(s, str)), "?")
        provisional = PROVISIONAL in set(sub.get("provenance", [])) | set(bsub.get("provenance", []))
        ax.set_title(f"{domain} · {base} · eval {key}" + (" (PROVISIONAL)" if provisional else "")
                     + (f" · all {trains[0].upper()}" if len(trains) == 1 else "") + f"\n{_short_suite(suite)}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Target vs general: up-right is better; dotted lines mark the base model", fontsize=10)
    fig.tight_layout()
    return fig


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _short_suite(suite: str, width: int = 70) -> str:
    return suite if len(suite) <= width else suite[: width - 1] + "…"


def family_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (domain, base, eval_key, method family): how many models, the best one, mean scores, median trainable
    params (evaluations under different keys are never pooled)."""
    cols = ["domain", "base", "eval_key", "family", "models", "methods", "best", "best_target", "mean_target",
            "mean_general",
            "mean_gain_pp", "mean_forget_pp", "median_trainable_params", "on_front"]
    if not len(df):
        return pd.DataFrame(columns=cols)
    rows = []
    for (domain, base, key, family), g in df.groupby([*GROUP, "family"], dropna=False):
        best = g.loc[g["target"].astype(float).idxmax()] if g["target"].notna().any() else g.iloc[0]
        rows.append({
            "domain": domain, "base": base, "eval_key": key, "family": family, "models": len(g),
            "methods": ", ".join(sorted(g["method"].dropna().unique())),
            "best": model_name(best),
            "best_target": best["target"], "mean_target": g["target"].mean(), "mean_general": g["general"].mean(),
            "mean_gain_pp": g["gain_pp"].mean(), "mean_forget_pp": g["forget_pp"].mean(),
            "median_trainable_params": g["trainable_params"].astype(float).median(),
            "on_front": int(g["on_front"].sum()) if "on_front" in g else 0,
        })
    out = pd.DataFrame(rows, columns=cols)
    out["median_trainable_params"] = pd.to_numeric(out["median_trainable_params"]).round().astype("Int64")
    return out.sort_values(["domain", "base", "eval_key", "best_target"], ascending=[True, True, True, False],
                           ignore_index=True)


def to_markdown(df: pd.DataFrame, columns: list[str] | None = None, floatfmt: str = ".2f") -> str:
    """A GitHub markdown table (no tabulate needed). Floats use ``floatfmt``, except non-zero magnitudes it would
    print as 0.00 (relative update norms, say), which get three significant digits; integers get separators."""
    df = df if columns is None else df[[c for c in columns if c in df.columns]]

    def cell(v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else ""
        if isinstance(v, numbers.Integral):
            return f"{int(v):,}"
        if isinstance(v, numbers.Real):
            text = f"{float(v):{floatfmt}}"
            if float(v) != 0.0 and float(text) == 0.0:
                return f"{float(v):.3g}"
            return text
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


# the columns the markdown leaderboard shows (the CSV keeps all)
MARKDOWN_COLUMNS = ["method", "label", "train", "domain", "base", "trainable_params", "target", "general", "gain_pp",
                    "forget_pp", "on_front", "spectral_eff_rank", "spectral_intruders", "spectral_rel_delta_fro",
                    "eval_key", "model_uri"]
