"""The whole pipeline through the MLproject entry points on the tiny model, asserting MLflow's contents.

train_sft and evaluate go through `mlflow run . --env-manager local` (the run is created by mlflow and resumed
by the entry point); promote, spectral and report through their entry-point scripts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "arena-pipeline-test"


def _env(store_uri: str) -> dict:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=store_uri, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def mlflow_run(store, entry: str, **params) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", EXPERIMENT]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=600, cwd=_home(store))


def _home(store: str) -> Path:
    """The store's folder: runs started there keep their artifacts and outputs out of the checkout."""
    return Path(store[len("sqlite:///"):]).parent


def entry_point(store, entry: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "entrypoints" / f"{entry}.py"), *args, "--json"]
    return subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=600, cwd=_home(store))


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _runs(stage: str):
    import mlflow

    return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.`arena.stage` = '{stage}'",
                              output_format="list")


@pytest.fixture(scope="module")
def arena(tmp_path_factory, tiny_source):
    """Train LoRA on the tiny model, promote, evaluate by alias, spectral, report: one small arena."""
    import mlflow

    root = tmp_path_factory.mktemp("arena")
    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    _check(mlflow_run(store, "train_sft", adapter="lora", base_model="tiny", max_steps=2, limit=8))
    train = _runs("train_sft")[0]
    _check(entry_point(store, "promote", "--source_run", train.info.run_id))
    _check(mlflow_run(store, "evaluate", model_uri="models:/tiny-math@candidate", suite="demo", limit=2,
                      max_new_tokens=8))
    _check(entry_point(store, "spectral", "--model_uri", "models:/tiny-math/1"))
    _check(entry_point(store, "report", "--output_dir", str(root / "report"), "--include_provisional", "true"))
    yield {"store": store, "train": train}
    mlflow.set_tracking_uri(None)


def test_training_run_has_config_curves_adapter_and_lineage(arena):
    import mlflow

    run = mlflow.get_run(arena["train"].info.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["mlflow.source.type"] == "PROJECT"  # created by `mlflow run`, resumed by the entry point
    assert (tags["arena.stage"], tags["arena.method"], tags["arena.train"], tags["arena.domain"],
            tags["arena.base_model"]) == ("train_sft", "lora", "sft", "math", "tiny")
    assert tags["mlflow.runName"] == "sft-lora-r8a16-math-tiny"
    for lib in ("torch", "transformers", "peft", "trl", "peft_arena"):
        assert tags[f"arena.version.{lib}"]
    assert params["cfg.adapter"] == "lora" and params["method.r"] == "8" and params["cfg.max_steps"] == "2"
    assert metrics["arena/trainable_params"] == 16384  # r8 LoRA on 7 projections x 2 layers of the tiny model
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 2  # the HF MLflowCallback logged the curve into the resumed run
    assert metrics["train/final_loss"] == pytest.approx(history[-1].value, rel=1e-3)
    # one loss name, few metrics, effective params only (no TrainingArguments/model-config dump, no placeholders)
    assert not {"loss", "train_loss", "train/first_loss"} & set(metrics) and len(metrics) <= 100
    assert not {"hub_token", "learning_rate", "per_device_train_batch_size", "vocab_size"} & set(params)
    assert float(params["cfg.lr"]) == pytest.approx(2e-4) and params["cfg.data"] == "math-sample"
    assert len(params) < 80, sorted(params)
    inputs = run.inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["math-sample"] and inputs[0].dataset.digest
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["sft-lora-r8a16-math-tiny"]  # the adapter, named after the run
    assert models[0].tags["arena.artifact_uri"] == f"runs:/{run.info.run_id}/adapter"
    note = tags["mlflow.note.content"]
    assert "lora r8a16" in note and "math-sample" in note and "train/final_loss" in note and "docs/metrics.md" in note
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "adapter/arena_method.json"} <= files


def test_promotion_registered_a_version_with_alias_candidate(arena):
    import mlflow

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("tiny-math", "candidate")
    assert str(version.version) == "1"
    assert version.tags["arena.method"] == "lora" and version.tags["arena.train"] == "sft"
    assert version.tags["arena.source_run"] == arena["train"].info.run_id
    promote = _runs("promote")[0]
    assert promote.data.tags["arena.source_run"] == arena["train"].info.run_id
    assert "models:/tiny-math/1" in promote.data.tags["mlflow.note.content"]
    from peft_arena.tracking.uris import model_id_of

    assert client.get_logged_model(model_id_of(version)).name == "sft-lora-r8a16-math-tiny-merged"


