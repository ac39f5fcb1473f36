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


# ================================================================================================ training


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
