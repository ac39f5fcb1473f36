"""The report's forgetting-monitor section: monitor curves of every method overlaid per domain, and how well the
probe predicted the final general score across the runs in the store.

Trust: for every monitored training run with a finished evaluation, the probe's value at the adapter that was
saved (the last probe, or the selected one under ``monitor_select=pareto``) is paired with the evaluation's
``score/general_delta_pp``; the Spearman rank correlation over those runs (with n) says how far the probe's
ranking of methods can be trusted. Predictors: the general-NLL rise (sign flipped, so a positive correlation
means the probe ranks forgetting the way the benchmarks do) and the general multiple-choice change.
"""

from __future__ import annotations

import math

import pandas as pd

from peft_arena.tracking import search

CURVES = [("monitor/general_nll_rise_pct", "general-text NLL rise (%)  ↓ better"),
          ("monitor/general_mc_acc", "general multiple choice acc (%)  ↑ better"),
          ("monitor/target_nll_drop_pct", "held-out target NLL drop (%)  ↑ better")]
PREDICTORS = {"neg_general_nll_rise_pct": ("monitor/general_nll_rise_pct", -1.0),
              "general_mc_delta_pp": ("monitor/general_mc_delta_pp", 1.0)}
OUTCOME = "score/general_delta_pp"
MIN_N = 3


def monitored_runs(experiments=None, **filters) -> pd.DataFrame:
    """Finished training runs that logged the forgetting monitor (``search_runs`` rows), newest first."""
    runs = search.arena_runs(search.TRAIN_STAGES, experiments, **filters)
    col = "metrics.monitor/general_nll"
    if not len(runs) or col not in runs:
        return runs.iloc[0:0]
    return runs[runs[col].notna()].reset_index(drop=True)


def _label(row) -> str:
    parts = [row.get("tags.arena.train"), row.get("tags.arena.method")]
    label = row.get("tags.arena.method_label")
    if isinstance(label, str) and label != row.get("tags.arena.method"):
        parts.append(label)
    return "-".join(p for p in parts if isinstance(p, str) and p) or row["run_id"][:8]


def curves(runs: pd.DataFrame) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run_id: {metric: [(step, value), …]}}`` for the CURVES metrics of ``runs``."""
    return {r["run_id"]: {key: search.metric_history(r["run_id"], key) for key, _ in CURVES}
            for _, r in runs.iterrows()}


def plot_domain(domain: str, runs: pd.DataFrame, histories: dict):
    """One figure for one domain: the monitor curves of every monitored run overlaid, one panel per probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.2 * len(CURVES), 4.0), squeeze=False)
    from peft_arena.plotting.style import method_color

    seen: dict[tuple, int] = {}
    for _, r in runs.iterrows():
        # the method's arena colour; SFT solid, GRPO dashed; a repeated (method, train) gets another marker
        color = method_color(r.get("tags.arena.method"))
        kind = (r.get("tags.arena.method"), r.get("tags.arena.train"))
        repeat = seen[kind] = seen.get(kind, -1) + 1
        style = {"linestyle": "--" if r.get("tags.arena.train") == "grpo" else "-",
                 "marker": "osD^vP*X"[repeat % 8]}
        label = f"{_label(r)} · {r.get('tags.arena.base_model')}"
        stopped = str(r.get("tags.arena.monitor.stopped_early")).lower() == "true"
        selected = r.get("tags.arena.monitor.selected_step")
        for ax, (key, _) in zip(axes[0], CURVES):
            pts = histories[r["run_id"]].get(key) or []
            if not pts:
                continue
            ax.plot([s for s, _ in pts], [v for _, v in pts], markersize=3, color=color, **style,
                    label=label + (" (stopped by budget)" if stopped else ""))
            if isinstance(selected, str) and selected.isdigit():
                for s, v in pts:
                    if s == int(selected):
                        ax.scatter([s], [v], s=90, facecolors="none", edgecolors=color, linewidths=1.5, zorder=4)
    for ax, (_, title) in zip(axes[0], CURVES):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Forgetting monitor, {domain}: probes during training (circle = adapter chosen by "
                 "monitor_select=pareto)", fontsize=10)
    fig.tight_layout()
    return fig


def _value_at(history: list[tuple[int, float]], step: int | None) -> float | None:
    if not history:
        return None
    if step is None:
        return history[-1][1]
    return next((v for s, v in history if s == step), None)


def trust_table(runs: pd.DataFrame, board: pd.DataFrame) -> pd.DataFrame:
    """One row per monitored training run with an evaluation: predictors (at the saved adapter) and outcome."""
    rows = []
    evaluated = {} if not len(board) else {r["source_run"]: r for _, r in board.iterrows()
                                           if isinstance(r.get("source_run"), str)}
    for _, r in runs.iterrows():
        ev = evaluated.get(r["run_id"])
        if ev is None or ev.get("general_delta_pp") is None or pd.isna(ev.get("general_delta_pp")):
            continue
        selected = r.get("tags.arena.monitor.selected_step")
        step = int(selected) if isinstance(selected, str) and selected.isdigit() else None
        row = {"run_id": r["run_id"], "model": _label(r), "domain": r.get("tags.arena.domain"),
               "base": r.get("tags.arena.base_model"), "probe_step": step,
               "general_delta_pp": float(ev["general_delta_pp"]), "provenance": ev.get("provenance") or "full"}
        for name, (key, sign) in PREDICTORS.items():
            value = _value_at(search.metric_history(r["run_id"], key), step)
            row[name] = None if value is None else sign * value
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", "model", "domain", "base", "probe_step", "general_delta_pp",
                                       "provenance", *PREDICTORS])


def spearman(table: pd.DataFrame) -> list[dict]:
    """Spearman rank correlation of each predictor with the final general change, with n (None below MIN_N runs
    or when either side has a single rank)."""
    out = []
    for name in PREDICTORS:
        pair = table[[name, "general_delta_pp"]].dropna() if len(table) else pd.DataFrame(columns=[name, "x"])
        n = len(pair)
        rho = None
        if n >= MIN_N and pair[name].nunique() > 1 and pair["general_delta_pp"].nunique() > 1:
            value = pair[name].astype(float).corr(pair["general_delta_pp"].astype(float), method="spearman")
            rho = None if value is None or math.isnan(value) else float(value)
        out.append({"predictor": name, "outcome": OUTCOME, "n": n, "spearman_rho": rho})
    return out


def trust_statement(stats: list[dict], table: pd.DataFrame | None = None) -> str:
    """What a user should take from the correlation, in one paragraph."""
    lines = []
    if table is not None and len(table) and (table["provenance"] != "full").any():
        lines.append(f"- note: {int((table['provenance'] != 'full').sum())} of the {len(table)} general scores are "
                     "provisional (samples or subsets): smoke numbers, not benchmark scores.")
    for s in stats:
        if s["spearman_rho"] is None:
            why = (f"only {s['n']} monitored run(s) with a general score (needs {MIN_N})" if s["n"] < MIN_N
                   else f"the ranks are constant over the {s['n']} runs")
            lines.append(f"- `{s['predictor']}` vs `{s['outcome']}`: no correlation: {why}; do not rank methods "
                         "on the probe yet.")
        else:
            rho = s["spearman_rho"]
            strength = "strong" if abs(rho) >= 0.7 else "moderate" if abs(rho) >= 0.4 else "weak"
            lines.append(f"- `{s['predictor']}` vs `{s['outcome']}`: Spearman ρ = {rho:+.2f} over n = {s['n']} runs "
                         f"({strength}{', wrong sign' if rho < 0 else ''}).")
    return "\n".join(lines)
