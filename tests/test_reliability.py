"""Reliability probes (issue 15): every hostile input and fault found so far, kept as a regression test.

Each test is one probe, marked ``@probe(area, fault)``: it feeds the fault in and asserts that it is *handled*
(refused before it costs anything with a one-line error, or ended FAILED with the reason in ``arena.error``,
or cleaned up, with nothing half-done left behind). ``tests/conftest.py`` counts the probes and prints the
figures at the end of the session::

    ===== reliability probes =====
      registry      12 / 12  handled
      ...
    probes tried: 40, handled: 40

Areas (one section each below, so that additions merge cleanly):
  ``inputs``    bad settings refused up front (numbers, paths, names)           — training side
  ``training``  divergence, non-finite loss/grad norm, checkpoints and resume    — training side
  ``runs``      a run whose process died does not stay RUNNING (heartbeat, ``peft-arena doctor``)
  ``registry``  promote gates, atomic registration, concurrency of model creation, aliases, base evaluation
  ``stages``    spectral without an update, ``report`` on any subset of benchmarks
  ``disk``      local output copies and the download cache are pruned

Keep every probe small: the tiny model (``peft_arena.models.ensure_tiny``), a sqlite store in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from servers import free_port, running_server

probe = pytest.mark.probe
REPO = Path(__file__).resolve().parents[1]


def _failed_stage(stage: str, overrides: dict, match: str):
    """Run a stage that must refuse its input; return its MLflow run (asserted FAILED with the reason)."""
    import mlflow

    from peft_arena.cli import run_stage

    with pytest.raises(Exception, match=match):
        run_stage(stage, None, overrides)
    run = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"], max_results=1,
                             output_format="list")[0]
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags.get("arena.error"), "a FAILED run carries its reason in arena.error"
    return run


# ================================================================================================ inputs


@probe("inputs", "unknown method name")
def test_unknown_method_is_refused_with_a_failed_run(mlflow_store):
    run = _failed_stage("train_sft", {"adapter": "no-such-method", "base_model": "tiny"}, "no-such-method")
    assert "no-such-method" in run.data.tags["arena.error"]


_BAD_SETTINGS = [
    ("train_sft", {"batch_size": "0"}, "batch_size must be at least 1, got 0"),
    ("train_sft", {"grad_accum": "0"}, "grad_accum must be at least 1, got 0"),
    ("train_sft", {"epochs": "-1"}, "epochs must be greater than 0, got -1.0"),
    ("train_sft", {"warmup_ratio": "5"}, r"warmup_ratio must be in \[0, 1\), got 5.0"),
    ("train_sft", {"lr": "-1e-4"}, "lr must be at least 0, got -0.0001"),
    ("train_sft", {"lr": "nan"}, "lr must be a finite number, got nan"),
    ("train_sft", {"max_grad_norm": "0"}, "max_grad_norm must be greater than 0"),
    ("train_sft", {"save_steps": "-2"}, "save_steps must be at least -1"),
    ("train_sft", {"seed": "-1"}, r"seed must be in \[0, 4.29497e\+09\], got -1"),
    ("train_grpo", {"max_steps": "0"}, "max_steps must be at least 1, got 0"),
    ("train_grpo", {"grpo.num_generations": "1"}, "grpo.num_generations must be at least 2, got 1"),
    ("train_grpo", {"grpo.temperature": "0"}, "grpo.temperature must be greater than 0"),
    ("train_grpo", {"grpo.top_p": "1.5"}, r"grpo.top_p must be in \(0, 1\]"),
    ("evaluate", {"limit": "-1"}, "limit must be at least 0, got -1"),
    ("evaluate", {"batch_size": "-1"}, "batch_size must be at least 0, got -1"),  # 0 = auto
    ("evaluate", {"gpu_memory_utilization": "1.5"}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ("evaluate", {"data_dir": "/no/such/folder"}, "data_dir '/no/such/folder' is not an existing folder"),
    ("spectral", {"model_uri": "tiny", "top_k": "0"}, "top_k must be at least 1"),
]


@probe("inputs", "numeric setting out of range / missing data_dir")
@pytest.mark.parametrize("stage, overrides, message", _BAD_SETTINGS,
                         ids=[f"{s}-{next(iter(o))}={next(iter(o.values()))}" for s, o, _ in _BAD_SETTINGS])
def test_bad_settings_are_refused_up_front_with_one_line(stage, overrides, message):
    """config.RULES, checked as the config is built: before any model or data is loaded, in one line."""
    from peft_arena.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message) as err:
        build_config(stage, None, {"base_model": "tiny", **overrides})
    assert "\n" not in str(err.value)


@probe("inputs", "batch_size=0 / evaluate limit=-1 through the stage: FAILED run, nothing loaded")
@pytest.mark.parametrize("stage, overrides, message", [
    ("train_sft", {"batch_size": "0", "base_model": "tiny"}, "batch_size must be at least 1, got 0"),
    ("evaluate", {"limit": "-1", "model_uri": "tiny"}, "limit must be at least 0, got -1"),
])
def test_bad_setting_ends_the_run_failed_with_the_reason(mlflow_store, stage, overrides, message):
    run = _failed_stage(stage, overrides, message)
    assert run.data.tags["arena.error"].startswith("ConfigError: ")
    assert message in run.data.tags["arena.error"] and "\n" not in run.data.tags["arena.error"]


@probe("inputs", "PEFT_ARENA_DATA_DIR naming a missing folder")
def test_missing_data_dir_from_the_environment_is_refused(monkeypatch):
    from peft_arena.evaluation.data import BenchmarkDataError, local_copy

    monkeypatch.setenv("PEFT_ARENA_DATA_DIR", "/no/such/folder")
    with pytest.raises(BenchmarkDataError, match=r"\$PEFT_ARENA_DATA_DIR /no/such/folder is not an existing folder"):
        local_copy("math/math500.jsonl", None, None)


@probe("inputs", "model or tokenizer with remote code")
def test_models_and_tokenizers_load_with_trust_remote_code_false(monkeypatch, tiny_source):
    """Every loader passes trust_remote_code=False: transformers then refuses remote code instead of prompting."""
    import transformers

    from peft_arena import models
    from peft_arena.methods import ops

    seen = []
    for cls_name, method in (("AutoTokenizer", "from_pretrained"), ("AutoModelForCausalLM", "from_pretrained"),
                             ("AutoConfig", "from_pretrained"), ("AutoModelForCausalLM", "from_config")):
        cls = getattr(transformers, cls_name)

        def wrapped(*args, _real=getattr(cls, method), _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "unset")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, method, wrapped)
    models.load_tokenizer(tiny_source)
    models.load_model(tiny_source)
    models.base_config(tiny_source)
    ops.count_params(tiny_source, "lora", {})
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoModelForCausalLM", "AutoConfig"}
    assert all(flag is False for _, flag in seen), seen


# ================================================================================================ training


# The training probes train the tiny model for a few steps; resume is checked bit for bit against an uninterrupted
# run with the same seed (adapter tensors) and on MLflow's metric history (one point per step, same values).
_SFT = {"base_model": "tiny", "limit": "16", "batch_size": "2", "max_steps": "8", "save_steps": "2"}
_REPO = Path(__file__).resolve().parent.parent


def _trained_tensors(run_id: str) -> dict:
    import mlflow
    from safetensors.torch import load_file

    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter"))
    return load_file(folder / "adapter_model.safetensors")


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _assert_same_training(resumed: str, reference: str, keys: tuple[str, ...], steps: int) -> None:
    a, b = _trained_tensors(resumed), _trained_tensors(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch_equal(a[name], b[name]), f"{name} differs after resume"
    for key in keys:
        got = _history(resumed, key)
        assert [s for s, _ in got] == list(range(1, steps + 1)), f"{key}: steps {[s for s, _ in got]}"
        assert got == _history(reference, key), f"{key}: values differ from the uninterrupted run"


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def _subprocess_env(store: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _kill_after(cmd: list[str], store: str, metric: str, step: int, checkpoint: int, timeout: float = 400) -> str:
    """Start a training, kill -9 it once ``metric`` reached ``step`` and checkpoint ``checkpoint`` exists."""
    import mlflow

    client = mlflow.MlflowClient()
    proc = subprocess.Popen(cmd, env=_subprocess_env(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training ended (rc {proc.returncode}) before it could be killed: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          "attributes.status = 'RUNNING'"):
                done = int(run.data.tags.get("arena.checkpoint_step", 0))
                if done >= checkpoint and max((s for s, _ in _history(run.info.run_id, metric)), default=0) >= step:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return run.info.run_id
            time.sleep(0.05)
        pytest.fail("training was not killed in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@probe("training", "kill -9 mid-SFT, then mlflow run -P resume=<run_id>")
def test_sft_killed_then_resumed_by_mlflow_run_equals_an_uninterrupted_run(mlflow_store):
    """A real kill -9 after checkpoint 2 and at least 3 logged steps; `mlflow run ... -P resume=ID` continues in the
    same run from its last checkpoint: the adapter equals an uninterrupted run's, no metric point lost or doubled."""
    import mlflow

    from peft_arena.cli import run_stage

    reference = run_stage("train_sft", None, dict(_SFT))["run_id"]
    killed = _kill_after([sys.executable, "-m", "peft_arena.cli", "train-sft",
                          *[a for k, v in _SFT.items() for a in (f"--{k}", v)]], mlflow_store, "train/loss", 3, 2)
    client = mlflow.MlflowClient()
    assert client.get_run(killed).info.status == "RUNNING"  # what the dead process left
    cmd = [sys.executable, "-m", "mlflow", "run", str(_REPO), "-e", "train_sft", "--env-manager", "local",
           "-P", f"resume={killed}", *[a for k, v in _SFT.items() for a in ("-P", f"{k}={v}")]]
    proc = subprocess.run(cmd, env=_subprocess_env(mlflow_store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = client.get_run(killed)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["arena.resumed_from_step"]) >= 2
    _assert_same_training(killed, reference, ("train/loss", "train/grad_norm", "train/learning_rate"), 8)
    for key in ("arena/trainable_params", "train/final_loss"):
        assert len(_history(killed, key)) == 1, key
    # the run mlflow run created for the resume holds nothing but the pointer, and no arena.stage
    launchers = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   f"tags.`arena.resumed_into` = '{killed}'")
    assert len(launchers) == 1 and "arena.stage" not in launchers[0].data.tags
    assert not launchers[0].data.metrics and not client.list_artifacts(launchers[0].info.run_id)
    assert not list(Path(run.data.tags["arena.checkpoint_dir"]).glob("checkpoint-*"))  # pruned once finished


