"""Registry: policy gates, alias bookkeeping, resolving models:/ URIs, nothing half-registered on failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peft_arena.models import ensure_tiny
from peft_arena.tracking import registry as reg
from peft_arena.tracking.registry import Decision, Gates, Policy, PolicyError, RegistryError

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-math"


# ---------------------------------------------------------------------------------------------- pure policy


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(default=Gates(max_forget_pp=2.0, min_target_gain_pp=1.0),
                  domains={"math": Gates(max_forget_pp=3.0, min_target_gain_pp=5.0, min_margin_over_champion_pp=0.5)})


def scores(target, gain, forget, eval_key="k1", provenance="full"):
    return {"target_avg": target, "target_gain_pp": gain, "forget_pp": forget, "eval_key": eval_key,
            "provenance": provenance}


@pytest.mark.parametrize("domain, cand, champ, promote", [
    # must promote
    ("med", scores(40, 3, 0.5), None, True),                  # no champion yet, gates pass
    ("med", scores(45, 8, 1.9), scores(44, 7, 0.2), True),    # beats the champion
    ("math", scores(50, 6, 2.9), scores(49, 5, 0), True),     # math allows 3 pp forgetting, margin 1 > 0.5
    # must not promote
    ("med", scores(40, 3, 2.5), None, False),                 # forgetting too high
    ("med", scores(40, 0.5, 0), None, False),                 # gain too low
    ("math", scores(40, 3, 0), None, False),                  # gain 3 passes the default but not math's 5
    ("med", scores(43, 6, 0), scores(44, 7, 0), False),       # worse than the champion
    ("med", scores(44, 7, 0), scores(44, 7, 0), False),       # a tie does not move the champion
    ("math", scores(49.3, 6, 0), scores(49, 5, 0), False),    # beats by 0.3 < math's margin 0.5
    ("med", scores(45, 8, 0, "k1"), scores(44, 7, 0, "k2"), False),  # other eval settings: not comparable
    ("med", scores(40, 3, 0.5, provenance="provisional"), None, False),  # provisional evidence is refused
    ("med", {**scores(40, 3, 0.5), "provenance": None}, None, False),     # so is evidence of unknown provenance
])
def test_policy_gates(policy, domain, cand, champ, promote):
    decision = reg.evaluate_policy(policy, domain, cand, champ)
    assert decision.promote is promote, decision.reasons
    assert decision.gates["domain"] == domain


def test_policy_reports_every_gate_and_missing_scores(policy):
    decision = reg.evaluate_policy(policy, "med", {"score/target_avg": 40, "score/forget_pp": 0.0,
                                                   "provenance": "full"}, None)
    assert not decision.promote
    assert any("missing score target_gain_pp" in r for r in decision.reasons)
    ok = reg.evaluate_policy(policy, "med", scores(40, 3, 0.5), None)
    assert ok.reasons == ["forgetting 0.50 pp <= 2 pp", "target gain +3.00 pp >= 1 pp", "no champion yet"]
    refused = reg.evaluate_policy(policy, "med", scores(40, 3, 0.5, provenance="provisional"), None)
    assert not refused.promote and refused.reasons[0].startswith("refused: the evidence is provisional")


def test_shipped_policy_loads_with_domain_overrides():
    policy = reg.load_policy(REPO / "registry" / "policy.yaml")
    assert policy.gates("math").min_target_gain_pp == 2.0 and policy.gates("math").max_forget_pp == 3.0
    assert policy.gates("unknown-domain") == policy.default
    assert policy.gates("math").same_eval_settings is True  # inherited from default


def test_malformed_policy_raises(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("champion:\n  default:\n    max_forgetting: 1\n")
    with pytest.raises(PolicyError, match="unknown keys"):
        reg.load_policy(bad)
    bad.write_text("champion:\n  domains:\n    math: {max_forget_pp: lots}\n")
    with pytest.raises(PolicyError, match="not a number"):
        reg.load_policy(bad)
    with pytest.raises(PolicyError, match="not found"):
        reg.load_policy(tmp_path / "missing.yaml")


def test_registered_name():
    assert reg.registered_name("qwen2.5-7b", "math") == "qwen2.5-7b-math"
    with pytest.raises(RegistryError):
        reg.registered_name("", "math")


# ---------------------------------------------------------------------------------------------- against a store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temp sqlite store with two registered versions of a tiny model whose weights differ."""
    import mlflow
    import torch
    from safetensors.torch import load_file, save_file

    tiny = ensure_tiny()
    root = tmp_path_factory.mktemp("registry-store")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.setenv("PEFT_ARENA_CACHE", str(root / "cache"))
    mp.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
    # version 2: the same tiny model with one weight shifted, so we can tell which version was loaded
    v2 = root / "tiny-v2"
    shutil.copytree(tiny, v2)
    weights = load_file(v2 / "model.safetensors")
    key = "model.norm.weight"
    weights[key] = weights[key] + 1.0
    save_file(weights, v2 / "model.safetensors", metadata={"format": "pt"})
    versions = {}
    for folder in (tiny, v2):
        with mlflow.start_run(experiment_id=exp) as run:
            tags = {"arena.method": "lora", "arena.train": "sft", "arena.domain": "math",
                    "arena.base_model": "tiny", "arena.source_run": run.info.run_id}
            mv = reg.register_merged_model(folder, NAME, tags, run.info.run_id, alias="candidate",
                                           reason="newest promoted", actor="tester")
            versions[str(mv.version)] = (folder, run.info.run_id)
    yield {"root": root, "experiment": exp, "versions": versions, "key": key}
    mlflow.set_tracking_uri(None)  # leave no global store behind for other test files
    mp.undo()


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def _norm_weight(path: str) -> "torch.Tensor":
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")["model.norm.weight"]


