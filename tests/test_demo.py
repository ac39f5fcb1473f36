"""`peft-arena demo --fast`: the demo's orchestration on the tiny model, checked through its MLflow store."""

import pytest


@pytest.mark.slow
def test_fast_demo_leaves_every_stage_and_the_registry_in_its_store(tmp_path, monkeypatch, tiny_source):
    import mlflow

    from peft_arena.demo import DOMAIN, run_demo

    # run_demo points the process at its own store; monkeypatch restores both variables afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "peft-arena-demo")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        result = run_demo(str(tmp_path / "arena"), fast=True)
        mlflow.set_tracking_uri(f"sqlite:///{result['store']}")
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        stages = sorted(r.data.tags["arena.stage"] for r in runs)
        assert stages == ["evaluate"] * 3 + ["promote"] * 4 + ["report"] + ["spectral"] * 2 + ["train_sft"] * 2
        assert all(r.info.status == "FINISHED" for r in runs)
        evals = [r for r in runs if r.data.tags["arena.stage"] == "evaluate" and r.data.tags["arena.is_base"] == "false"]
        assert {r.data.tags["arena.method"] for r in evals} == {"lora", "oft"}
        assert all("score/forget_pp" in r.data.metrics and "score/target_gain_pp" in r.data.metrics for r in evals)
        client = mlflow.MlflowClient()
        name = f"tiny-{DOMAIN}"
        assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"
        report = next(r for r in runs if r.data.tags["arena.stage"] == "report")
        files = {a.path for a in client.list_artifacts(report.info.run_id)}
        assert {"leaderboard.csv", "leaderboard.md", "pareto.png", "spectral_method_grid.png"} <= files
    finally:
        mlflow.set_tracking_uri(None)
