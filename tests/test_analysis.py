"""Leaderboard, base points, Pareto front/plot, family summary and the report stage on synthetic runs in sqlite."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from peft_arena import analysis

EXPERIMENT = "arena-analysis-test"


def _run(client, exp, t, tags, metrics=None, status="FINISHED", name=None):
    run = client.create_run(exp, start_time=t, tags=tags, run_name=name)
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value, timestamp=t)
    client.set_terminated(run.info.run_id, status, end_time=t + 1)
    return run.info.run_id


def _train(client, exp, t, method, label, train, domain, trainable, total=100_000):
    return _run(client, exp, t, {"arena.stage": f"train_{train}", "arena.method": method,
                                 "arena.method_label": label, "arena.train": train, "arena.domain": domain,
                                 "arena.base_model": "tiny"},
                {"arena/trainable_params": trainable, "arena/total_params": total})


def _eval(client, exp, t, source, method, train, domain, target, general, base_target=20.0, base_general=50.0,
          status="FINISHED", eval_key="k1", uri=None, provenance="full"):
    delta = general - base_general
    return _run(client, exp, t, {"arena.stage": "evaluate", "arena.source_run": source, "arena.method": method,
                                 "arena.train": train, "arena.domain": domain, "arena.base_model": "tiny",
                                 "arena.eval_key": eval_key, "arena.model_uri": uri or f"runs:/{source}/adapter",
                                 "arena.provenance": provenance, "arena.suite": f"suite-{eval_key}"},
                {"score/target_avg": target, "score/general_avg": general, "score/target_gain_pp": target - base_target,
                 "score/general_delta_pp": delta, "score/forget_pp": max(0.0, -delta)}, status=status)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("analysis-store")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    other = client.create_experiment("elsewhere", artifact_location=(root / "artifacts2").as_uri())
    t = 1_700_000_000_000
    runs = {
        "lora": _train(client, exp, t, "lora", "r8", "sft", "math", 1_000),
        "oft": _train(client, exp, t + 1, "oft", "b32", "sft", "math", 2_000),
        "vera": _train(client, exp, t + 2, "vera", "256", "grpo", "math", 500),
        "full": _train(client, exp, t + 3, "full", "full", "sft", "math", 100_000),
        "med": _train(client, exp, t + 4, "lora", "r8", "sft", "med", 1_000),
    }
    _run(client, exp, t + 10, {"arena.stage": "evaluate", "arena.is_base": "true", "arena.domain": "math",
                               "arena.base_model": "tiny", "arena.eval_key": "k1", "arena.model_uri": "tiny",
                               "arena.provenance": "full"},
         {"score/target_avg": 20.0, "score/general_avg": 50.0})
    # a base evaluation from before the provenance tag, on a limit subset: provisional
    _run(client, exp, t + 11, {"arena.stage": "evaluate", "arena.is_base": "true", "arena.domain": "math",
                               "arena.base_model": "tiny", "arena.eval_key": "k0", "arena.model_uri": "tiny",
                               "arena.data_provenance": '{"math500": "subset(2)"}'},
         {"score/target_avg": 70.0, "score/general_avg": 70.0})
    _eval(client, exp, t + 20, runs["lora"], "lora", "sft", "math", 10.0, 45.0)  # older evaluation: superseded
    _eval(client, exp, t + 30, runs["lora"], "lora", "sft", "math", 30.0, 49.0, uri="models:/tiny-math/1")
    _eval(client, exp, t + 31, runs["oft"], "oft", "sft", "math", 28.0, 50.5)
    _eval(client, exp, t + 32, runs["vera"], "vera", "grpo", "math", 25.0, 48.0)
    _eval(client, exp, t + 33, runs["full"], "full", "sft", "math", 35.0, 40.0)
    _eval(client, exp, t + 34, runs["full"], "full", "sft", "math", 99.0, 99.0, status="FAILED")  # ignored
    _eval(client, exp, t + 35, runs["med"], "lora", "sft", "med", 40.0, 50.0, base_target=35.0)
    _eval(client, other, t + 36, runs["lora"], "lora", "sft", "math", 1.0, 1.0)  # other experiment
    # a newer evaluation of oft under another evaluation key (another suite): its own row and its own front
    _eval(client, exp, t + 37, runs["oft"], "oft", "sft", "math", 60.0, 60.0, eval_key="k2")
    # a newer, better-looking provisional evaluation of vera: left out unless asked for
    _eval(client, exp, t + 38, runs["vera"], "vera", "grpo", "math", 90.0, 90.0, provenance="provisional")
    _run(client, exp, t + 40, {"arena.stage": "spectral", "arena.source_run": runs["lora"]},
         {"spectral/all/eff_rank": 3.5, "spectral/all/intruders": 2.0, "spectral/mlp.down_proj/eff_rank": 4.0})
    yield {"root": root, "runs": runs, "exp": exp}
    mlflow.set_tracking_uri(None)  # leave no global store behind for other test files
    mp.undo()


def test_leaderboard_joins_training_eval_and_spectral(arena):
    everything = analysis.leaderboard([EXPERIMENT], domain="math")
    # one row per (model, evaluation key): oft's newer k2 evaluation does not hide its k1 one
    assert list(zip(everything["method"], everything["eval_key"])) == [
        ("full", "k1"), ("lora", "k1"), ("oft", "k1"), ("vera", "k1"), ("oft", "k2")]  # best target first per key
    assert everything.set_index("eval_key").loc["k2", "on_front"]  # alone in its (domain, base, key) group
    assert set(everything["provenance"]) == {"full"} and everything.loc[0, "suite"] == "suite-k1"
    df = everything[everything["eval_key"] == "k1"]
    lora = df.set_index("method").loc["lora"]
    assert (lora["target"], lora["general"], lora["gain_pp"], lora["forget_pp"]) == (30.0, 49.0, 10.0, 1.0)
    assert lora["label"] == "r8" and lora["family"] == "lora" and lora["train"] == "sft"
    assert lora["trainable_params"] == 1_000 and lora["trainable_pct"] == pytest.approx(1.0)
    assert lora["spectral_eff_rank"] == 3.5 and lora["spectral_intruders"] == 2.0
    assert lora["model_uri"] == "models:/tiny-math/1" and lora["source_run"] == arena["runs"]["lora"]
    assert math.isnan(df.set_index("method").loc["oft", "spectral_eff_rank"])
    assert dict(zip(df["method"], df["on_front"])) == {"full": True, "lora": True, "oft": True, "vera": False}
    assert list(df.columns) == analysis.LEADERBOARD_COLUMNS


def test_leaderboard_leaves_provisional_evaluations_out_unless_asked(arena):
    board = analysis.leaderboard(EXPERIMENT, domain="math", method="vera")
    assert list(board["target"]) == [25.0]  # the full evaluation, not the newer provisional 90.0
    both = analysis.leaderboard(EXPERIMENT, domain="math", method="vera", include_provisional=True)
    assert sorted(zip(both["target"], both["provenance"])) == [(25.0, "full"), (90.0, "provisional")]
    assert analysis.base_points(EXPERIMENT, include_provisional=True)["eval_key"].tolist() == ["k0", "k1"]  # newest first
    legacy = analysis.base_points(EXPERIMENT, include_provisional=True).set_index("eval_key")
    assert legacy.loc["k0", "provenance"] == "provisional"  # from arena.data_provenance: a subset


def test_leaderboard_filters(arena):
    assert list(analysis.leaderboard(EXPERIMENT, train="grpo")["method"]) == ["vera"]
    assert list(analysis.leaderboard(EXPERIMENT, method="oft")["label"]) == ["b32", "b32"]  # keys k1 and k2
    med = analysis.leaderboard(EXPERIMENT, domain="med")
    assert len(med) == 1 and med.loc[0, "gain_pp"] == 5.0
    assert len(analysis.leaderboard(EXPERIMENT, base="qwen2.5-7b")) == 0
    everywhere = analysis.leaderboard(domain="math")  # all experiments: the other experiment's eval is newer
    assert everywhere.set_index("method").loc["lora", "target"] == 1.0
    from peft_arena.tracking.search import SearchError

    with pytest.raises(SearchError, match="no experiment named nope"):
        analysis.leaderboard("nope")


def test_base_points(arena):
    base = analysis.base_points(EXPERIMENT)
    assert base[["base", "domain", "target", "general", "eval_key"]].values.tolist() == [["tiny", "math", 20.0, 50.0,
                                                                                          "k1"]]


def test_pareto_front_maximises_both_and_keeps_ties():
    df = pd.DataFrame({"general": [1, 2, 3, 2, 3, None], "target": [3, 2, 1, 1, 1, 9]})
    front = analysis.pareto_front(df)
    assert list(front.index) == [0, 1, 2, 4]  # (2,1) is dominated by (2,2) and (3,1); the NaN row is left out


def test_family_summary(arena):
    df = analysis.leaderboard(EXPERIMENT, domain="math")
    fam = analysis.family_summary(df[df["eval_key"] == "k1"]).set_index("family")
    assert fam.loc["lora", "models"] == 1 and fam.loc["lora", "best"] == "sft-lora-r8"
    assert fam.loc["full", "best"] == "sft-full"
    assert fam.loc["full", "best_target"] == 35.0 and fam.loc["vera", "on_front"] == 0
    assert fam.loc["oft", "median_trainable_params"] == 2_000


def test_plot_pareto_marks_base_and_front(arena):
    import matplotlib.pyplot as plt

    df = analysis.leaderboard(EXPERIMENT)
    fig = analysis.plot_pareto(df, analysis.base_points(EXPERIMENT))
    titles = sorted(ax.get_title().replace(" · all SFT", "") for ax in fig.axes)
    assert titles == ["math · tiny · eval k1\nsuite-k1", "math · tiny · eval k2\nsuite-k2", "med · tiny · eval k1\nsuite-k1"]
    math_ax = next(ax for ax in fig.axes if ax.get_title().startswith("math · tiny · eval k1"))
    labels = math_ax.get_legend_handles_labels()[1]
    assert "Pareto front" in labels and "base model" in labels
    front_line = next(line for line in math_ax.get_lines() if line.get_label() == "Pareto front")
    assert list(front_line.get_xdata()) == [40.0, 49.0, 50.5]
    # the legend: one entry per method in the method's arena colour, the front drawn as a line, no training-kind
    # entry (a grey "sft" dot reads as a third series) when the panel has one kind (said in the title instead)
    from peft_arena.plotting.style import method_color

    legend = {h.get_label(): h for h in math_ax.get_legend().legend_handles}
    math = df[(df["domain"] == "math") & (df["eval_key"] == "k1")].dropna(subset=["general", "target"])
    methods, trains = sorted(set(math["method"])), sorted(set(math["train"]))
    kinds = [t.upper() for t in trains] if len(trains) > 1 else []
    assert list(legend) == [*methods, *kinds, "Pareto front", "base model"]
    assert all(legend[m].get_color() == method_color(m) for m in methods)
    assert all(legend[k].get_markerfacecolor() == "none" for k in kinds)  # hollow: a shape, not a series
    assert legend["Pareto front"].get_linestyle() == "-"
    med_ax = next(ax for ax in fig.axes if ax.get_title().startswith("med"))
    med_trains = set(df[df["domain"] == "med"]["train"])
    if len(med_trains) == 1:
        med_legend = [h.get_label() for h in med_ax.get_legend().legend_handles]
        assert not {t.upper() for t in med_trains} & set(med_legend) and "· all SFT" in med_ax.get_title()
    plt.close(fig)


def test_to_markdown():
    df = pd.DataFrame({"method": ["lora"], "trainable_params": pd.array([12345], dtype="Int64"), "target": [30.456],
                       "on_front": [True], "note": [None]})
    assert analysis.to_markdown(df) == ("| method | trainable_params | target | on_front | note |\n"
                                        "|---|---:|---:|---|---|\n"
                                        "| lora | 12,345 | 30.46 | yes |  |\n")
    tiny = analysis.to_markdown(pd.DataFrame({"rel_delta_fro": [0.004213, 0.0, 0.5]}))
    assert tiny.splitlines()[2:] == ["| 0.00421 |", "| 0.00 |", "| 0.50 |"]


def test_report_stage_writes_and_logs_everything(arena, tmp_path, capsys):
    from peft_arena.config import ReportConfig
    from peft_arena.stages.report import run_report
    from peft_arena.tracking.tracker import MemoryTracker

    tracker = MemoryTracker()
    out = run_report(ReportConfig(experiments=EXPERIMENT, domain="math", output_dir=str(tmp_path / "r")), tracker)
    assert out["models"] == 5 and sorted(out["on_front"]) == sorted(
        ["models:/tiny-math/1", f"runs:/{arena['runs']['oft']}/adapter", f"runs:/{arena['runs']['full']}/adapter",
         f"runs:/{arena['runs']['oft']}/adapter"])  # oft is on the front of both its evaluation keys
    for name in ("leaderboard.csv", "leaderboard.md", "family_summary.csv", "family_summary.md", "pareto.png"):
        assert (tmp_path / "r" / name).exists()
        assert name in tracker.artifacts
    csv = pd.read_csv(tmp_path / "r" / "leaderboard.csv")
    assert sorted(csv.loc[csv["method"] == "oft", "target"]) == [28.0, 60.0]
    assert "leaderboard.json" in tracker.artifacts
    assert tracker.tags["arena.stage"] == "report" and tracker.tags["mlflow.runName"] == "report-math"
    assert tracker.last("report/on_front") == 4.0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "base models" in printed and "provenance" not in printed
    flagged = run_report(ReportConfig(experiments=EXPERIMENT, domain="math", include_provisional=True,
                                      output_dir=str(tmp_path / "p")), MemoryTracker())
    assert flagged["models"] == 6
    md = (tmp_path / "p" / "leaderboard.md").read_text()
    assert "Provisional evaluations are included" in md and "| provisional |" in md


def test_report_without_evaluations_says_what_to_do(arena, tmp_path):
    from peft_arena.config import ReportConfig
    from peft_arena.stages.report import run_report
    from peft_arena.tracking.tracker import MemoryTracker

    with pytest.raises(ValueError, match="run `peft-arena evaluate` on the full benchmarks first"):
        run_report(ReportConfig(experiments=EXPERIMENT, domain="law", output_dir=str(tmp_path)), MemoryTracker())


def test_report_draws_the_spectral_method_grid_from_spectral_runs(arena, tmp_path):
    """A real spectral analysis of a tiny LoRA, logged as the lora model's spectral run, feeds the method grid."""
    import mlflow
    import torch

    from peft_arena.config import ReportConfig
    from peft_arena.methods import ops
    from peft_arena.models import ensure_tiny, load_model
    from peft_arena.spectral.analysis import analyze
    from peft_arena.stages.report import run_report
    from peft_arena.tracking.tracker import MemoryTracker

    tiny = ensure_tiny()
    model, options = ops.build(load_model(str(tiny)), "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = ops.save_trained(model, "lora", options, tmp_path / "adapter", base_model="tiny", base_source=str(tiny))
    summary = analyze(str(tiny), str(adapter), out_dir=str(tmp_path / "spectral"), cache_dir=str(tmp_path / "svd"),
                      device="cpu", progress=False)
    with mlflow.start_run(experiment_id=arena["exp"]) as run:
        mlflow.set_tags({"arena.stage": "spectral", "arena.source_run": arena["runs"]["lora"]})
        mlflow.log_metrics(summary["metrics"])
        mlflow.log_artifacts(str(tmp_path / "spectral"), "spectral")
    tracker = MemoryTracker()
    out = run_report(ReportConfig(experiments=EXPERIMENT, domain="math", output_dir=str(tmp_path / "r")), tracker)
    assert out["spectral_grid"] and (tmp_path / "r" / "spectral_method_grid.png").stat().st_size > 10_000
    assert "spectral_method_grid.png" in tracker.artifacts
    board = analysis.leaderboard(EXPERIMENT, domain="math").set_index("method")
    assert board.loc["lora", "spectral_eff_rank"] == pytest.approx(summary["metrics"]["spectral/all/eff_rank"])


def test_plot_pareto_leaves_out_models_without_both_averages():
    import matplotlib.pyplot as plt

    df = pd.DataFrame([{"method": "lora", "label": "r8", "train": "sft", "family": "lora", "domain": "med",
                        "base": "tiny", "eval_key": "k", "suite": "medqa,nq", "provenance": "provisional",
                        "target": None, "general": None},
                       {"method": "oft", "label": "b32", "train": "sft", "family": "oft", "domain": "med",
                        "base": "tiny", "eval_key": "k", "suite": "medqa,nq", "provenance": "provisional",
                        "target": 30.0, "general": 40.0}])
    fig = analysis.plot_pareto(df)
    fig.canvas.draw()  # a None coordinate used to break layout here
    (ax,) = fig.axes
    assert "(PROVISIONAL)" in ax.get_title()
    assert any("1 model(s) without both averages" in t.get_text() for t in ax.texts)
    plt.close(fig)
