"""The report stage: leaderboard, Pareto plot, family summaries and the spectral method grid, from search_runs.

Writes into ``output_dir`` and logs into the report run (artifacts tab): ``leaderboard.csv``, ``leaderboard.md``,
``leaderboard.json`` (MLflow table view), ``family_summary.csv``, ``family_summary.md``, ``pareto.png`` and, when
spectral runs exist for the ranked models, ``spectral_method_grid.png``. The leaderboard is printed to stdout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from peft_arena import analysis
from peft_arena.config import ReportConfig
from peft_arena.tracking import search
from peft_arena.tracking import notes
from peft_arena.tracking.naming import run_name


def run_report(cfg: ReportConfig, tracker) -> dict:
    filters = {"domain": cfg.domain or None, "base": cfg.base_model or None, "train": cfg.train or None,
               "method": cfg.method or None}
    experiments = [e.strip() for e in cfg.experiments.split(",") if e.strip()] or None
    tracker.set_tags({"arena.stage": "report", **{f"arena.report.{k}": v for k, v in filters.items() if v},
                      **({"arena.domain": cfg.domain} if cfg.domain else {}),
                      **({"arena.base_model": cfg.base_model} if cfg.base_model else {}),
                      "mlflow.runName": cfg.run_name or run_name("report", cfg.train or None, cfg.method or None,
                                                                None, cfg.domain or None, cfg.base_model or None)})
    tracker.log_params({"cfg.experiments": cfg.experiments or "all", **{f"cfg.{k}": v or "any"
                                                                       for k, v in filters.items()},
                        "cfg.include_provisional": cfg.include_provisional})
    board = analysis.leaderboard(experiments, **filters, include_provisional=cfg.include_provisional)
    bases = analysis.base_points(experiments, domain=filters["domain"], base=filters["base"],
                                 include_provisional=cfg.include_provisional)
    if not len(board) and not len(bases):
        where = ", ".join(f"{k}={v}" for k, v in filters.items() if v) or "no filters"
        hint = ("" if cfg.include_provisional else
                f" ({_provisional_count(experiments, filters)} provisional evaluation(s) left out: sample, limit or "
                "partial-task runs; --include_provisional true shows them, flagged)")
        raise ValueError(f"no finished full evaluate runs match ({where}) in experiments {experiments or 'all'}"
                         f"{hint}; run `peft-arena evaluate` on the full benchmarks first")
    families = analysis.family_summary(board)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = analysis.MARKDOWN_COLUMNS + (["provenance"] if cfg.include_provisional else [])
    shown = [c for c in columns if c in board.columns and board[c].notna().any()]
    board_md = analysis.to_markdown(board, shown)
    base_columns = ["base", "domain", "target", "general", "eval_key"] + (
        ["provenance"] if cfg.include_provisional else [])
    base_md = analysis.to_markdown(bases, base_columns) if len(bases) else ""
    families_md = analysis.to_markdown(families)
    board.to_csv(out / "leaderboard.csv", index=False)
    families.to_csv(out / "family_summary.csv", index=False)
    (out / "leaderboard.md").write_text(
        "# Leaderboard\n\nTarget and general are averages in % (0-100); gain and forgetting are percentage "
        "points against the base model evaluated with the same settings (the same eval_key: suite, settings, data); "
        "the Pareto front is taken per (domain, base, eval_key).\n\n"
        + ("**Provisional evaluations are included** (column provenance): their numbers come from samples, subsets "
           "or partial task lists and are smoke checks, not benchmark scores.\n\n" if cfg.include_provisional
           else "Only full evaluations are ranked (provisional ones: `--include_provisional true`).\n\n")
        + board_md +
        ("\n## Base models\n\n" + base_md if base_md else ""))
    (out / "family_summary.md").write_text("# Method families\n\n" + families_md)
    for name in ("leaderboard.csv", "leaderboard.md", "family_summary.csv", "family_summary.md"):
        tracker.log_artifact(out / name)
    tracker.log_table(board.astype(object).where(board.notna(), None), "leaderboard.json")

    import matplotlib.pyplot as plt

    fig = analysis.plot_pareto(board, bases)
    fig.savefig(out / "pareto.png", dpi=150)
    tracker.log_figure(fig, "pareto.png")
    plt.close(fig)
    grid = _spectral_grid(board, experiments, out)
    if grid:
        tracker.log_artifact(grid)

    monitor = _monitor_section(board, experiments, filters, out, tracker)
    front = board[board["on_front"].fillna(False)] if len(board) else board
    tracker.log_metrics({"report/models": float(len(board)), "report/on_front": float(len(front)),
                         "report/base_points": float(len(bases))})
    tracker.describe(notes.report((board_md if len(board) else "(no trained models evaluated yet)")
                                  + ("\n\n**Base models**\n\n" + base_md if base_md else ""), len(board), len(front)))
    print(board_md if len(board) else "(no trained models evaluated yet)")
    if base_md:
        print("base models:\n" + base_md)
    if monitor["runs"]:
        print("forgetting monitor, probe vs final general score:\n" + monitor["statement"])
    return {"models": len(board), "on_front": front["model_uri"].dropna().tolist() if len(front) else [],
            "output_dir": str(out.resolve()), "spectral_grid": str(grid) if grid else None, "monitor": monitor}


def _monitor_section(board, experiments, filters, out: Path, tracker) -> dict:
    """Monitor curves of every monitored training run, one figure per domain (``monitor_<domain>.png``), and the
    probe's rank correlation with the final general score (``monitor_trust.{md,json}``, ``report/monitor_*``)."""
    import matplotlib.pyplot as plt

    from peft_arena import monitor_report as mr

    runs = mr.monitored_runs(experiments, **filters)
    if not len(runs):
        return {"runs": 0, "plots": [], "trust": [], "statement": ""}
    histories = mr.curves(runs)
    plots = []
    for domain, group in runs.groupby(runs["tags.arena.domain"].fillna("unknown")):
        fig = mr.plot_domain(domain, group, histories)
        path = out / f"monitor_{domain}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        tracker.log_artifact(path)
        plots.append(str(path))
    table = mr.trust_table(runs, board)
    stats = mr.spearman(table)
    statement = mr.trust_statement(stats, table)
    (out / "monitor_trust.md").write_text(
        "# How far to trust the forgetting monitor\n\nRank correlation, across the evaluated monitored runs in the "
        "store, between the probe at the saved adapter and the final `score/general_delta_pp`:\n\n" + statement +
        "\n\n" + (analysis.to_markdown(table) if len(table) else "(no monitored run has a general score yet)\n"))
    tracker.log_artifact(out / "monitor_trust.md")
    tracker.log_dict({"stats": stats, "runs": table.astype(object).where(table.notna(), None).to_dict("records")},
                     "monitor_trust.json")
    nll = stats[0]
    tracker.log_metrics({"report/monitor_runs": float(len(runs)), "report/monitor_trust_n": float(nll["n"]),
                         **({"report/monitor_trust_spearman": nll["spearman_rho"]}
                            if nll["spearman_rho"] is not None else {})})
    return {"runs": len(runs), "plots": plots, "trust": stats, "statement": statement}


