"""The arena stage: a sweep of train → promote → evaluate → spectral chains as child runs of one parent run.

The parent run (``arena.stage=arena``) plans the chains (:mod:`peft_arena.sweep.plan`), runs each in its own
process, ``parallel`` at once (:mod:`peft_arena.sweep.execute`), then the report. Every stage of a chain is a
child run (``mlflow.parentRunId``) tagged with its config hash; re-running the same sweep reuses the stages
that FINISHED with the same hash and retries the others. A failed chain does not stop the others: the parent
names the failed chains (tag ``arena.sweep.failed``, its description, ``sweep/summary.{json,md}``) and ends
FAILED with the reason in ``arena.error``, after everything else ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from peft_arena.config import ArenaConfig, ConfigError, config_params
from peft_arena.sweep.chain import lookup
from peft_arena.sweep.execute import run_chains, run_process, slot_devices, visible_gpus
from peft_arena.sweep.plan import Chain, plan_chains, unknown_methods
from peft_arena.tracking import sweep as tracking


class SweepError(RuntimeError):
    """Some chains of the sweep failed (the others ran to the end)."""


def _say(text: str) -> None:
    print(f"[arena] {text}", file=sys.stderr, flush=True)


def _layout(cfg: ArenaConfig) -> tuple[int, list[str]]:
    if cfg.parallel < 0:
        raise ConfigError(f"parallel must be >= 0 (0 = one chain per GPU), got {cfg.parallel}")
    gpus = visible_gpus(cfg.gpus)
    return (cfg.parallel or max(1, len(gpus))), gpus


def describe_plan(chains: list[Chain], experiment_id: str | None, fresh: bool) -> list[dict]:
    """What a run of the sweep would do now, per chain and stage (reads the store, writes nothing)."""
    rows = []
    for chain in chains:
        upstream, stages, blocked = {}, [], None
        for stage in chain.stages:
            verb = chain.verb(stage)
            if blocked:
                stages.append({"stage": verb, "action": "run", "note": f"after {blocked} runs"})
                continue
            decision = lookup(chain, stage, upstream, experiment_id, fresh)
            if decision["action"] == "reuse":
                stages.append({"stage": verb, "action": "reuse", "run_id": decision["run_id"]})
                if stage == "train":
                    upstream["train_run"] = decision["run_id"]
                elif stage == "promote":
                    upstream["model_uri"] = decision["tags"].get("arena.model_uri")
            else:
                entry = {"stage": verb, "action": decision["action"]}
                if decision.get("previous"):
                    entry["previous"] = decision["previous"]
                stages.append(entry)
                blocked = verb
        rows.append({"chain": chain.key, "hashes": chain.hashes, "overrides": chain.overrides, "stages": stages})
    return rows


def format_plan(cfg: ArenaConfig, chains: list[Chain], plan: list[dict], parallel: int, gpus: list[str],
                experiment: str | None) -> str:
    where = f"GPUs {','.join(gpus)}" if gpus else "CPU"
    devices = slot_devices(parallel, gpus)
    lines = [f"arena sweep on {cfg.base_model}: {len(chains)} chain(s) ({cfg.train} × {cfg.methods} × "
             f"{cfg.domains}), stages {','.join(chains[0].stages) if chains else '-'}, parallel {parallel} on {where}"
             + (f" (slots: {', '.join(str(d) for d in devices)})" if gpus else ""),
             f"experiment: {experiment or '(new) peft-arena'}" + ("; fresh: every stage runs again" if cfg.fresh else "")]
    for row, chain in zip(plan, chains):
        parts = []
        for s in row["stages"]:
            if s["action"] == "reuse":
                parts.append(f"{s['stage']}: reuse {s['run_id'][:8]}")
            elif s["action"] == "retry":
                parts.append(f"{s['stage']}: retry (last {s['previous']['run_id'][:8]}: "
                             f"{str(s['previous']['error'])[:60]})")
            else:
                parts.append(f"{s['stage']}: run")
        lines.append(f"  {row['chain']:<24} " + " | ".join(parts))
        train = " ".join(f"{k}={v}" for k, v in chain.overrides["train"].items())
        lines.append(f"  {'':<24} {chain.verb('train')} with {train}")
    bad = unknown_methods(chains)
    if bad:
        lines.append(f"  warning: unknown method(s) {', '.join(bad)}: their chains will fail alone "
                     "(`peft-arena methods` lists the known ones)")
    if cfg.report:
        lines.append(f"  then: report over experiment {experiment or 'peft-arena'} (base {cfg.base_model})")
    return "\n".join(lines)


def dry_run(cfg: ArenaConfig, tracker=None) -> dict:
    """Print the plan; log it to ``tracker``'s run when there is one (under ``mlflow run``)."""
    chains = plan_chains(cfg)
    parallel, gpus = _layout(cfg)
    experiment_id = tracking.experiment_of(tracker.run_id) if tracker else tracking.current_experiment_id()
    experiment = tracking.experiment_name(experiment_id) if experiment_id else None
    plan = describe_plan(chains, experiment_id, cfg.fresh)
    text = format_plan(cfg, chains, plan, parallel, gpus, experiment)
    print(text)
    if tracker is not None:
        tracker.set_tags({"arena.sweep.status": "dry_run", "mlflow.note.content": "Dry run: nothing ran.\n\n```\n"
                          + text + "\n```"})
        tracker.log_dict(plan, "sweep/plan.json")
    return {"dry_run": True, "plan": plan, "parallel": parallel, "gpus": gpus}


