"""The forgetting monitor on the tiny model: probe points, held-out target records, budget stop, Pareto selection."""

import math
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from peft_arena.config import build_config
from peft_arena.tracking.tracker import MemoryTracker
from peft_arena.training.monitor import MonitorSettings, attach_monitor, pareto_probes, select_probe


def _probe(step, target, general, rise):
    return {"step": step, "target_nll": target, "general_nll": general, "general_nll_rise_pct": rise}


def test_pareto_selection_rule():
    probes = [_probe(0, 10.0, 5.0, 0.0),  # before training: never a candidate
              _probe(2, 9.0, 5.1, 2.0),
              _probe(4, 8.0, 5.3, 6.0),
              _probe(6, 8.5, 5.4, 8.0),  # dominated by step 4
              _probe(8, 7.0, 6.0, 20.0)]
    assert [p["step"] for p in pareto_probes(probes)] == [2, 4, 8]
    # with a budget: the lowest target NLL within it; none within: the smallest rise
    assert select_probe(probes, budget=10.0)["step"] == 4
    assert select_probe(probes, budget=1.0)["step"] == 2
    # without: nearest the ideal corner after min-max scaling over the front (step 4: (0.5, 0.22))
    assert select_probe(probes, budget=0.0)["step"] == 4
    assert select_probe(probes[:1], budget=0.0) is None


def test_settings_refuse_a_budget_or_selection_without_the_monitor():
    cfg = build_config("train_sft", None, {"forgetting_budget": "5"})
    with pytest.raises(ValueError, match="monitor_every"):
        MonitorSettings.from_config(cfg)
    with pytest.raises(ValueError, match="monitor_select"):
        MonitorSettings.from_config(build_config("train_sft", None, {"monitor_every": "2", "monitor_select": "best"}))
    assert MonitorSettings.from_config(build_config("train_sft")) is None


def test_target_records_are_held_out_of_training(tmp_path):
    from peft_arena.data import load_records

    tracker = MemoryTracker()
    cfg = SimpleNamespace(monitor_every=2, forgetting_budget=0.0, monitor_select="last", monitor_size=4)
    records = load_records("med-sample", "med", limit=8)
    kept, callbacks = attach_monitor(cfg, records, tracker, tmp_path, train="sft", domain="med", source="med-sample")
    assert kept == records and len(callbacks) == 1  # the sample has spare records beyond the 8 trained on
    heldout = callbacks[0].heldout
    assert len(heldout) == 4 and not {r["question"] for r in heldout} & {r["question"] for r in records}
    # every record trained on: the monitor holds out a quarter of them and says so
    everything = load_records("med-sample", "med")
    kept, callbacks = attach_monitor(cfg, everything, MemoryTracker(), tmp_path, train="sft", domain="med",
                                     source="med-sample")
    assert len(kept) == len(everything) - 4 and callbacks[0].heldout == everything[-4:]


def test_probe_sets_come_from_the_offline_files():
    from peft_arena.data.probes import general_choices, general_texts

    texts, items = general_texts(3), general_choices(3)
    assert len(set(texts)) == 3 and all(len(t) > 50 for t in texts)
    assert len(items) == 3 and all(len(i["choices"]) == 4 and 0 <= i["gold"] < 4 for i in items)


def _train_sft(tmp_path, **over):
    """The training itself (the stage would remove the local working folder once the adapter is logged)."""
    from peft_arena.training.sft import train_sft

    tracker = MemoryTracker()
    cfg = build_config("train_sft", None, {"base_model": "tiny", "domain": "med", "limit": 8, "monitor_size": 3,
                                           **over})
    result = train_sft(cfg, tracker, tmp_path / "memory")
    return tracker, result


def _steps(tracker, key):
    return [step for step, _ in tracker.metrics[key]]