class _Crash(RuntimeError):
    pass


def _length_reward(crash_at: int | None):
    """A reward with variance on the tiny model (its completions are never correct); optionally the process
    'dies' inside the reward computation of the ``crash_at``-th generation round."""
    calls = {"n": 0}

    def correctness(completions, **kwargs):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise _Crash(f"simulated crash in generation round {crash_at}")
        return [len(str(c)) / 100.0 for c in completions]

    return lambda domain: correctness


@probe("training", "GRPO dies mid-run, then --resume RUN_ID")
def test_grpo_crashed_then_resumed_equals_an_uninterrupted_run(mlflow_store, monkeypatch):
    import mlflow

    from peft_arena.cli import run_stage
    from peft_arena.training import grpo

    grpo_settings = {"base_model": "tiny", "limit": "4", "max_steps": "4", "save_steps": "2",
                     "grpo.num_generations": "2", "grpo.prompts_per_generation": "1",
                     "grpo.max_completion_length": "8", "grpo.log_completions_every": "0"}
    monkeypatch.setattr(grpo, "correctness_reward", _length_reward(None))
    reference = run_stage("train_grpo", None, dict(grpo_settings))["run_id"]
    monkeypatch.setattr(grpo, "correctness_reward", _length_reward(4))  # dies in step 4: checkpoint 2, 3 logged
    with pytest.raises(_Crash):
        run_stage("train_grpo", None, dict(grpo_settings))
    crashed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FAILED'",
                                 output_format="list")[0].info.run_id
    assert [s for s, _ in _history(crashed, "train/reward")] == [1, 2, 3]
    monkeypatch.setattr(grpo, "correctness_reward", _length_reward(None))
    run_stage("train_grpo", None, {}, resume=crashed)  # `--resume ID` alone: the run's own settings
    run = mlflow.MlflowClient().get_run(crashed)
    assert run.info.status == "FINISHED" and run.data.tags["arena.resumed_from_step"] == "2"
    assert "arena.error" not in run.data.tags and "simulated crash" in run.data.tags["arena.resumed_after_error"]
    assert any(v.abs().max() > 0 for k, v in _trained_tensors(crashed).items() if "lora_B" in k)  # it did learn something
    _assert_same_training(crashed, reference, ("train/reward", "train/loss", "train/grad_norm"), 4)


