"""``peft-arena``: the entry points' verbs plus ``methods``, ``benchmarks``, ``count-params``, ``doctor`` and ``demo``.

Every stage verb takes the fields of its config (``peft_arena/config.py``) as ``--field value``, a recipe
(``--config recipe.yaml``), dotted overrides (``--set "lr=1e-4 method.r=16"``), and any other ``--key value``
as a dotted override (that is how undeclared ``mlflow run -P key=value`` arrive). Errors print one line and exit
non-zero; a stage that fails ends its MLflow run FAILED with the reason in the ``arena.error`` tag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import warnings
from typing import Callable

from peft_arena.config import STAGE_CONFIGS, ConfigError, build_config, pairs_to_overrides, parse_assignments

STAGE_HELP = {
    "train_sft": (
        "Supervised finetuning of one PEFT method on a target domain (TRL SFTTrainer).",
        "Logs: the effective config as cfg.* params, train/loss, train/grad_norm, train/learning_rate curves (HF "
        "MLflowCallback, no TrainingArguments dump), train/final_loss, startup/<phase>_s (process start to the first "
        "optimizer step, by phase), the training data as a dataset input, "
        "a run description, trainable/total parameter counts, the trained adapter folder as artifact `adapter/`, and lineage tags "
        "(arena.stage/method/domain/base_model/train, library versions).",
    ),
    "train_grpo": (
        "GRPO (RL with verifiable rewards) of one PEFT method on a target domain (TRL GRPOTrainer).",
        "Logs: the effective GRPO settings (grpo.*), reward/accuracy/entropy/completion-length (and KL when on) "
        "curves, a completions table every N steps, the adapter folder as artifact `adapter/`, lineage tags, and "
        "which generation backend ran (arena.generation_backend).",
    ),
    "promote": (
        "Merge a trained adapter into its base and register it as `<base-short>-<domain>` with alias "
        "`candidate`; with --alias champion, move `champion` to an evaluated version if the registry/ policy passes.",
        "Logs: the merged model (MLflow transformers flavor) registered as a new version, version tags "
        "(arena.method/train/domain/source_run), and the alias move with who/when/why on the version.",
    ),
    "evaluate": (
        "Evaluate a model (models:/NAME@ALIAS, models:/NAME/N, runs:/ID/adapter, a folder, a hub id or a base "
        "short name) on a benchmark suite, against its base model's cached evaluation.",
        "Logs: target/<bench>/<metric> and general/<bench>/<metric> (linked to the benchmark as dataset); "
        "score/target_avg, score/general_avg (IFEval+NQ+BBH, all three), score/target_gain_pp, "
        "score/general_delta_pp, score/forget_pp only where their definition holds (else *_partial_avg); "
        "per-sample tables, a paper-shaped CSV; tags arena.provenance (full | provisional: any sample, --limit "
        "subset, partial task list or --n_samples/--max_new_tokens override) with per-benchmark detail in "
        "arena.data_provenance, and arena.model_kind (base models get raw completion prompts where the paper's "
        "harness did, docs/prompting.md). Only a full evaluation writes its scores onto the registry version.",
    ),
    "spectral": (
        "Spectral profile of a finetuned model against its base (retention/adaptation profiles, stable rank, "
        "fluctuation scores, subspace angles, energy share, intruder dimensions, norm comparison).",
        "Logs: spectral/all/<metric> and spectral/<module>/<metric> means (docs/metrics.md), every matrix's "
        "numbers as the table spectral/per_matrix.json, profiles and spectral_summary.json under `spectral/`, "
        "PNG plots under `plots/`.",
    ),
    "report": (
        "Leaderboard, target-vs-general Pareto plot, method-family summary and spectral method grid from "
        "mlflow.search_runs.",
        "Ranks full evaluations only, one row per (model, eval_key), each against its base under the same key "
        "(--include_provisional true adds provisional ones, flagged in a provenance column). Logs: "
        "leaderboard.csv, leaderboard.md, family_summary.csv, pareto.png (and the method grid) as artifacts of a "
        "report run; prints the leaderboard.",
    ),
    "arena": (
        "A sweep: train -> promote -> evaluate -> spectral for every (train, method, domain) as child runs of one "
        "parent run, N chains at once (one per GPU), then the report. Re-running resumes it.",
        "Logs: a parent run (arena.stage=arena) with sweep/plan.json, sweep/summary.{json,md}, one log per chain, "
        "sweep/* counts and the failed chains in arena.sweep.failed and its description; each stage is a child run "
        "(mlflow.parentRunId) tagged arena.sweep.chain and arena.sweep.config_hash. A re-run reuses stages that "
        "FINISHED with the same configuration and retries the rest; --dry_run prints the plan and runs nothing.",
    ),
}


def _field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field, used as its --help text."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def _methods_epilog() -> str:
    from peft_arena.methods import METHODS

    lines = ["methods (peft-arena methods --json for options and defaults):"]
    for name, spec in sorted(METHODS.items()):
        lines.append(f"  {name:<9} {spec.summary}")
    return "\n".join(lines)


def _benchmarks_epilog() -> str:
    from peft_arena.evaluation import describe_benchmarks, describe_suites, suite_of

    lines = ["suites (--suite NAME):"]
    for s in describe_suites():
        lines.append(f"  {s['name']:<12} {', '.join(s['members'])}")
    lines.append("benchmarks (peft-arena benchmarks --json for sources and protocols; prompts per model kind, "
                 "docs/prompting.md):")
    for b in describe_benchmarks():
        fmt = b["prompt_format"]
        lines.append(f"  {b['name']:<12} suite {suite_of(b['group']):<9} prompts: base {fmt['base']}, "
                     f"instruct {fmt['instruct']}")
    return "\n".join(lines)


def _add_stage_parser(sub, stage: str, listings: bool) -> None:
    cls = STAGE_CONFIGS[stage]
    summary, logs = STAGE_HELP[stage]
    epilog = logs
    if listings and stage in ("train_sft", "train_grpo"):
        epilog += "\n\n" + _methods_epilog()
    if listings and stage == "evaluate":
        epilog += "\n\n" + _benchmarks_epilog()
    p = sub.add_parser(stage.replace("_", "-"), help=summary, description=summary, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("method_options", "grpo_options"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        flag_kwargs = {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {}  # `--dry_run` alone
        p.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), **flag_kwargs,
                       help=f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%"))
    if stage in ("train_sft", "train_grpo"):
        p.add_argument("--method", dest="adapter", default=argparse.SUPPRESS, help="alias of --adapter")
        p.add_argument("--resume", default="", metavar="RUN_ID",
                       help="continue this killed or failed training run from its last checkpoint, in the same "
                            "MLflow run, with the run's own settings (give the same ones again, or none)")
    p.add_argument("--config", default="", help="recipe YAML with the same keys (overridden by flags)")
    p.add_argument("--set", default="", help='dotted overrides, e.g. "lr=1e-4 method.r=16 grpo.beta=0.04"')
    p.add_argument("--json", action="store_true", help="print the stage's result as JSON")
    p.set_defaults(stage=stage)


def _stage_runner(stage: str) -> Callable:
    if stage == "train_sft":
        from peft_arena.stages.train import run_train_sft as fn
    elif stage == "train_grpo":
        from peft_arena.stages.train import run_train_grpo as fn
    elif stage == "promote":
        from peft_arena.stages.promote import run_promote as fn
    elif stage == "evaluate":
        from peft_arena.stages.evaluate import run_evaluate as fn
    elif stage == "spectral":
        from peft_arena.stages.spectral import run_spectral as fn
    elif stage == "arena":
        from peft_arena.stages.arena import run_arena as fn
    else:
        from peft_arena.stages.report import run_report as fn
    return fn


def run_stage(stage: str, recipe: str | None, overrides: dict, argv: list[str] | None = None,
              resume: str = "") -> dict:
    """Resume/start the stage's MLflow run, build and validate its config inside it, run the stage.

    Training with ``num_processes > 1`` starts itself again under ``accelerate launch`` (``argv``: the verb's
    arguments, for the workers); in the workers rank 0 logs into the shared run and the others log nothing.
    ``resume``: a training run to continue (``--resume RUN_ID``) instead of starting a new one (one process).
    """
    from peft_arena.tracking.runs import arena_run
    from peft_arena.training import distributed

    if stage in ("train_sft", "train_grpo"):
        if distributed.is_worker() and not distributed.is_main_process():
            return _run_off_main(stage, recipe, overrides)
        if not distributed.is_worker() and not resume and _num_processes(stage, recipe, overrides) > 1:
            return _launch(stage, recipe, overrides, argv or [])

    if stage == "arena" and not os.environ.get("MLFLOW_RUN_ID"):
        cfg = build_config(stage, recipe, overrides)
        if cfg.dry_run:  # a plan only: no run is created (under `mlflow run` the plan is logged to its run)
            from peft_arena.stages.arena import dry_run

            return {"run_id": None, **dry_run(cfg)}
    with arena_run(stage, resume=resume) as tracker:
        if resume and not recipe and not overrides:  # `--resume ID` alone: the run's own settings
            overrides = {k[4:]: v for k, v in tracker.logged_params().items() if k.startswith("cfg.")}
        cfg = build_config(stage, recipe, overrides)
        if resume and getattr(cfg, "num_processes", 1) > 1:
            raise ConfigError("--resume continues single-process trainings only; a run with num_processes > 1 "
                              "cannot be resumed yet: start it again")
        result = _stage_runner(stage)(cfg, tracker)
        return {"run_id": tracker.run_id, **(result or {})}


def _doctor_sweep() -> None:
    """The cheap part of ``doctor`` before every stage: end runs whose process died, remove half registrations."""
    if os.environ.get("PEFT_ARENA_NO_SWEEP") or os.environ.get("RANK", "0") != "0":  # one sweep per job
        return
    from peft_arena.tracking.doctor import sweep

    try:
        sweep(exclude={os.environ.get("MLFLOW_RUN_ID", ""), os.environ.get("PEFT_ARENA_RUN_ID", "")})
    except Exception as exc:  # the stage itself still runs; the user hears why the repair did not
        print(f"[peft-arena] warning: the store check failed ({type(exc).__name__}: {exc}); "
              "run `peft-arena doctor` to retry it", file=sys.stderr)


def _num_processes(stage: str, recipe: str | None, overrides: dict) -> int:
    try:
        return build_config(stage, recipe, overrides).num_processes
    except ConfigError:
        return 1  # the normal path reports the error inside the stage's run (which then ends FAILED)


def _launch(stage: str, recipe: str | None, overrides: dict, argv: list[str]) -> dict:
    """The launching process of a multi-process training job: hold the run, start the workers, check the end."""
    from peft_arena.methods import get_method
    from peft_arena.tracking.runs import ERROR_TAG, launcher_run, run_metrics, run_tags
    from peft_arena.training import distributed

    with launcher_run(stage) as run_id:
        cfg = build_config(stage, recipe, overrides)
        distributed.check_strategy(cfg.distributed, get_method(cfg.adapter))
        code = distributed.launch(stage.replace("_", "-"), [a for a in argv if a != "--json"], cfg.num_processes,
                                  cfg.distributed, run_id)
        if code != 0:
            reason = run_tags(run_id).get(ERROR_TAG)
            raise RuntimeError(f"{cfg.num_processes} training processes failed (exit code {code})"
                               + (f": {reason}" if reason else "; their output above says why"))
    return {"run_id": run_id, "num_processes": cfg.num_processes, "distributed": cfg.distributed,
            **run_metrics(run_id)}


def _run_off_main(stage: str, recipe: str | None, overrides: dict) -> dict:
    """A worker other than rank 0: the same training, logging nothing (rank 0 logs for the job)."""
    from peft_arena.tracking.tracker import NullTracker

    run_id = os.environ.get("PEFT_ARENA_RUN_ID") or os.environ.get("MLFLOW_RUN_ID") or "no-run"
    cfg = build_config(stage, recipe, overrides)
    return {"run_id": run_id, **(_stage_runner(stage)(cfg, NullTracker(run_id)) or {})}


def _cmd_stage(args, extra: list[str], argv: list[str] | None = None) -> int:
    _doctor_sweep()
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("stage", "config", "set", "json", "command", "resume")}
    overrides.update(parse_assignments(args.set))
    overrides.update(pairs_to_overrides(extra))
    # mlflow run passes every declared parameter; an empty string means "use the config default".
    overrides = {k: v for k, v in overrides.items() if v != ""}
    if args.json:  # stdout carries only the JSON; what the stage prints for people goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = run_stage(args.stage, args.config or None, overrides, argv, getattr(args, "resume", ""))
    else:
        result = run_stage(args.stage, args.config or None, overrides, argv, getattr(args, "resume", ""))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result.get("run_id") and os.environ.get("RANK", "0") == "0":  # one line per job, not per process
        print(f"[peft-arena] {args.stage} finished: run {result['run_id']}", file=sys.stderr)
    return 0


def _cmd_methods(args) -> int:
    from peft_arena.methods import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'method':<9} {'family':<6} {'SFT lr':<8} {'GRPO lr':<8} {'merges':<6}  default options\n"
          f"{'':<10}description")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "-"
        print(f"{r['name']:<9} {r['family']:<6} {r['sft_lr']:<8g} {r['grpo_lr']:<8g} "
              f"{'yes' if r['mergeable'] else 'no':<6}  {opts}\n          {r['summary']}")
    return 0


def _cmd_benchmarks(args) -> int:
    from peft_arena.evaluation import describe_benchmarks, describe_suites, suite_of

    rows, suites = describe_benchmarks(), describe_suites()
    if args.json:
        print(json.dumps({"suites": suites, "benchmarks": rows}, indent=2, default=str))
        return 0
    print("suites (evaluate --suite NAME; names and benchmark names combine with commas):")
    for s in suites:
        print(f"  {s['name']:<9} {', '.join(s['members'])}\n            {s['note']}")
    print(f"\nbenchmarks:\n  {'name':<13}{'suite':<10}{'protocol':<15}{'headline':<12}{'base/instruct':<14}"
          "offline source")
    for r in rows:
        src = r["source"]
        offline = src.get("package") or (f"bundled sample ({src['sample']})" if src.get("sample") else "-")
        prompts = f"{r['prompt_format']['base']}/{r['prompt_format']['instruct']}"
        print(f"  {r['name']:<13}{suite_of(r['group']):<10}{r.get('protocol', ''):<15}{r['headline']:<12}"
              f"{prompts:<14}{offline}")
    print("\nbase/instruct: the prompt format each model kind gets (chat template or raw text; docs/prompting.md)."
          "\nFull sets: point data_dir (or PEFT_ARENA_DATA_DIR) at a folder of the benchmark files (a bundled "
          "sample makes an evaluation provisional); `--json` lists hub ids, prompts, generation settings and "
          "deviations.")
    return 0


def _cmd_count_params(args) -> int:
    from peft_arena.methods.ops import count_params

    overrides = {}
    for item in args.set or []:
        overrides.update(parse_assignments(item))
    result = count_params(args.base, args.method, overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['method']} {result['label']} on {result['base']}: trainable "
              f"{result['trainable']:,} ({result['trainable'] / 1e6:.2f}M) of {result['total']:,}")
    return 0


def _cmd_doctor(args) -> int:
    from peft_arena.tracking.doctor import run_doctor

    result = run_doctor(args.outputs, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    verb = "would " if args.dry_run else ""
    for e in result["dead_runs"]:
        print(f"run {e['run_id']} ({e['stage']}): {verb}end FAILED: {e['why']}")
    for e in result["unjudged_runs"]:
        print(f"run {e['run_id']} ({e['stage']}): left RUNNING: {e['why']}")
    for e in result["half_registrations"]:
        print(f"version {e['version']} of {e['name']!r}: {verb}remove: {e['why']}")
    for key, what in (("pruned_outputs", "local output"), ("pruned_cache", "cache entry")):
        for e in result[key]:
            print(f"{what} {e['path']} ({e['bytes'] / 2**20:.1f} MiB): {verb}remove: {e['why']}")
    if not any(result[k] for k in ("dead_runs", "unjudged_runs", "half_registrations", "pruned_outputs",
                                   "pruned_cache")):
        print("doctor: nothing to repair or prune")
    return 0


def _cmd_demo(args) -> int:
    from peft_arena.demo import run_demo

    run_demo(args.dir, fast=args.fast)
    return 0


def build_parser(listings_for: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The CLI; verbs in ``listings_for`` get the method/benchmark tables in their --help (built on demand
    because they import peft and the evaluators)."""
    parser = argparse.ArgumentParser(
        prog="peft-arena",
        description="Which finetuning method learns the most and forgets the least? Train, promote, evaluate, "
                    "profile and compare PEFT methods, tracked in MLflow (MLFLOW_TRACKING_URI, default "
                    "sqlite:///mlflow.db).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for stage in STAGE_CONFIGS:
        _add_stage_parser(sub, stage, stage.replace("_", "-") in listings_for)
    p = sub.add_parser("methods", help="list every PEFT method with its defaults and learning rates")
    p.add_argument("--json", action="store_true", help="print the methods as JSON (options, defaults, learning rates)")
    p = sub.add_parser("benchmarks", help="list the suites (demo, math, med, general, extended, all) with their "
                                          "members, and every benchmark with its suite, source and protocol")
    p.add_argument("--json", action="store_true", help="print suites and benchmarks as JSON (hub ids, prompts, "
                                                       "generation settings, deviations)")
    p = sub.add_parser("count-params", help="trainable and total parameters of a method on a base (meta device, "
                                            "no weights)", epilog=_methods_epilog() if "count-params" in listings_for else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="qwen2.5-7b, llama3.2-3b, smollm2-135m, tiny, or a model folder")
    p.add_argument("--method", required=True, help="method registry name (`peft-arena methods`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, e.g. --set r=16")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p = sub.add_parser("doctor", help="end runs whose process died (FAILED, reason in arena.error), remove versions "
                                      "a killed promote left half-registered, prune local outputs and the download "
                                      "cache", description="Repairs the store in MLFLOW_TRACKING_URI. Every stage "
                       "command does the first two cheaply before it starts. Pruning policy: docs/ARCHITECTURE.md.")
    p.add_argument("--outputs", default=".arena/outputs", help="training runs' local output folder to prune")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    p.add_argument("--json", action="store_true", help="print what was (or would be) done as JSON")
    p = sub.add_parser("demo", help="a small arena on the embedded model: SFT LoRA and OFT, promote, evaluate "
                                    "(and the base), spectral, report; prints how to open the MLflow UI")
    p.add_argument("--dir", default="demo_arena", help="folder for the demo's MLflow store and outputs")
    p.add_argument("--fast", action="store_true", help="the tiny random model and minimal steps (a smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # transformers 5 deprecation notices about names TRL/peft still use: noise for our users, not theirs to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = build_parser(listings_for=tuple(argv[:1]) if wants_help else ())
    args, extra = parser.parse_known_args(argv)
    try:
        if hasattr(args, "stage"):
            return _cmd_stage(args, extra, argv[1:])
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        handler = {"methods": _cmd_methods, "benchmarks": _cmd_benchmarks, "count-params": _cmd_count_params,
                   "doctor": _cmd_doctor, "demo": _cmd_demo}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        print("peft-arena: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `peft-arena methods | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # one clear line; the run (if any) holds the traceback in error.txt
        if os.environ.get("PEFT_ARENA_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"peft-arena: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, (ConfigError, ValueError, KeyError)) else 1


if __name__ == "__main__":
    sys.exit(main())