def test_evaluation_by_alias_is_linked_to_the_version_and_scored(arena):
    import mlflow

    evals = [r for r in _runs("evaluate") if r.data.tags.get("arena.is_base") == "false"]
    assert len(evals) == 1
    run = evals[0]
    assert run.data.tags["arena.registered_model"] == "tiny-math"
    assert run.data.tags["arena.model_version"] == "1"
    assert run.data.tags["arena.source_run"] == arena["train"].info.run_id
    assert run.data.tags["arena.samples_only"] == "true" and run.data.tags["arena.provenance"] == "provisional"
    for key in ("score/target_avg", "score/general_avg", "score/target_gain_pp", "score/forget_pp"):
        assert key in run.data.metrics
    # the base model's evaluation is its own run with the same settings key
    bases = [r for r in _runs("evaluate") if r.data.tags.get("arena.is_base") == "true"]
    assert len(bases) == 1
    assert bases[0].data.tags["arena.eval_key"] == run.data.tags["arena.eval_key"]
    assert run.data.tags["arena.base_eval_run"] == bases[0].info.run_id
    # a math model is scored on the math targets only, against the base's math average
    assert run.data.metrics["score/target_avg"] == run.data.metrics["score/target_math_avg"]
    gain = run.data.metrics["score/target_avg"] - bases[0].data.metrics["score/target_math_avg"]
    assert run.data.metrics["score/target_gain_pp"] == pytest.approx(gain, abs=0.011)  # each rounded to 0.01
    forget = max(0.0, bases[0].data.metrics["score/general_avg"] - run.data.metrics["score/general_avg"])
    assert run.data.metrics["score/forget_pp"] == pytest.approx(forget, abs=0.011)
    version = mlflow.MlflowClient().get_model_version("tiny-math", "1")
    # a provisional evaluation (limit=2, samples) is listed on the version but never becomes its scores
    assert "arena.scores" not in version.tags and not any(k.startswith("arena.score.") for k in version.tags)
    history = json.loads(version.tags["arena.eval_history"])
    assert history[-1]["provenance"] == "provisional" and history[-1]["run"] == run.info.run_id
    assert history[-1]["detail"]["math500"].startswith("subset(limit=2)")
    # the version's description says it all in one screen; its tags are few
    assert f"run `{run.info.run_id}` (provisional" in version.description and "candidate" in version.description
    assert len(version.tags) <= 12, sorted(version.tags)  # lineage, eval key, histories, registration
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "results" in files
    # scores to 0.01 pp; the description holds the score table with each benchmark's provenance
    assert all(round(v, 2) == v for k, v in run.data.metrics.items() if k.startswith("score/"))
    note = run.data.tags["mlflow.note.content"]
    assert "score/target_avg" in note and "Provisional scores" in note and bases[0].info.run_id in note
    assert "mlflow.note.content" in bases[0].data.tags


def test_spectral_and_report_runs_carry_metrics_and_plots(arena):
    import mlflow

    client = mlflow.MlflowClient()
    spectral = _runs("spectral")[0]
    assert spectral.data.tags["arena.spectral_input"] == "adapter"
    metrics = spectral.data.metrics
    assert "spectral/all/eff_rank" in metrics and "spectral/self_attn.q_proj/eff_rank" in metrics
    assert len(metrics) <= 100 and not any(k.startswith("spectral/layers.") for k in metrics)
    assert all(float(f"{v:.4g}") == v for v in metrics.values())  # 4 significant digits
    assert "spectral/per_matrix.json" in {a.path for a in client.list_artifacts(spectral.info.run_id, "spectral")}
    assert "spectral/all/eff_rank" in spectral.data.tags["mlflow.note.content"]
    plots = {a.path for a in client.list_artifacts(spectral.info.run_id, "plots")}
    assert "plots/effective_rank.png" in plots
    report = _runs("report")[0]
    files = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.md"} <= files
    assert "lora" in report.data.tags["mlflow.note.content"] and "| " in report.data.tags["mlflow.note.content"]


def test_bad_input_fails_with_one_line_and_a_failed_run(arena):
    import mlflow

    store = arena["store"]
    proc = mlflow_run(store, "train_sft", adapter="nonsense", base_model="tiny")
    assert proc.returncode != 0
    assert "peft-arena: error: unknown method 'nonsense'" in proc.stderr
    proc = mlflow_run(store, "train_sft", adapter="lora", base_model="tiny", max_steps="abc")
    assert proc.returncode != 0 and "max_steps must be int, got 'abc'" in proc.stderr
    proc = mlflow_run(store, "evaluate", model_uri="models:/no-such-model@candidate")
    assert proc.returncode != 0 and "no-such-model" in proc.stderr
    failed = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="attributes.status = 'FAILED'",
                                output_format="list")
    reasons = sorted(r.data.tags.get("arena.error", "") for r in failed)
    assert len(failed) == 3
    assert any("unknown method 'nonsense'" in r for r in reasons)
    assert any("max_steps must be int" in r for r in reasons)
    assert any("no-such-model" in r for r in reasons)
    # nothing half-registered: still exactly one version
    assert len(mlflow.MlflowClient().search_model_versions("name='tiny-math'")) == 1
