"""The promote stage against a temp sqlite store: merge → register → candidate; champion through the policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_arena.config import PromoteConfig
from peft_arena.models import ensure_tiny, load_model, load_tokenizer
from peft_arena.tracking import aliases
from peft_arena.tracking import registry as reg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    tiny = ensure_tiny()
    root = tmp_path_factory.mktemp("promote-store")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.setenv("PEFT_ARENA_CACHE", str(root / "cache"))
    mp.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.create_experiment("promote-test", artifact_location=(root / "artifacts").as_uri())
    yield {"root": root, "experiment": exp, "tiny": tiny}
    mlflow.set_tracking_uri(None)  # leave no global store behind for other test files
    mp.undo()


def _training_run(store, method="lora", seed=0) -> str:
    """A finished train_sft run whose adapter/ artifact holds a LoRA with non-zero B (so merging changes weights)."""
    import mlflow
    import torch

    from peft_arena.methods import ops

    base = load_model(str(store["tiny"]))
    model, options = ops.build(base, method)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = store["root"] / f"trained-{method}-{seed}"
    ops.save_trained(model, method, options, out, base_model="tiny", base_source=str(store["tiny"]),
                     tokenizer=load_tokenizer(str(store["tiny"])))
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        mlflow.set_tags({"arena.stage": "train_sft", "arena.method": method, "arena.method_label": "r8",
                         "arena.domain": "math", "arena.base_model": "tiny", "arena.base_source": str(store["tiny"]),
                         "arena.train": "sft"})
        mlflow.log_artifacts(str(out), "adapter")
    return run.info.run_id


def _promote(store, cfg):
    import mlflow

    from peft_arena.stages.promote import run_promote
    from peft_arena.tracking.tracker import MlflowTracker

    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        return run_promote(cfg, MlflowTracker(run.info.run_id)), run.info.run_id


def test_promote_registers_the_merged_model_as_candidate(store):
    import mlflow
    from safetensors.torch import load_file

    from peft_arena.methods import ops

    train_run = _training_run(store)
    out, promote_run = _promote(store, PromoteConfig(source_run=train_run))
    assert out["name"] == "tiny-math" and out["model_uri"] == f"models:/tiny-math/{out['version']}"
    client = mlflow.MlflowClient()
    mv = client.get_model_version("tiny-math", out["version"])
    assert {k: mv.tags[k] for k in ("arena.method", "arena.train", "arena.domain", "arena.base_model",
                                    "arena.source_run")} == {"arena.method": "lora", "arena.train": "sft",
                                                             "arena.domain": "math", "arena.base_model": "tiny",
                                                             "arena.source_run": train_run}
    assert str(client.get_registered_model("tiny-math").aliases["candidate"]) == out["version"]
    run = client.get_run(promote_run)
    assert run.data.tags["arena.stage"] == "promote" and run.data.tags["arena.model_version"] == out["version"]
    assert run.data.tags["mlflow.runName"] == "promote-sft-lora-r8-math-tiny"
    assert run.data.metrics["promote/merge_max_abs_logit_diff"] < 1e-4  # fp32 merge reproduces the adapter model
    # the registered weights are the merge of that adapter, not the base
    resolved = reg.resolve_model_uri("models:/tiny-math@candidate")
    registered = load_file(Path(resolved.local_path) / "model.safetensors")
    adapter = mlflow.artifacts.download_artifacts(run_id=train_run, artifact_path="adapter",
                                                  dst_path=str(store["root"] / "dl"))
    expected = ops.merge(ops.load_trained(str(store["tiny"]), adapter)).state_dict()
    base = load_file(Path(store["tiny"]) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert registered[key].allclose(expected[key], atol=1e-6)
    assert not registered[key].allclose(base[key], atol=1e-3)


def test_candidate_follows_the_newest_promotion(store):
    import mlflow

    first, _ = _promote(store, PromoteConfig(source_run=_training_run(store, seed=1)))
    second, _ = _promote(store, PromoteConfig(source_run=f"runs:/{_training_run(store, seed=2)}/adapter"))
    client = mlflow.MlflowClient()
    assert int(second["version"]) == int(first["version"]) + 1
    assert str(client.get_registered_model("tiny-math").aliases["candidate"]) == second["version"]
    history = reg.alias_history("tiny-math", first["version"])
    assert [e["action"] for e in history] == ["set", "removed"]


def test_merge_failure_is_raised_and_nothing_is_registered(store, monkeypatch):
    import mlflow

    from peft_arena.methods import MergeError, ops

    client = mlflow.MlflowClient()
    before = {str(v.version) for v in client.search_model_versions("name = 'tiny-math'")}
    candidate = str(client.get_registered_model("tiny-math").aliases["candidate"])

    def broken_merge(model):
        raise MergeError("merging the LORA adapter failed: simulated")

    monkeypatch.setattr(ops, "merge", broken_merge)
    with pytest.raises(MergeError, match="simulated"):
        _promote(store, PromoteConfig(source_run=_training_run(store, seed=3)))
    monkeypatch.undo()
    # a failure after registration (moving the alias) rolls the version back and restores the alias
    def broken_move(name, alias, version, *args, **kwargs):
        client.set_registered_model_alias(name, alias, version)
        raise RuntimeError("alias store went away")

    monkeypatch.setattr(aliases, "move_alias", broken_move)
    with pytest.raises(RuntimeError, match="alias store went away"):
        _promote(store, PromoteConfig(source_run=_training_run(store, seed=4)))
    assert {str(v.version) for v in client.search_model_versions("name = 'tiny-math'")} == before
    assert str(client.get_registered_model("tiny-math").aliases["candidate"]) == candidate


def test_promote_rejects_a_non_training_run(store):
    import mlflow

    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        mlflow.set_tag("arena.stage", "evaluate")
    with pytest.raises(ValueError, match="not a training run"):
        _promote(store, PromoteConfig(source_run=run.info.run_id))


def test_champion_path_applies_the_policy(store):
    import mlflow

    client = mlflow.MlflowClient()
    version = str(client.get_registered_model("tiny-math").aliases["candidate"])
    policy = REPO / "registry" / "policy.yaml"  # math: forgetting <= 3 pp, gain >= 2 pp
    reg.record_scores("tiny-math", version, {"target_avg": 20, "target_gain_pp": 1.5, "forget_pp": 0}, "e1", "k", provenance="full")
    out, run_id = _promote(store, PromoteConfig(alias="champion", model_uri=f"models:/tiny-math/{version}",
                                                policy=str(policy)))
    assert out["promoted"] is False and "champion" not in client.get_registered_model("tiny-math").aliases
    kept = client.get_run(run_id).data
    assert kept.tags["arena.policy_decision"] == "keep"
    # named for what it did; every gate's value (metrics) against its threshold (params), in the description too
    assert kept.tags["mlflow.runName"] == "champion-kept-sft-lora-r8-math-tiny"
    assert kept.metrics["policy/promoted"] == 0 and kept.metrics["policy/target_gain_pp"] == 1.5
    assert kept.params["policy.min_target_gain_pp"] == "2.0" and kept.params["policy.max_forget_pp"] == "3.0"
    assert "**Kept**" in kept.tags["mlflow.note.content"] and "| `target_gain_pp` | 1.5 | 2 | FAIL |" in \
        kept.tags["mlflow.note.content"]
    reg.record_scores("tiny-math", version, {"target_avg": 21, "target_gain_pp": 2.5, "forget_pp": 0}, "e2", "k", provenance="full")
    out, run_id = _promote(store, PromoteConfig(alias="champion", model_uri="models:/tiny-math@candidate",
                                                policy=str(policy)))
    assert out["promoted"] is True and out["version"] == version
    assert str(client.get_registered_model("tiny-math").aliases["champion"]) == version
    promoted = client.get_run(run_id).data
    assert promoted.tags["mlflow.runName"] == "champion-promoted-sft-lora-r8-math-tiny"
    assert promoted.metrics["policy/promoted"] == 1 and "**Promoted**" in promoted.tags["mlflow.note.content"]
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="policy_decision.json", dst_path=str(store["root"] / "pd"))).read_text())
    assert decision["promote"] is True and decision["gates"]["min_target_gain_pp"] == 2.0