@probe("training", "resume of a finished, unknown or other-stage run, or with other settings")
def test_resume_refuses_what_it_cannot_continue(mlflow_store):
    import mlflow

    from peft_arena.cli import run_stage
    from peft_arena.config import ConfigError
    from peft_arena.tracking.runs import ResumeError

    client = mlflow.MlflowClient()
    exp = client.create_experiment("resume-probe")

    def fake_run(stage: str, status: str) -> str:
        run = client.create_run(exp, tags={"arena.stage": stage})
        client.log_param(run.info.run_id, "cfg.adapter", "oft")
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    with pytest.raises(ResumeError, match="already FINISHED"):
        run_stage("train_sft", None, {}, resume=fake_run("train_sft", "FINISHED"))
    with pytest.raises(ResumeError, match="no such run"):
        run_stage("train_sft", None, {}, resume="0123456789abcdef0123456789abcdef")
    with pytest.raises(ResumeError, match="it is a run of stage evaluate"):
        run_stage("train_sft", None, {}, resume=fake_run("evaluate", "FAILED"))
    dead = fake_run("train_sft", "RUNNING")
    with pytest.raises(ConfigError, match="has adapter='oft', not 'lora'"):
        run_stage("train_sft", None, {"adapter": "lora", "base_model": "tiny"}, resume=dead)
    assert client.get_run(dead).info.status == "FAILED"  # the refusal is recorded on the run itself


@probe("training", "save_steps auto rule")
def test_save_steps_auto_is_off_for_tiny_runs_and_every_5_percent_otherwise():
    from peft_arena.training.checkpoints import resolve_save_steps

    assert [resolve_save_steps(-1, n) for n in (4, 49, 50, 200, 1000, 5000)] == [0, 0, 10, 10, 50, 250]
    assert resolve_save_steps(0, 1000) == 0 and resolve_save_steps(7, 10) == 7