def _provisional_count(experiments, filters: dict) -> int:
    runs = search.arena_runs("evaluate", experiments, **filters)
    return int((analysis.provenance(runs) != analysis.FULL).sum()) if len(runs) else 0


def _spectral_grid(board, experiments, out: Path) -> Path | None:
    """The spectral method grid across the ranked models whose training runs have a spectral run."""
    import matplotlib.pyplot as plt

    if not len(board) or board["source_run"].isna().all():
        return None
    runs = search.arena_runs("spectral", experiments)
    if not len(runs):
        return None
    runs = runs[runs.get("tags.arena.source_run").isin(board["source_run"].dropna())] \
        if "tags.arena.source_run" in runs else runs.iloc[0:0]
    if not len(runs):
        return None
    with tempfile.TemporaryDirectory(prefix="arena-report-spectral-") as tmp:
        folders = search.download_latest_artifacts(runs, "spectral", tmp)
        labelled = []
        for _, row in board.iterrows():
            folder = folders.get(row["source_run"])
            if folder is not None and (folder / "profiles" / "index.json").exists():
                labelled.append((analysis.model_name(row), str(folder)))
        from peft_arena.spectral.plots import middle_layer_matrices, plot_method_grid

        layers = middle_layer_matrices([f for _, f in labelled])
        if not layers:
            return None
        fig = plot_method_grid(labelled, layers[0])
    path = out / "spectral_method_grid.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
