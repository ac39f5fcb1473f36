"""Multi-process training through `accelerate launch` (2 processes, gloo on this CPU machine, tiny model).

The 2-process job must behave like one process seeing the same global batch: one MLflow run (FINISHED, written by
rank 0 only), the same loss curve within 1e-4 relative, the global token count, and one adapter artifact (written
by rank 0) with the same weights. FSDP and DeepSpeed run only on GPUs under accelerate: here they must be refused
before any worker starts (on CPU accelerate would quietly run plain data parallel instead). The team-mode test
starts a 2-process job through `mlflow run -P num_processes=2`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOSS_RTOL = 1e-4  # measured: 2-process and 1-process losses agree to ~1e-7 (float32 reduction order)
COMMON = {"base_model": "tiny", "limit": "16", "max_steps": "4", "lr": "1e-3", "method.dropout": "0"}


def _cli(args: list[str], cwd: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "peft_arena.cli", *args, "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_two_processes_match_one_process(mlflow_store, tmp_path, tiny_source):
    import mlflow
    from safetensors.torch import load_file

    from peft_arena.cli import run_stage

    # one process, batch 4
    single = run_stage("train_sft", None, {**COMMON, "batch_size": 4, "run_name": "single"})
    # two processes (data parallel, gloo), batch 2 each: the same global batch of 4
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    args = ["train-sft", "--batch_size", "2", "--num_processes", "2", "--distributed", "ddp",
            "--run_name", "two", "--output_dir", "multi"] + [x for k, v in COMMON.items() for x in (f"--{k}", v)]
    multi = _cli(args, tmp_path, env)

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["single", "two"]  # one run for the 2-process job
    run = client.get_run(multi["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["arena.num_processes"], tags["arena.distributed"]) == ("2", "MULTI_CPU")

    one = [m.value for m in sorted(client.get_metric_history(single["run_id"], "train/loss"), key=lambda m: m.step)]
    two = [m.value for m in sorted(client.get_metric_history(multi["run_id"], "train/loss"), key=lambda m: m.step)]
    assert len(one) == len(two) == 4  # each step logged once (rank 0), not once per process
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert single["losses"] == pytest.approx(one)
    # metrics of the global batch: the token count is both processes' tokens
    tokens = client.get_run(single["run_id"]).data.metrics["train/num_tokens"]
    assert run.data.metrics["train/num_tokens"] == tokens

    # one adapter: logged once (rank 0), with the weights one process trains
    logged = [f.path for f in client.list_artifacts(multi["run_id"], "adapter")]
    assert sorted(logged).count("adapter/adapter_model.safetensors") == 1
    weights, reference = (
        load_file(Path(mlflow.artifacts.download_artifacts(run_id=r, artifact_path="adapter", dst_path=str(tmp_path / r)))
                  / "adapter_model.safetensors")
        for r in (multi["run_id"], single["run_id"]))
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        assert weights[key].shape == value.shape
        assert weights[key].allclose(value, rtol=1e-3, atol=1e-6), key


def test_sharded_engines_are_refused_on_cpu_before_launch_and_run_ends_failed(mlflow_store, tmp_path):
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "peft_arena.cli", "train-sft", "--base_model", "tiny",
                           "--num_processes", "2", "--distributed", "fsdp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peft-arena: error:") and "needs GPUs" in last
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and "use distributed=ddp" in run.data.tags["arena.error"]


def test_strategy_checks():
    from peft_arena.methods import get_method
    from peft_arena.training import distributed

    assert distributed.distributed_type("fsdp") == "FSDP" and distributed.distributed_type("deepspeed") == "DEEPSPEED"
    distributed.check_strategy("fsdp", get_method("lora"), cuda=True)
    distributed.check_strategy("fsdp", get_method("full"), cuda=True)
    distributed.check_strategy("ddp", get_method("pissa"), cuda=False)
    for method in ("pissa", "milora", "keeplora"):  # saved from the live unsharded model
        with pytest.raises(ValueError, match="use distributed=ddp"):
            distributed.check_strategy("fsdp", get_method(method), cuda=True)
    with pytest.raises(ValueError, match="accelerate config YAML"):
        distributed.config_file("zero9")
    cmd = distributed.launch_command("train-sft", ["--num_processes", "2"], 2, "deepspeed")
    assert cmd[cmd.index("--deepspeed_config_file") + 1].endswith("deepspeed_zero3.json")
    assert cmd[-4:] == ["peft_arena.cli", "train-sft", "--num_processes", "2"]