def test_registered_versions_carry_lineage_tags(store):
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["arena.method"] == "lora" and mv.tags["arena.domain"] == "math"
    assert mv.tags["arena.source_run"] == store["versions"]["1"][1]
    assert mv.source.startswith("models:/m-")
    assert aliases(client) == {"candidate": "2"}


@pytest.mark.parametrize("uri, version, alias", [
    (f"models:/{NAME}@candidate", "2", "candidate"),
    (f"models:/{NAME}/1", "1", None),
    (f"models:/{NAME}/2", "2", None),
])
def test_resolve_registry_uri_loads_the_intended_version(store, uri, version, alias):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = reg.resolve_model_uri(uri)
    assert (resolved.registered_model, resolved.version, resolved.alias) == (NAME, version, alias)
    assert resolved.version_uri == f"models:/{NAME}/{version}"
    assert resolved.source_run == store["versions"][version][1]
    assert resolved.model_id and resolved.model_id.startswith("m-")
    # the weights are the registered version's, and the folder is ready for from_pretrained (tokenizer included)
    expected = _norm_weight(store["versions"][version][0])
    model = AutoModelForCausalLM.from_pretrained(resolved.local_path)
    assert model.model.norm.weight.detach().allclose(expected)
    assert AutoTokenizer.from_pretrained(resolved.local_path).chat_template


def test_resolve_errors_are_one_clear_line(store):
    with pytest.raises(RegistryError, match="no registered model 'nope-math'.*registered: tiny-math"):
        reg.resolve_model_uri("models:/nope-math/1")
    with pytest.raises(RegistryError, match="has no version 9 \\(latest: 2\\)"):
        reg.resolve_model_uri(f"models:/{NAME}/9")
    with pytest.raises(RegistryError, match="has no alias 'champion' \\(its aliases: candidate\\)"):
        reg.resolve_model_uri(f"models:/{NAME}@champion")
    with pytest.raises(RegistryError, match="neither"):
        reg.resolve_model_uri("no/such/thing")


def test_resolve_runs_local_and_hub(store, tmp_path):
    import mlflow

    run_id = store["versions"]["1"][1]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "arena_method.json").write_text(json.dumps({"method": "lora"}))
    mlflow.MlflowClient().log_artifacts(run_id, str(tmp_path / "adapter"), "adapter")
    resolved = reg.resolve_model_uri(f"runs:/{run_id}/adapter")
    assert json.loads((Path(resolved.local_path) / "arena_method.json").read_text()) == {"method": "lora"}
    assert resolved.source_run == run_id and resolved.registered_model is None
    assert reg.resolve_model_uri(str(tmp_path)).local_path == str(tmp_path.resolve())
    assert reg.resolve_model_uri("Qwen/Qwen2.5-7B").local_path == "Qwen/Qwen2.5-7B"


def test_alias_moves_are_recorded_on_both_versions(store):
    h1, h2 = reg.alias_history(NAME, 1), reg.alias_history(NAME, 2)
    assert [(e["alias"], e["action"]) for e in h1] == [("candidate", "set"), ("candidate", "removed")]
    assert "moved to version 2" in h1[1]["why"]
    assert h2[-1]["action"] == "set" and h2[-1]["by"] == "tester" and h2[-1]["replaced_version"] == "1"
    import mlflow

    mv = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert h2[-1]["why"] == "newest promoted" and "| candidate | set | tester | newest promoted |" in mv.description
    assert not any(k.startswith("arena.alias.") for k in mv.tags)  # the history is the record, not a tag per field
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.move_alias(NAME, "candidate", 1, "")


