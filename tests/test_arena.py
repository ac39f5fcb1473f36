"""The arena sweep on the tiny model: plan and hashes, parent/child runs, failure isolation, resume, dry run,
and a chain process that dies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_arena.config import ConfigError, build_config
from peft_arena.sweep.plan import plan_chains, stage_inputs

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "arena-sweep-test"
SWEEP = {"methods": "lora,bogus", "domains": "med", "train": "sft", "base_model": "tiny", "parallel": "2",
         "gpus": "0,1", "monitor_every": "1", "sft_set": "max_steps=2 limit=8",
         # IFEval + NQ + BBH: the general average (and so the forgetting the monitor is checked against) exists
         "eval_set": "suite=medqa,ifeval,nq,bbh limit=1 max_new_tokens=8", "set": "report_provisional=true"}


def test_plan_chains_hashes_and_refusals():
    cfg = build_config("arena", None, {"methods": "lora,oft", "domains": "math,med", "train": "sft,grpo",
                                       "sft_set": "max_steps=2", "eval_set": "limit=2"})
    chains = plan_chains(cfg)
    assert [c.key for c in chains][:3] == ["sft-lora-math", "sft-oft-math", "sft-lora-med"] and len(chains) == 8
    lora = chains[0]
    assert lora.overrides["train"] == {"adapter": "lora", "domain": "math", "base_model": "smollm2-135m",
                                       "max_steps": "2"}
    assert stage_inputs(lora, "promote", {"train_run": "abc"}) == {"source_run": "abc"}
    assert stage_inputs(lora, "evaluate", {"train_run": "abc", "model_uri": "models:/m/1"}) == {
        "limit": "2", "model_uri": "models:/m/1"}
    assert stage_inputs(lora, "spectral", {"train_run": "abc"}) == {"model_uri": "runs:/abc/adapter"}
    grpo = next(c for c in chains if c.train == "grpo")
    assert "max_steps" not in grpo.overrides["train"]  # sft_set is for SFT trainings only
    # a hash covers what decides the stage: a new evaluation setting keeps the training, changes the evaluation
    again = plan_chains(build_config("arena", None, {"methods": "lora,oft", "domains": "math,med",
                                                     "train": "sft,grpo", "sft_set": "max_steps=2",
                                                     "eval_set": "limit=4"}))[0]
    assert again.hashes["train"] == lora.hashes["train"] and again.hashes["promote"] == lora.hashes["promote"]
    assert again.hashes["evaluate"] != lora.hashes["evaluate"]
    assert len({c.hashes["train"] for c in chains}) == 8
    for bad, message in [({"train": "ppo"}, "unknown train kind"), ({"stages": "promote,evaluate"}, "start with"),
                         ({"stages": "train,deploy"}, "unknown stage"), ({"sft_set": "adapter=oft"}, "may not set"),
                         ({"methods": " , "}, "methods is empty")]:
        with pytest.raises(ConfigError, match=message):
            plan_chains(build_config("arena", None, bad))


def _env(store: str) -> dict:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=store, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _cli(store: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "peft_arena.cli", "arena", *args]
    return subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=900, cwd=home)


def _flags(params: dict) -> list[str]:
    return [a for k, v in params.items() for a in (f"--{k}", v)]


def _runs(store: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_source):
    """A sweep with one good and one unknown method through `mlflow run -e arena`, then the same sweep again."""
    home = tmp_path_factory.mktemp("sweep")
    store = f"sqlite:///{home / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "arena", "--env-manager", "local",
           "--experiment-name", EXPERIMENT]
    for key, value in SWEEP.items():
        cmd += ["-P", f"{key}={value}"]
    first = subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=900, cwd=home)
    after_first = [r.info.run_id for r in _runs(store)]
    plan = _cli(store, home, *_flags(SWEEP), "--dry_run", "--json")
    after_plan = [r.info.run_id for r in _runs(store)]
    second = _cli(store, home, *_flags(SWEEP), "--report", "false")
    yield {"store": store, "home": home, "first": first, "plan": plan, "second": second,
           "after_first": after_first, "after_plan": after_plan, "runs": _runs(store)}
    import mlflow

    mlflow.set_tracking_uri(None)


def _parents(runs):
    return [r for r in runs if r.data.tags.get("arena.stage") == "arena"]


def _artifact(store: str, run_id: str, path: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return json.loads(Path(local).read_text())


def test_failed_chain_fails_alone_and_the_parent_names_it(sweep):
    first = sweep["first"]
    assert first.returncode != 0, "a sweep with a failed chain must exit non-zero"
    assert "sft-bogus-med" in first.stderr
    parent = _parents(sweep["runs"])[0]
    tags = parent.data.tags
    assert parent.info.status == "FAILED"
    assert tags["arena.sweep.failed"] == "sft-bogus-med"
    assert "sft-bogus-med" in tags["arena.error"] and "unknown method 'bogus'" in tags["mlflow.note.content"]
    children = [r for r in sweep["runs"] if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by = {(r.data.tags["arena.sweep.chain"], r.data.tags["arena.stage"]): r for r in children}
    for stage in ("train_sft", "promote", "evaluate", "spectral"):
        run = by[("sft-lora-med", stage)]
        assert run.info.status == "FINISHED", (stage, run.data.tags.get("arena.error"))
        assert len(run.data.tags["arena.sweep.config_hash"]) == 16
    bogus = by[("sft-bogus-med", "train_sft")]
    assert bogus.info.status == "FAILED" and "unknown method" in bogus.data.tags["arena.error"]
    assert not any(k[0] == "sft-bogus-med" and k[1] != "train_sft" for k in by)  # nothing after the failure
    assert by[("report", "report")].info.status == "FINISHED"
    # the lineage runs of the good chain point at its training run
    train_id = by[("sft-lora-med", "train_sft")].info.run_id
    assert by[("sft-lora-med", "evaluate")].data.tags["arena.source_run"] == train_id
    summary = _artifact(sweep["store"], parent.info.run_id, "sweep/summary.json")
    assert summary["failed"] == ["sft-bogus-med"]
    statuses = {c["chain"]: c["status"] for c in summary["chains"]}
    assert statuses == {"sft-lora-med": "finished", "sft-bogus-med": "failed"}
    assert parent.data.metrics["sweep/failed"] == 1 and parent.data.metrics["sweep/stages_run"] == 5
    # two chains at once, each on its own GPU slot (CUDA_VISIBLE_DEVICES; a CPU torch ignores it)
    assert tags["arena.sweep.gpus"] == "0,1" and tags["arena.sweep.parallel"] == "2"
    assert sorted(c["device"] for c in summary["chains"]) == ["0", "1"]


def test_gpu_slots_round_robin(monkeypatch):
    from peft_arena.sweep.execute import chain_env, slot_devices, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus("") == ["2", "3"] and visible_gpus("5, 6") == ["5", "6"]
    assert slot_devices(3, ["2", "3"]) == ["2", "3", "2"] and slot_devices(2, []) == [None, None]
    assert chain_env("7", "3")["CUDA_VISIBLE_DEVICES"] == "3" and chain_env("7", "3")["MLFLOW_EXPERIMENT_ID"] == "7"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus("") == []


def test_monitor_runs_in_the_sweep_and_the_report_overlays_it(sweep):
    parent = _parents(sweep["runs"])[0]
    train = next(r for r in sweep["runs"] if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                 and r.data.tags.get("arena.stage") == "train_sft" and r.info.status == "FINISHED")
    assert train.data.tags["arena.monitor.every"] == "1" and "monitor/general_nll" in train.data.metrics
    report = next(r for r in sweep["runs"] if r.data.tags.get("arena.stage") == "report")
    import mlflow

    names = {a.path for a in mlflow.MlflowClient().list_artifacts(report.info.run_id)}
    assert {"monitor_med.png", "monitor_trust.md", "monitor_trust.json"} <= names
    trust = _artifact(sweep["store"], report.info.run_id, "monitor_trust.json")
    nll = trust["stats"][0]
    assert nll["n"] == 1 and nll["spearman_rho"] is None  # one evaluated monitored run: no correlation claimed
    assert report.data.metrics["report/monitor_trust_n"] == 1


def test_dry_run_prints_the_plan_and_creates_no_run(sweep):
    plan = sweep["plan"]
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert sweep["after_plan"] == sweep["after_first"]
    out = json.loads(plan.stdout)
    rows = {r["chain"]: r for r in out["plan"]}
    assert [s["action"] for s in rows["sft-lora-med"]["stages"]] == ["reuse"] * 4
    assert rows["sft-bogus-med"]["stages"][0]["action"] == "retry"
    assert "unknown method 'bogus'" in rows["sft-bogus-med"]["stages"][0]["previous"]["error"]
    assert "warning: unknown method(s) bogus" in plan.stderr + plan.stdout


def test_rerun_reuses_finished_stages_and_retries_the_failed_chain(sweep):
    second = sweep["second"]
    assert second.returncode != 0
    first_parent, second_parent = _parents(sweep["runs"])
    assert second_parent.data.metrics["sweep/stages_reused"] == 4
    assert second_parent.data.metrics["sweep/stages_run"] == 1
    children = [r for r in sweep["runs"] if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id]
    assert [(r.data.tags["arena.sweep.chain"], r.data.tags["arena.stage"], r.info.status) for r in children] == [
        ("sft-bogus-med", "train_sft", "FAILED")]
    summary = _artifact(sweep["store"], second_parent.info.run_id, "sweep/summary.json")
    lora = next(c for c in summary["chains"] if c["chain"] == "sft-lora-med")
    first_children = {r.data.tags["arena.stage"]: r.info.run_id for r in sweep["runs"]
                      if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id
                      and r.data.tags.get("arena.sweep.chain") == "sft-lora-med"}
    assert [(s["status"], s["run_id"]) for s in lora["stages"]] == [
        ("reused", first_children[s]) for s in ("train_sft", "promote", "evaluate", "spectral")]


def test_a_chain_process_that_dies_fails_its_running_runs(mlflow_store, tmp_path):
    import mlflow

    from peft_arena.sweep.execute import run_process
    from peft_arena.tracking import sweep as tracking

    mlflow.set_experiment("dead-chain")
    with mlflow.start_run() as parent:
        pass
    experiment = parent.info.experiment_id
    left = tracking.create_child_run(parent.info.run_id, experiment, "train_sft", "sft-lora-math", "0" * 16)
    # a spec the chain process cannot read: it dies before recording an outcome
    outcome = run_process({"chain": {"broken": True}, "parent_run_id": parent.info.run_id,
                           "experiment_id": experiment}, tmp_path, "sft-lora-math", None)
    assert outcome["status"] == "failed" and "exited with code 1" in outcome["error"]
    assert outcome["ended_runs"] == [left]
    run = mlflow.get_run(left)
    assert run.info.status == "FAILED" and "before recording its outcome" in run.data.tags["arena.error"]