@probe("training", "NaN/inf loss or grad norm, loss diverging from its minimum")
def test_divergence_rule():
    from peft_arena.training.guards import DivergenceRule, TrainingDiverged

    rule = DivergenceRule(factor=4.0, patience=3)
    for step, loss in enumerate([3.0, 2.0, 9.0, 1.5, 7.0, 7.0], start=1):  # spikes that recover are fine
        rule.check(step, {"loss": loss, "grad_norm": 1.0}, lr=1e-4)
    with pytest.raises(TrainingDiverged, match="loss 7 stayed above 4 × its minimum 1.5 for 3 logged steps"):
        rule.check(7, {"loss": 7.0}, lr=1e-4)
    for logs in ({"loss": float("nan")}, {"grad_norm": float("inf")}, {"loss": 1.0, "grad_norm": float("nan")}):
        with pytest.raises(TrainingDiverged, match="is (nan|inf)"):
            DivergenceRule(4.0, 3).check(1, logs, lr=1e38)


@probe("training", "lr=1e38 / lr=1e6 (SFT) and lr=1e6 (GRPO)")
@pytest.mark.parametrize("stage, lr", [("train_sft", "1e38"), ("train_sft", "1e6"), ("train_grpo", "1e6")])
def test_exploding_learning_rate_ends_failed_without_an_adapter(mlflow_store, stage, lr):
    import mlflow

    settings = ({"limit": "8", "batch_size": "2", "max_steps": "4"} if stage == "train_sft" else
                {"limit": "4", "max_steps": "4", "grpo.num_generations": "2", "grpo.prompts_per_generation": "1",
                 "grpo.max_completion_length": "8"})
    run = _failed_stage(stage, {"base_model": "tiny", "lr": lr, **settings}, "training diverged")
    assert run.data.tags["arena.error"].startswith("TrainingDiverged: training diverged")
    assert "lower the learning rate" in run.data.tags["arena.error"]
    assert not [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")]
    assert not (Path(".arena/outputs") / run.info.run_id / "adapter").exists()


# ================================================================================================ runs
# A run whose process died must not stay RUNNING: its heartbeat lease tells, and `peft-arena doctor` (run cheaply
# before every stage command) ends it FAILED with the reason in arena.error.


def _spawn(code: str, env: dict | None = None) -> subprocess.Popen:
    """A Python child process against the current store (its stdout is read line by line)."""
    full = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            env=full, cwd=os.getcwd())


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@probe("runs", "kill -9 of a stage process: the next peft-arena command ends its run FAILED")
def test_killed_stage_run_is_ended_by_the_next_command(mlflow_store, capsys):
    import mlflow

    from peft_arena import cli

    victim = _spawn("""
        import time
        from peft_arena.tracking.runs import arena_run
        with arena_run("train_sft") as tracker:
            print(tracker.run_id, flush=True)
            time.sleep(600)
    """)
    run_id = victim.stdout.readline().strip()
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    heartbeat = json.loads(mlflow.get_run(run_id).data.tags["arena.heartbeat"])
    assert heartbeat["pid"] == victim.pid
    _kill9(victim)
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # what the issue found: RUNNING forever
    # any stage command sweeps first; this one then fails on its own missing argument
    assert cli.main(["promote"]) != 0
    run = mlflow.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "process died" in run.data.tags["arena.error"] and f"pid {victim.pid}" in run.data.tags["arena.error"]
    assert f"run {run_id}" in capsys.readouterr().err


def _run_with_beat(client, experiment_id: str, beat: dict | None, stage: str = "evaluate") -> str:
    run = client.create_run(experiment_id, tags={"arena.stage": stage})
    if beat is not None:
        client.set_tag(run.info.run_id, "arena.heartbeat", json.dumps(beat))
    return run.info.run_id