def test_apply_policy_moves_champion_only_when_gates_pass(store):
    import mlflow

    client = mlflow.MlflowClient()
    policy = Policy(default=Gates(max_forget_pp=2.0, min_target_gain_pp=1.0), domains={})
    with pytest.raises(RegistryError, match="no recorded evaluation"):
        reg.apply_policy(NAME, 1, policy)
    # a provisional evaluation (a limit subset) writes no score; the policy refuses it and says why
    reg.record_scores(NAME, 1, {"target_avg": 90, "target_gain_pp": 50, "forget_pp": 0}, "eval-p", eval_key="kp",
                      provenance="provisional", detail={"math500": "subset(limit=4)", "nq": "full"})
    assert not reg.version_scores(client.get_model_version(NAME, "1").tags)
    d = reg.apply_policy(NAME, 1, policy, actor="tester")
    assert not d.promote and "only provisional evaluations" in d.reasons[0] and "math500: subset(limit=4)" in d.reasons[0]
    # v1 forgets too much: no champion
    reg.record_scores(NAME, 1, {"score/target_avg": 30, "score/target_gain_pp": 4, "score/forget_pp": 5,
                                "score/general_avg": 40, "score/general_delta_pp": -5}, "eval-a", eval_key="k",
                      provenance="full")
    d = reg.apply_policy(NAME, 1, policy, actor="tester")
    assert not d.promote and "champion" not in client.get_registered_model(NAME).aliases
    kept = client.get_model_version(NAME, "1")
    assert kept.tags["arena.policy.champion.decision"] == "keep"
    assert reg.alias_history(NAME, 1)[-1]["action"] == "kept" and "forgetting 5.00 pp > 2" in kept.description
    # re-evaluated with less forgetting: becomes champion, the move records its scores
    reg.record_scores(NAME, 1, {"target_avg": 30, "target_gain_pp": 4, "forget_pp": 1}, "eval-b", eval_key="k",
                      provenance="full")
    assert reg.apply_policy(NAME, 1, policy, actor="tester").promote
    tags = client.get_model_version(NAME, "1").tags
    assert aliases(client)["champion"] == "1"
    assert reg.alias_history(NAME, 1)[-1]["scores"]["forget_pp"] == 1.0
    assert json.loads(tags["arena.scores"]) == {"target_avg": 30.0, "target_gain_pp": 4.0, "forget_pp": 1.0}
    assert "general_avg" not in reg.version_scores(tags)  # eval-a's score is not mixed into eval-b's
    history = json.loads(tags["arena.eval_history"])
    assert [(e["run"], e["provenance"]) for e in history] == [("eval-p", "provisional"), ("eval-a", "full"),
                                                              ("eval-b", "full")]
    assert history[0]["detail"] == {"math500": "subset(limit=4)"}
    # a later provisional evaluation leaves the version's full scores as they are
    reg.record_scores(NAME, 1, {"target_avg": 1, "target_gain_pp": -20, "forget_pp": 30}, "eval-q", eval_key="kq",
                      provenance="provisional")
    assert reg.version_scores(client.get_model_version(NAME, "1").tags)["target_avg"] == 30.0
    # v2 is worse on target: champion stays on v1
    reg.record_scores(NAME, 2, {"target_avg": 29, "target_gain_pp": 3, "forget_pp": 0}, "eval-c", eval_key="k",
                      provenance="full")
    assert not reg.apply_policy(NAME, 2, policy).promote
    assert aliases(client)["champion"] == "1"
    # v2 re-scored better: champion moves, v1's record says why it lost it
    reg.record_scores(NAME, 2, {"target_avg": 33, "target_gain_pp": 7, "forget_pp": 0}, "eval-d", eval_key="k",
                      provenance="full")
    assert reg.apply_policy(NAME, 2, policy).promote
    assert aliases(client)["champion"] == "2"
    assert reg.alias_history(NAME, 1)[-1]["action"] == "removed"
    assert not reg.apply_policy(NAME, 2, policy).promote  # already champion


def test_nothing_half_registered_on_failure(store, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient()
    folder, _ = store["versions"]["1"]

    def broken_register(*args, **kwargs):
        raise RuntimeError("registry went away")

    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        monkeypatch.setattr(mlflow, "register_model", broken_register)
        with pytest.raises(RuntimeError, match="registry went away"):
            reg.register_merged_model(folder, "tiny-med", {"arena.domain": "med"}, run.info.run_id)
        # a new registered model is removed again, and the logged model is deleted
        assert not client.search_registered_models(filter_string="name = 'tiny-med'")
        assert mlflow.search_logged_models(experiment_ids=[store["experiment"]], output_format="list",
                                           filter_string=f"source_run_id = '{run.info.run_id}'") == []
        # an existing registered model keeps its versions and aliases untouched
        monkeypatch.setattr(mlflow.transformers, "log_model", broken_register)
        with pytest.raises(RuntimeError):
            reg.register_merged_model(folder, NAME, {"arena.domain": "math"}, run.info.run_id)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]
    assert aliases(client)["candidate"] == "2"


def test_decision_summary():
    assert Decision(True, ["a", "b"]).summary() == "promote: a; b"


def test_resolve_a_version_registered_from_a_run_folder(store):
    """Versions registered by hand from runs:/ID/folder (no LoggedModel) resolve to that HF folder."""
    import mlflow

    folder, _ = store["versions"]["1"]
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        mlflow.log_artifacts(str(folder), "hf")
    client = mlflow.MlflowClient()
    client.create_registered_model("plain-math")
    client.create_model_version("plain-math", f"{run.info.artifact_uri}/hf", run_id=run.info.run_id)
    resolved = reg.resolve_model_uri("models:/plain-math/1")
    assert resolved.version == "1" and resolved.model_id is None
    assert (Path(resolved.local_path) / "config.json").exists()
    assert _norm_weight(resolved.local_path).allclose(_norm_weight(folder))
