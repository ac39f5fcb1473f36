"""End to end against a real `mlflow server` (sqlite store, proxied artifacts) on 127.0.0.1.

A small arena is logged through the server: a real tiny LoRA training artifact, `promote` (merge → register →
candidate), evaluate runs (synthetic scores for the base and the promoted version, written back onto the
version), the champion policy, a spectral run and the report. Then the REST API is asked whether runs, metrics,
registered versions and aliases are there, and the champion is resolved and loaded back over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from peft_arena.models import ensure_tiny, load_model, load_tokenizer
from servers import free_port, running_server

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "arena-e2e"
STARTUP_TIMEOUT_S = 120  # uvicorn + migrations take ~30 s on a loaded 2-core machine


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    base = f"http://127.0.0.1:{port}"
    with running_server(argv, env=env, cwd=root, log_path=root / "server.log", health_url=f"{base}/health",
                        start_timeout_s=STARTUP_TIMEOUT_S, stop_grace_s=20):
        yield {"url": base, "root": root}


@pytest.fixture(scope="module")
def arena(server, tmp_path_factory):
    """Log the small arena through the server; returns the ids the checks need."""
    import mlflow
    import torch

    from peft_arena.config import PromoteConfig, ReportConfig
    from peft_arena.methods import ops
    from peft_arena.stages.promote import run_promote
    from peft_arena.stages.report import run_report
    from peft_arena.tracking import registry as reg
    from peft_arena.tracking.tracker import MlflowTracker

    tiny = ensure_tiny()
    work = tmp_path_factory.mktemp("e2e-work")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", server["url"])
    mp.setenv("PEFT_ARENA_CACHE", str(work / "cache"))
    mp.chdir(work)
    mlflow.set_tracking_uri(server["url"])
    exp = mlflow.create_experiment(EXPERIMENT)
    ids: dict[str, str] = {}
    try:
        # training run with a real LoRA artifact (B made non-zero so the merge changes the weights)
        model, options = ops.build(load_model(str(tiny)), "lora")
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        adapter = ops.save_trained(model, "lora", options, work / "adapter", base_model="tiny",
                                   base_source=str(tiny), tokenizer=load_tokenizer(str(tiny)))
        with mlflow.start_run(experiment_id=exp, run_name="sft-lora-r8-math-tiny") as run:
            mlflow.set_tags({"arena.stage": "train_sft", "arena.method": "lora", "arena.method_label": "r8",
                             "arena.domain": "math", "arena.base_model": "tiny", "arena.base_source": str(tiny),
                             "arena.train": "sft"})
            mlflow.log_metrics({"arena/trainable_params": 4096, "arena/total_params": 300_000, "train/loss": 1.5})
            mlflow.log_artifacts(str(adapter), "adapter")
        ids["train"] = run.info.run_id

        with mlflow.start_run(experiment_id=exp) as run:
            promoted = run_promote(PromoteConfig(source_run=ids["train"]), MlflowTracker(run.info.run_id))
        ids["promote"], ids["version"] = run.info.run_id, promoted["version"]

        def evaluate(tags, scores):
            with mlflow.start_run(experiment_id=exp) as run:
                mlflow.set_tags({"arena.stage": "evaluate", "arena.domain": "math", "arena.base_model": "tiny",
                                 "arena.eval_key": "k1", "arena.provenance": "full", **tags})
                mlflow.log_metrics({f"score/{k}": v for k, v in scores.items()})
            return run.info.run_id

        ids["eval_base"] = evaluate({"arena.is_base": "true", "arena.model_uri": "tiny"},
                                    {"target_avg": 20.0, "general_avg": 50.0})
        version_scores = {"target_avg": 24.0, "general_avg": 49.5, "target_gain_pp": 4.0, "general_delta_pp": -0.5,
                          "forget_pp": 0.5}
        resolved = reg.resolve_model_uri("models:/tiny-math@candidate")
        ids["eval"] = evaluate({"arena.model_uri": "models:/tiny-math@candidate", "arena.source_run": ids["train"],
                                "arena.method": "lora", "arena.train": "sft", "arena.registered_model": "tiny-math",
                                "arena.model_version": resolved.version}, version_scores)
        reg.record_scores("tiny-math", resolved.version, version_scores, ids["eval"], eval_key="k1",
                          provenance="full")
        with mlflow.start_run(experiment_id=exp) as run:
            out = run_promote(PromoteConfig(alias="champion", model_uri=f"models:/tiny-math/{resolved.version}",
                                            policy=str(REPO / "registry" / "policy.yaml")),
                              MlflowTracker(run.info.run_id))
        assert out["promoted"], out["reasons"]
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.set_tags({"arena.stage": "spectral", "arena.source_run": ids["train"]})
            mlflow.log_metrics({"spectral/all/eff_rank": 2.5, "spectral/all/intruders": 1.0})
        with mlflow.start_run(experiment_id=exp) as run:
            ids["report_out"] = run_report(ReportConfig(experiments=EXPERIMENT, output_dir=str(work / "report")),
                                           MlflowTracker(run.info.run_id))
        ids["report"] = run.info.run_id
        ids["tiny"] = str(tiny)
        yield ids
    finally:
        mlflow.set_tracking_uri(None)  # leave no global store behind for other test files
        mp.undo()


def test_runs_and_metrics_are_on_the_server(server, arena):
    url = server["url"]
    exp = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})
    stages = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "arena.stage") for r in runs["runs"])
    assert stages == ["evaluate", "evaluate", "promote", "promote", "report", "spectral", "train_sft"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs["runs"])
    ev = _get(url, "/api/2.0/mlflow/runs/get", run_id=arena["eval"])["run"]
    metrics = {m["key"]: m["value"] for m in ev["data"]["metrics"]}
    assert metrics["score/target_gain_pp"] == 4.0 and metrics["score/forget_pp"] == 0.5
    promote = _get(url, "/api/2.0/mlflow/runs/get", run_id=arena["promote"])["run"]
    tags = {t["key"]: t["value"] for t in promote["data"]["tags"]}
    assert tags["mlflow.runName"] == "promote-sft-lora-r8-math-tiny" and tags["arena.model_version"] == arena["version"]
    assert any(m["key"] == "promote/merge_max_abs_logit_diff" for m in promote["data"]["metrics"])
    files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list", run_id=arena["report"])["files"]}
    assert {"pareto.png", "leaderboard.csv", "leaderboard.md", "family_summary.csv"} <= files
    assert arena["report_out"]["models"] == 1


def test_registered_version_and_aliases_are_on_the_server(server, arena):
    url = server["url"]
    model = _get(url, "/api/2.0/mlflow/registered-models/get", name="tiny-math")["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model["aliases"]}
    assert aliases == {"candidate": arena["version"], "champion": arena["version"]}
    mv = _get(url, "/api/2.0/mlflow/model-versions/get", name="tiny-math", version=arena["version"])["model_version"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert tags["arena.source_run"] == arena["train"] and tags["arena.method"] == "lora"
    assert json.loads(tags["arena.scores"])["target_gain_pp"] == 4.0
    assert json.loads(tags["arena.eval_history"])[-1]["run"] == arena["eval"]
    assert [e for e in json.loads(tags["arena.alias_history"]) if e["alias"] == "champion"][-1]["scores"][
        "forget_pp"] == 0.5
    assert [e["alias"] for e in json.loads(tags["arena.alias_history"])] == ["candidate", "champion"]
    by_alias = _get(url, "/api/2.0/mlflow/registered-models/alias", name="tiny-math", alias="champion")
    assert by_alias["model_version"]["version"] == arena["version"]


def test_champion_downloads_over_http_and_is_the_merged_model(server, arena, tmp_path, monkeypatch):
    import mlflow
    from safetensors.torch import load_file

    from peft_arena.tracking import registry as reg

    monkeypatch.setenv("PEFT_ARENA_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(server["url"])
    try:
        resolved = reg.resolve_model_uri("models:/tiny-math@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert resolved.version == arena["version"] and resolved.alias == "champion"
    assert str(tmp_path / "cache") in resolved.local_path  # proxied artifacts: downloaded, not read in place
    weights = load_file(Path(resolved.local_path) / "model.safetensors")
    base = load_file(Path(arena["tiny"]) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert weights[key].shape == base[key].shape and not weights[key].allclose(base[key], atol=1e-3)
    assert (Path(resolved.local_path) / "tokenizer.json").exists()