@probe("runs", "doctor: lease expired on another host / fresh lease / reused pid / no heartbeat")
def test_doctor_judges_leases(mlflow_store, capsys):
    import mlflow

    from peft_arena import cli
    from peft_arena.tracking.heartbeat import identity

    client = mlflow.MlflowClient()
    exp = mlflow.create_experiment("leases")
    now = time.time()
    far = {"host": "elsewhere", "pid": 4242, "pidns": "", "start": "", "every": 30}
    expired = _run_with_beat(client, exp, {**far, "at": now - 1000})
    fresh = _run_with_beat(client, exp, {**far, "at": now - 5})
    me = {**identity(), "every": 30}
    alive_here = _run_with_beat(client, exp, {**me, "at": now - 10_000})  # old beat, but the process is alive
    reused_pid = _run_with_beat(client, exp, {**me, "start": "1", "at": now})  # same pid, another process
    no_beat = _run_with_beat(client, exp, None)
    assert cli.main(["doctor", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert {e["run_id"] for e in planned["dead_runs"]} == {expired, reused_pid}
    assert client.get_run(expired).info.status == "RUNNING"  # a dry run changes nothing
    assert cli.main(["doctor", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert {e["run_id"] for e in done["dead_runs"]} == {expired, reused_pid}
    assert no_beat in {e["run_id"] for e in done["unjudged_runs"]}
    status = {r: client.get_run(r).info.status for r in (expired, fresh, alive_here, reused_pid, no_beat)}
    assert status == {expired: "FAILED", fresh: "RUNNING", alive_here: "RUNNING", reused_pid: "FAILED",
                      no_beat: "RUNNING"}
    error = client.get_run(expired).data.tags["arena.error"]
    assert "stopped beating" in error and "lease 150 s" in error
    info = client.get_run(expired).info  # ended at its last beat (not before it started)
    assert info.end_time == max(int((now - 1000) * 1000), info.start_time)


@probe("runs", "a stage run beats while it works and stops beating when it ends")
def test_heartbeat_is_renewed_while_the_stage_runs(mlflow_store, monkeypatch):
    import mlflow

    from peft_arena.tracking.runs import arena_run

    monkeypatch.setenv("PEFT_ARENA_HEARTBEAT_S", "0.2")
    with arena_run("evaluate") as tracker:
        first = json.loads(mlflow.get_run(tracker.run_id).data.tags["arena.heartbeat"])["at"]
        time.sleep(1.0)
        second = json.loads(mlflow.get_run(tracker.run_id).data.tags["arena.heartbeat"])["at"]
    assert second > first
    assert mlflow.get_run(tracker.run_id).info.status == "FINISHED"


# ================================================================================================ registry
# promote's gates (FINISHED run, complete adapter, finite merge fidelity within a bound), atomic registration
# (a killed promote is cleaned up), concurrent model creation and alias moves, one base evaluation under concurrency.


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one promoted version of a tiny LoRA (``tiny-math`` v1, alias candidate)."""
    import mlflow

    from peft_arena.models import ensure_tiny

    root = tmp_path_factory.mktemp("reliability-store")
    uri = f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "reliability")
    mp.setenv("PEFT_ARENA_CACHE", str(root / "cache"))
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("reliability", artifact_location=(root / "mlartifacts").as_uri())
    info = {"root": root, "uri": uri, "experiment": exp, "tiny": ensure_tiny()}
    info["train_run"] = _training_run(info)
    _promote(info["train_run"])
    yield info
    mlflow.set_tracking_uri(None)
    mp.undo()


def _adapter(store, seed: int = 0, mutate=None) -> Path:
    """A LoRA on the tiny model with non-zero B (merging changes the weights); ``mutate(state_dict)`` damages it."""
    import torch
    from safetensors.torch import load_file, save_file

    from peft_arena.methods import ops
    from peft_arena.models import load_model, load_tokenizer

    model, options = ops.build(load_model(str(store["tiny"])), "lora")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = store["root"] / f"adapter-{seed}-{mutate.__name__ if mutate else 'ok'}"
    ops.save_trained(model, "lora", options, out, base_model="tiny", base_source=str(store["tiny"]),
                     tokenizer=load_tokenizer(str(store["tiny"])))
    if mutate is not None:
        weights = load_file(out / "adapter_model.safetensors")
        save_file(mutate(weights), out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _training_run(store, adapter: Path | None = None, status: str = "FINISHED", error: str = "") -> str:
    """A train_sft run holding ``adapter`` (default: a fresh good one), ended with ``status``."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(store["experiment"], tags={
        "arena.stage": "train_sft", "arena.method": "lora", "arena.method_label": "r8", "arena.domain": "math",
        "arena.base_model": "tiny", "arena.base_source": str(store["tiny"]), "arena.train": "sft",
        **({"arena.error": error} if error else {})})
    client.log_artifacts(run.info.run_id, str(adapter or _adapter(store)), "adapter")
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _promote(source_run: str, **overrides) -> dict:
    from peft_arena.cli import run_stage

    return run_stage("promote", None, {"source_run": source_run, **overrides})


def _registry_state(name: str = "tiny-math") -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    return {"versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")),
            "aliases": {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}}