def test_sft_monitor_logs_points_and_checkpoints(tmp_path, tiny_source):
    tracker, _ = _train_sft(tmp_path, max_steps=3, monitor_every=2)
    # before the first step, every 2 steps, and after the last
    assert _steps(tracker, "monitor/general_nll") == [0, 2, 3]
    for key in ("monitor/general_mc_acc", "monitor/general_mc_gold_prob", "monitor/target_nll",
                "monitor/general_nll_rise_pct", "monitor/target_nll_drop_pct"):
        assert _steps(tracker, key) == [0, 2, 3]
    values = dict(tracker.metrics["monitor/general_nll"])
    assert all(5.0 < v < 15.0 for v in values.values())  # a random 49k-vocab model: about ln(49152) = 10.8
    assert tracker.metrics["monitor/general_nll_rise_pct"][0][1] == 0.0
    assert all(0.0 <= v <= 100.0 for _, v in tracker.metrics["monitor/general_mc_acc"])
    assert math.isfinite(tracker.last("monitor/target_nll"))
    assert tracker.tags["arena.monitor.probes"] == "3" and tracker.tags["arena.monitor.stopped_early"] == "false"
    table = tracker.artifacts["monitor/probes.json"]
    assert [p["step"] for p in table["probes"]] == [0, 2, 3]
    assert sorted(table["checkpoints"]) == ["2", "3"]
    assert all((tmp_path / "memory" / "monitor" / f"step-{s:06d}.safetensors").exists() for s in (2, 3))


def test_budget_stops_training_and_pareto_restores_the_chosen_checkpoint(tmp_path, tiny_source):
    # a high learning rate makes the general-text NLL rise within a few steps
    tracker, result = _train_sft(tmp_path, max_steps=6, monitor_every=1, lr=0.2, forgetting_budget=0.1,
                                 monitor_select="pareto")
    rises = tracker.metrics["monitor/general_nll_rise_pct"]
    over = [step for step, rise in rises if rise > 0.1]
    assert over, f"the general NLL never rose past the budget: {rises}"
    # training stopped at the first probe past the budget, and the run says so
    assert _steps(tracker, "monitor/general_nll")[-1] == over[0] < 6
    assert tracker.tags["arena.monitor.stopped_early"] == "true"
    assert f"step {over[0]}" in tracker.tags["arena.monitor.stop_reason"]
    assert "forgetting monitor" in tracker.tags["mlflow.note.content"]
    # the saved adapter is the checkpoint of the selected probe (within the budget, on the front)
    selected = int(tracker.tags["arena.monitor.selected_step"])
    assert dict(rises)[selected] <= 0.1
    saved = load_file(str(tmp_path / "memory" / "adapter" / "adapter_model.safetensors"))
    checkpoint = load_file(str(tmp_path / "memory" / "monitor" / f"step-{selected:06d}.safetensors"))
    for name, tensor in checkpoint.items():
        key = name.replace(".default", "")
        assert key in saved and (saved[key] == tensor).all(), name


def test_grpo_monitor_scores_the_rl_prompts(tmp_path, tiny_source):
    from peft_arena.stages.train import run_train_grpo

    tracker = MemoryTracker()
    cfg = build_config("train_grpo", None, {
        "base_model": "tiny", "domain": "math", "limit": 4, "max_steps": 2, "monitor_every": 1, "monitor_size": 2,
        "output_dir": str(tmp_path), "grpo.num_generations": 2, "grpo.prompts_per_generation": 1,
        "grpo.max_completion_length": 4})
    run_train_grpo(cfg, tracker)
    assert _steps(tracker, "monitor/target_nll") == [0, 1, 2]
    assert tracker.tags["arena.monitor.target_heldout"].startswith("2 records of math-sample")


def test_probe_trust_is_a_spearman_correlation_with_n():
    import pandas as pd

    from peft_arena.monitor_report import spearman, trust_statement

    table = pd.DataFrame({"general_delta_pp": [-1.0, -5.0, -3.0, 0.5],
                          "neg_general_nll_rise_pct": [-0.2, -4.0, -1.0, 0.1],  # same order: rho = +1
                          "general_mc_delta_pp": [0.0, 6.25, 0.0, -6.25]})
    nll, mc = spearman(table)
    assert nll["n"] == 4 and nll["spearman_rho"] == pytest.approx(1.0)
    assert mc["n"] == 4 and mc["spearman_rho"] == pytest.approx(-4.5 / 22.5 ** 0.5)  # ties get average ranks
    text = trust_statement([nll, mc])
    assert "ρ = +1.00 over n = 4 runs (strong)" in text and "wrong sign" in text
    few = spearman(table.head(2))
    assert few[0]["n"] == 2 and few[0]["spearman_rho"] is None
    assert "only 2 monitored run(s)" in trust_statement(few)