def _summary_md(outcomes: list[dict], report: dict | None) -> str:
    lines = ["| chain | status | stages | failed at | error |", "|---|---|---|---|---|"]
    for o in outcomes:
        stages = ", ".join(f"{s['stage']}:{s['status']}" for s in o.get("stages", []))
        bad = next((s for s in o.get("stages", []) if s["status"] == "failed"), None)
        error = (bad or {}).get("error") or (o.get("error") if o["status"] == "failed" else "") or ""
        lines.append(f"| {o['chain']} | {o['status']} | {stages} | {(bad or {}).get('stage', '')} | "
                     f"{error.replace('|', '/')[:200]} |")
    if report is not None:
        lines.append(f"| report | {report['status']} | report:{report['status']} | | "
                     f"{str(report.get('error', '')).replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def run_arena(cfg: ArenaConfig, tracker) -> dict:
    if cfg.dry_run:
        return dry_run(cfg, tracker)
    started = time.time()
    chains = plan_chains(cfg)
    parallel, gpus = _layout(cfg)
    experiment_id = tracking.experiment_of(tracker.run_id)
    experiment = tracking.experiment_name(experiment_id)
    tracker.set_tags({"arena.base_model": cfg.base_model, "arena.sweep.methods": cfg.methods,
                      "arena.sweep.domains": cfg.domains, "arena.sweep.train": cfg.train,
                      "arena.sweep.stages": ",".join(chains[0].stages), "arena.sweep.parallel": parallel,
                      "arena.sweep.gpus": ",".join(gpus) or "none",
                      "mlflow.runName": cfg.run_name or f"arena-{cfg.base_model}"})
    tracker.log_params({f"cfg.{k}": v for k, v in config_params(cfg).items() if k not in ("output_dir", "run_name")})
    plan = describe_plan(chains, experiment_id, cfg.fresh)
    _say(format_plan(cfg, chains, plan, parallel, gpus, experiment))
    tracker.log_dict(plan, "sweep/plan.json")
    workdir = Path(cfg.output_dir) / tracker.run_id

    def progress(outcome: dict, done: int, total: int) -> None:
        _say(f"[{done}/{total}] {outcome['chain']}: {outcome['status']} in {outcome['seconds']:.0f}s"
             + (f" ({outcome.get('error') or _first_error(outcome)})" if outcome["status"] == "failed" else ""))

    # chains whose every stage is reused need no process; the others run (their stages are looked up again there)
    reused = {row["chain"]: _reused_outcome(row) for row in plan
              if all(s["action"] == "reuse" for s in row["stages"])}
    for key in reused:
        _say(f"{key}: every stage finished before with the same configuration: reused")
    ran = run_chains([c for c in chains if c.key not in reused], tracker.run_id, experiment_id, workdir, parallel,
                     gpus, cfg.fresh, progress)
    by_key = {**reused, **{o["chain"]: o for o in ran}}
    outcomes = [by_key[c.key] for c in chains]
    report = None
    if cfg.report:
        _say("report over the experiment")
        report = run_process({"report": {"base_model": cfg.base_model, "experiments": experiment,
                                         "include_provisional": cfg.report_provisional,
                                         "output_dir": str(workdir / "report")},
                              "parent_run_id": tracker.run_id, "experiment_id": experiment_id},
                             workdir, "report", None)

    failed = [o for o in outcomes if o["status"] != "finished"]
    stages = [s for o in outcomes for s in o.get("stages", [])]
    summary = {"chains": outcomes, "report": report, "failed": [o["chain"] for o in failed],
               "stages_run": sum(s["status"] in ("finished", "failed") for s in stages),
               "stages_reused": sum(s["status"] == "reused" for s in stages)}
    table = _summary_md(outcomes, report)
    tracker.log_dict(summary, "sweep/summary.json")
    tracker.log_text("# Arena sweep\n\n" + table, "sweep/summary.md")
    for path in sorted(workdir.glob("*.log")):
        tracker.log_artifact(path, "sweep/logs")
    tracker.log_metrics({"sweep/chains": len(outcomes), "sweep/finished": len(outcomes) - len(failed),
                         "sweep/failed": len(failed), "sweep/stages_run": summary["stages_run"],
                         "sweep/stages_reused": summary["stages_reused"], "sweep/seconds": time.time() - started})
    failed_text = "; ".join(f"{o['chain']} ({o.get('error') or _first_error(o)})" for o in failed)
    head = (f"{len(outcomes) - len(failed)} of {len(outcomes)} chains finished"
            + (f"; failed: {failed_text}" if failed else "") + f"; {summary['stages_reused']} stage(s) reused")
    tracker.set_tags({"arena.sweep.failed": ",".join(o["chain"] for o in failed),
                      "arena.sweep.status": "failed" if failed or (report and report["status"] != "finished")
                      else "finished",
                      "mlflow.note.content": f"Arena sweep: {head}.\n\n{table}"})
    _say(head)
    print(table)
    if failed:
        raise SweepError(f"{len(failed)} of {len(outcomes)} chains failed: {failed_text}; re-run the same command "
                         "to retry them (finished stages are reused)")
    if report is not None and report["status"] != "finished":
        raise SweepError(f"every chain finished but the report failed: {report.get('error')}")
    return {"chains": len(outcomes), "failed": [], "stages_reused": summary["stages_reused"],
            "stages_run": summary["stages_run"], "outcomes": outcomes,
            "report_dir": (report or {}).get("output_dir")}


def _reused_outcome(row: dict) -> dict:
    stages = [{"stage": s["stage"], "status": "reused", "run_id": s["run_id"]} for s in row["stages"]]
    return {"chain": row["chain"], "status": "finished", "stages": stages, "train_run": stages[0]["run_id"],
            "device": None, "seconds": 0.0}


def _first_error(outcome: dict) -> str:
    bad = next((s for s in outcome.get("stages", []) if s["status"] == "failed"), None)
    return f"{bad['stage']}: {bad['error']}" if bad else outcome.get("error", "failed")