def _last_run(stage: str):
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`arena.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")[0]


def _renamed_lora_a(weights):
    return {k.replace("lora_A", "lora_X"): v for k, v in weights.items()}


def _nan_weights(weights):
    return {k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in weights.items()}


@probe("registry", "promote refuses: FAILED training run / renamed lora_A keys / NaN adapter / fidelity over bound")
@pytest.mark.parametrize("fault", ["failed_run", "renamed_lora_a", "nan_adapter", "fidelity_bound"])
def test_promote_gates_refuse_and_leave_nothing_behind(store, fault):
    import mlflow

    before = _registry_state()
    logged_before = len(mlflow.search_logged_models(experiment_ids=[store["experiment"]], output_format="list"))
    overrides, match = {}, ""
    if fault == "failed_run":
        source, match = _training_run(store, status="FAILED", error="RuntimeError: loss diverged"), "not FINISHED"
    elif fault == "renamed_lora_a":
        source, match = _training_run(store, _adapter(store, 1, _renamed_lora_a)), "does not load completely"
    elif fault == "nan_adapter":
        source, match = _training_run(store, _adapter(store, 2, _nan_weights)), "not finite|NaNs detected"
    else:
        source, match = _training_run(store), "changed the logits by"
        overrides = {"max_merge_logit_diff": 1e-12}  # a float32 merge moves logits by ~1e-7: over this bound
    with pytest.raises(Exception, match=match):
        _promote(source, **overrides)
    run = _last_run("promote")
    assert run.info.status == "FAILED" and run.data.tags["arena.error"]
    assert _registry_state() == before  # no version, alias untouched
    assert len(mlflow.search_logged_models(experiment_ids=[store["experiment"]], output_format="list")) \
        == logged_before


_KILL_AT = {  # where the promote process dies: (module, attribute) wrapped to call through, then SIGKILL itself
    "after_logging": ("mlflow.transformers", "log_model"),  # merged model logged, nothing registered yet
    "after_alias_move": ("peft_arena.tracking.aliases", "move_alias"),  # version READY, alias moved, not complete
}


@probe("registry", "kill -9 during promote: the half-done version is never usable and the next command cleans up")
@pytest.mark.parametrize("where", list(_KILL_AT))
def test_killed_promote_is_cleaned_up_by_the_next_command(store, capsys, where):
    import mlflow

    from peft_arena import cli
    from peft_arena.tracking import registry as reg

    before = _registry_state()
    source = _training_run(store)
    module, attribute = _KILL_AT[where]
    victim = _spawn(f"""
        import importlib, os, signal
        from peft_arena import cli
        target = importlib.import_module("{module}")
        real = getattr(target, "{attribute}")
        def call_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(target, "{attribute}", call_then_die)
        cli.main(["promote", "--source_run", "{source}"])
    """)
    victim.wait(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    promote = _last_run("promote")
    assert promote.info.status == "RUNNING"
    if where == "after_alias_move":
        half = _registry_state()
        new = max(half["versions"])
        assert half["aliases"]["candidate"] == str(new) and new not in before["versions"]
        with pytest.raises(reg.RegistryError, match="not registered completely"):
            reg.resolve_model_uri("models:/tiny-math@candidate")  # never visible as usable
    assert cli.main(["doctor"]) == 0
    printed = capsys.readouterr().out
    assert f"run {promote.info.run_id} (promote)" in printed
    assert _registry_state() == before  # no new version; candidate back on its previous holder
    promote = mlflow.get_run(promote.info.run_id)
    assert promote.info.status == "FAILED" and "process died" in promote.data.tags["arena.error"]
    assert not mlflow.search_logged_models(experiment_ids=[store["experiment"]], output_format="list",
                                           filter_string=f"source_run_id = '{promote.info.run_id}'")


# transformers/peft model construction is not thread-safe (loading patches module construction process-wide:
# concurrent threads get "Cannot copy out of meta tensor" or garbage weights). The stages run in separate processes in
# real use; the thread-based probes below hold this gate over the model work, so what races is the store work only.
_MODEL_WORK = threading.RLock()


def _gated(fn):
    def call(*args, **kwargs):
        with _MODEL_WORK:
            return fn(*args, **kwargs)
    return call


@probe("registry", "4 concurrent first promotions into a new model name all succeed, alias history consistent")
def test_concurrent_first_promotions(store, monkeypatch):
    """Four promotions (threads, each its own MLflow run; the registry lock is an fcntl lock per open file, so
    threads contend for it exactly as processes do): merge and logging one at a time, then all four line up at the
    registry step (model creation, version, alias move and history) so that they really race there."""
    import mlflow

    from peft_arena.stages import promote
    from peft_arena.tracking import registration
    from peft_arena.tracking import registry as reg

    n = 4
    sources = [_training_run(store) for _ in range(n)]
    line_up = threading.Barrier(n, timeout=600)
    real_lock, real_promote = registration.store_lock, promote.run_promote

    def promote_holding_the_gate(*args, **kwargs):
        _MODEL_WORK.acquire()
        try:
            return real_promote(*args, **kwargs)
        finally:
            if _MODEL_WORK._is_owned():
                _MODEL_WORK.release()

    def lock_after_line_up(key, *args, **kwargs):  # the model work is done: let the next thread merge, then race
        if _MODEL_WORK._is_owned():
            _MODEL_WORK.release()
        line_up.wait()
        return real_lock(key, *args, **kwargs)

    monkeypatch.setattr(promote, "run_promote", promote_holding_the_gate)
    monkeypatch.setattr(registration, "store_lock", lock_after_line_up)
    errors = []

    def promote(src: str) -> None:
        try:
            _promote(src, domain="race")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(src,)) for src in sources]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    state = _registry_state("tiny-race")
    assert state["versions"] == list(range(1, n + 1))
    sets, removed = {}, {}
    for v in state["versions"]:
        for entry in reg.alias_history("tiny-race", v):
            assert entry["alias"] == "candidate"
            if entry["action"] == "set":
                sets[v] = entry["replaced_version"]
            else:
                removed[v] = removed.get(v, 0) + 1
    assert set(sets) == set(state["versions"])  # no lost 'set' entry
    replaced = [r for r in sets.values() if r is not None]
    assert len(replaced) == len(set(replaced)) == n - 1  # no two versions replaced the same one
    assert list(sets.values()).count(None) == 1  # exactly one was first
    holder = int(state["aliases"]["candidate"])
    assert str(holder) not in replaced and set(removed) == {int(r) for r in replaced}
    assert all(count == 1 for count in removed.values())
    client = mlflow.MlflowClient()
    assert all(client.get_model_version("tiny-race", v).tags["arena.registration"] == "complete"
               for v in state["versions"])


@probe("registry", "store lock across processes: concurrent read-modify-write loses nothing (file lock, MLflow CAS)")
@pytest.mark.parametrize("kind", ["file", "mlflow"])
def test_store_lock_serialises_read_modify_write(store, kind, tmp_path):
    import mlflow

    from peft_arena.tracking.locks import LOCK_MODEL_PREFIX

    client = mlflow.MlflowClient()
    run = client.create_run(store["experiment"])
    client.set_tag(run.info.run_id, "counter", "0")
    n, times = 3, 5
    procs = [_spawn(f"""
        import time
        from pathlib import Path
        import mlflow
        from peft_arena.tracking.locks import store_lock
        client = mlflow.MlflowClient()
        client.get_run("{run.info.run_id}")
        Path("{tmp_path}", "ready-{i}").touch()  # start together, once every process has imported and connected
        while len(list(Path("{tmp_path}").glob("ready-*"))) < {n}:
            time.sleep(0.01)
        for _ in range({times}):
            with store_lock("counter/{run.info.run_id}"):
                value = int(client.get_run("{run.info.run_id}").data.tags["counter"])
                time.sleep(0.01)  # widen the window a lost update needs
                client.set_tag("{run.info.run_id}", "counter", str(value + 1))
    """, env={"PEFT_ARENA_LOCK": kind}) for i in range(n)]
    assert [p.wait(timeout=300) for p in procs] == [0] * n
    assert client.get_run(run.info.run_id).data.tags["counter"] == str(n * times)
    assert not [m for m in client.search_registered_models() if m.name.startswith(LOCK_MODEL_PREFIX)]


@pytest.fixture()
def auth_server(tmp_path):
    """A real ``mlflow server --app-name basic-auth`` (sqlite backend, 2 workers) on 127.0.0.1; stopped at the end."""
    port = free_port()
    (tmp_path / "auth.ini").write_text(textwrap.dedent(f"""\
        [mlflow]
        default_permission = READ
        database_uri = sqlite:///{tmp_path}/auth.db
        admin_username = admin
        authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        auth_cache_ttl_seconds = 60
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD="probe-admin-pw-7",
               MLFLOW_FLASK_SERVER_SECRET_KEY="probe-key", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--default-artifact-root",
            str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with running_server(argv, env=env, log_path=tmp_path / "server.log", health_url=f"http://127.0.0.1:{port}/health",
                        start_timeout_s=180, stop_grace_s=30):
        yield {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": "probe-admin-pw-7"}


@probe("registry", "server lock under basic auth: N processes acquire/release in a loop, no error, nothing lost")
def test_server_lock_under_basic_auth(auth_server, tmp_path, monkeypatch):
    """The ``arena-lock.<hash>`` CAS against a real basic-auth server. A create that loses the race can come back
    RESOURCE_DOES_NOT_EXIST (MLflow's SQL store looks the name up after the unique-key violation, and the holder
    has just deleted it); the lock must treat that as contention, not crash (it did: 1 in 12 team-mode commands)."""
    import mlflow

    previous = mlflow.get_tracking_uri()  # the module's store: the tests after this one must find it again
    for k, v in auth_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PEFT_ARENA_LOCK", raising=False)
    mlflow.set_tracking_uri(auth_server["MLFLOW_TRACKING_URI"])
    try:
        _lock_loops_against(auth_server, tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)


def _lock_loops_against(auth_server: dict, tmp_path) -> None:
    import mlflow

    from peft_arena.tracking.locks import LOCK_MODEL_PREFIX

    n, times = 6, 20
    procs = [_spawn(f"""
        import os, time
        from pathlib import Path
        import mlflow
        from peft_arena.tracking.locks import store_lock
        mlflow.MlflowClient().search_registered_models(max_results=1)  # connected
        Path("{tmp_path}", "ready-{i}").touch()
        while len(list(Path("{tmp_path}").glob("ready-*"))) < {n}:
            time.sleep(0.01)
        for j in range({times}):
            # an empty hold (a marker file proves exclusion), so releases race with the losers' creates
            with store_lock("probe/counter"):
                fd = os.open("{tmp_path}/held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if two hold it
                os.close(fd)
                Path("{tmp_path}", "done-{i}-" + str(j)).touch()
                os.unlink("{tmp_path}/held")
    """, env=auth_server) for i in range(n)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * n
    assert len(list(tmp_path.glob("done-*"))) == n * times
    client = mlflow.MlflowClient()
    assert not [m for m in client.search_registered_models() if m.name.startswith(LOCK_MODEL_PREFIX)]


@probe("registry", "8 concurrent evaluations share one base evaluation (and lose no eval_history entry)")
def test_concurrent_evaluations_share_one_base_evaluation(store, monkeypatch):
    """Eight evaluations (threads; each model evaluation holds the gate, the store work races) of one version."""
    import mlflow

    from peft_arena.cli import run_stage
    from peft_arena.stages import evaluate as evaluate_stage

    monkeypatch.setattr(evaluate_stage, "_evaluate", _gated(evaluate_stage._evaluate))
    from peft_arena.tracking.versions import EVAL_HISTORY_TAG

    n, results, errors = 8, [], []
    settings = {"model_uri": "models:/tiny-math/1", "suite": "gsm8k", "limit": 1, "max_new_tokens": 3}

    def evaluate() -> None:
        try:
            results.append(run_stage("evaluate", None, dict(settings)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=evaluate) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    runs = {r["run_id"]: mlflow.get_run(r["run_id"]) for r in results}
    base_runs = {r.data.tags["arena.base_eval_run"] for r in runs.values()}
    assert len(base_runs) == 1
    key = mlflow.get_run(base_runs.pop()).data.tags["arena.eval_key"]
    same_key = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        f"tags.`arena.is_base` = 'true' AND tags.`arena.eval_key` = '{key}'"))
    assert len(same_key) == 1
    history = json.loads(mlflow.MlflowClient().get_model_version("tiny-math", "1").tags[EVAL_HISTORY_TAG])
    assert set(runs) <= {e["run"] for e in history}


# ================================================================================================ stages


@probe("stages", "spectral on a base model without an update is refused with a clear error")
def test_spectral_refuses_a_model_without_an_update(store):
    _failed_stage("spectral", {"model_uri": "tiny"}, "base model, not a finetuned one")


@probe("stages", "spectral on an untrained adapter (B = 0: no update) is refused")
def test_spectral_refuses_an_untrained_adapter(store):
    import torch

    def zero_b(weights):
        return {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}

    source = _training_run(store, _adapter(store, 5, zero_b))
    _failed_stage("spectral", {"model_uri": f"runs:/{source}/adapter"}, "has no update")


@probe("stages", "report after evaluations that covered only target / only general benchmarks")
@pytest.mark.parametrize("suite", ["gsm8k", "nq"])
def test_report_on_a_subset_of_benchmarks(store, tmp_path, suite):
    from peft_arena.cli import run_stage

    run_stage("evaluate", None, {"model_uri": "models:/tiny-math/1", "suite": suite, "limit": 1, "max_new_tokens": 2,
                                 "run_name": f"only-{suite}"})
    out = run_stage("report", None, {"output_dir": str(tmp_path / "report"), "experiments": "reliability",
                                     "include_provisional": True})  # limit=1 on samples: provisional numbers
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 0
    assert out["models"] >= 1


# ================================================================================================ disk


@probe("disk", "a finished training stage leaves no local adapter copy in .arena/outputs")
def test_training_stage_removes_its_local_copy(mlflow_store):
    import mlflow

    from peft_arena.cli import run_stage

    out = run_stage("train_sft", None, {"adapter": "lora", "base_model": "tiny", "max_steps": 1, "limit": 2,
                                        "output_dir": ".arena/outputs"})
    assert not (Path(".arena/outputs") / out["run_id"]).exists()
    assert out["adapter_uri"] == f"runs:/{out['run_id']}/adapter"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in names


@probe("disk", "doctor prunes .arena/outputs by the documented policy")
def test_doctor_prunes_outputs(mlflow_store, monkeypatch):
    import mlflow

    from peft_arena.tracking.doctor import prune_outputs

    client = mlflow.MlflowClient()
    exp = mlflow.create_experiment("outputs")
    root = Path(".arena/outputs")

    def run_folder(status: str | None, age_days: float = 0) -> Path:
        run_id = client.create_run(exp).info.run_id if status else "0" * 32
        if status and status != "RUNNING":
            client.set_terminated(run_id, status)
        folder = root / run_id / "trainer" / "checkpoint-1"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)
        old = time.time() - age_days * 86400
        for p in [root / run_id, *(root / run_id).rglob("*")]:
            os.utime(p, (old, old))
        return root / run_id

    finished, failed_new, failed_old = run_folder("FINISHED"), run_folder("FAILED", 1), run_folder("KILLED", 30)
    running, foreign = run_folder("RUNNING", 30), run_folder(None, 30)
    monkeypatch.setenv("PEFT_ARENA_KEEP_FAILED_DAYS", "7")
    removed = {Path(e["path"]) for e in prune_outputs(root)}
    assert removed == {finished, failed_old}
    assert not finished.exists() and not failed_old.exists()
    assert failed_new.exists() and running.exists() and foreign.exists()


@probe("disk", "doctor prunes the registry download cache (age, then least recently used over the size cap)")
def test_doctor_prunes_the_download_cache(tmp_path, monkeypatch):
    from peft_arena.tracking.doctor import prune_download_cache

    cache = tmp_path / "registry"

    def entry(name: str, age_days: float, size: int) -> Path:
        folder = cache / name / "artifacts"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * size)
        old = time.time() - age_days * 86400
        os.utime(cache / name, (old, old))
        return cache / name

    stale, lru, newer, recent = entry("m-stale", 20, 10), entry("m-lru", 3, 600), entry("m-newer", 2, 600), \
        entry("m-recent", 0, 600)
    monkeypatch.setenv("PEFT_ARENA_CACHE_KEEP_DAYS", "14")
    monkeypatch.setenv("PEFT_ARENA_CACHE_MAX_GB", str(1500 / 2**30))  # room for two of the three large entries
    removed = {Path(e["path"]) for e in prune_download_cache(cache)}
    assert removed == {stale, lru}
    assert newer.exists() and recent.exists()
