"""Run descriptions (MLflow's note, ``mlflow.note.content``): what a run did, in one screen of markdown.

Every stage ends by describing its run through ``tracker.describe(text)``; the texts are built here so they read
the same in every stage: a headline, a small table of the numbers a person compares, and the glossary line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from peft_arena.tracking.tracker import GLOSSARY

GLOSSARY_LINE = (f"Metric names are explained in `{GLOSSARY}` (the peft-arena repository's metrics glossary); "
                 "per-matrix numbers are in the artifacts.")


def fmt(value: Any, digits: int = 4) -> str:
    """A number as a person reads it: 4 significant digits, whole numbers as they are, ``n/a`` for missing."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: Any) -> str:
    """A percentage or percentage points to 0.01."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p) + "\n"


def training(train: str, method: str, label: str, domain: str, base: str, data: str, examples: int | None,
             steps: int, result: dict, adapter_uri: str | None, monitor_stopped: str | None = None) -> str:
    """SFT/GRPO: what was trained on what, for how long, and where it ended."""
    what = f"**{train.upper()}** of **{method} {label}** on **{base}** ({domain})"
    rows = [("data", f"`{data}`" + (f" ({examples:,} {'examples' if train == 'sft' else 'prompts'})"
                                    if examples is not None else "")),
            ("steps", fmt(steps)),
            ("trainable params", fmt(result.get("trainable_params")))]
    if train == "sft":
        rows.append(("final loss (`train/final_loss`)", fmt(result.get("train/final_loss"))))
    else:
        rows += [("final reward (`train/final_reward`)", fmt(result.get("final_reward"))),
                 ("final accuracy (`train/final_accuracy`)", fmt(result.get("final_accuracy")))]
    rows.append(("adapter", f"`{adapter_uri}`" if adapter_uri else "none (shapes-only run)"))
    stopped = f"**Stopped early by the forgetting monitor**: {monitor_stopped}." if monitor_stopped else ""
    return _join(what, stopped, table(("", "value"), rows),
                 "Curves: `train/loss` (SFT) or `train/reward` (GRPO) per logged step; the training data is this "
                 "run's dataset input.", GLOSSARY_LINE)


def evaluation(model: str, scores: dict[str, float], per_benchmark: dict[str, dict[str, float]],
               provenance: dict[str, str], provisional: bool, base_run: str | None) -> str:
    """Evaluate: the arena scores and each benchmark's numbers with where its items came from."""
    head = f"**Evaluation** of `{model}`"
    score_rows = [(f"`{k}`", pct(v)) for k, v in sorted(scores.items())]
    bench_rows = [(b, ", ".join(f"{m} {pct(v)}" for m, v in sorted(vals.items())), provenance.get(b, "n/a"))
                  for b, vals in sorted(per_benchmark.items())]
    warning = ("**Provisional scores**: some benchmarks did not run in full under their protocol (bundled samples, "
               "subsets or overrides: provenance column); these numbers are smoke checks, not benchmark scores."
               if provisional else "**Full evaluation**: every benchmark ran in full under its protocol.")
    base = f"Gain and forgetting are percentage points against the base model's evaluation run `{base_run}`." \
        if base_run else ""
    return _join(head, warning, table(("score", "value (%, pp)"), score_rows),
                 table(("benchmark", "metrics (%)", "provenance"), bench_rows), base, GLOSSARY_LINE)


def policy(model: str, promoted: bool, alias: str, gates: dict[str, Any], values: dict[str, Any],
           reasons: list[str], policy_file: str) -> str:
    """The champion decision: promote or keep, and every gate's value against its threshold."""
    verdict = (f"**Promoted**: `{model}` is now `@{alias}`." if promoted
               else f"**Kept**: `{model}` did not become `@{alias}`; the alias did not move.")
    rows = [(f"`{g}`", fmt(values.get(g)), fmt(t), "pass" if passed else "FAIL")
            for g, (t, passed) in gates.items()]
    return _join(verdict, table(("gate", "value", "threshold", "result"), rows),
                 "Reasons: " + "; ".join(reasons), f"Policy: `{policy_file}`.", GLOSSARY_LINE)


def report(leaderboard_md: str, models: int, front: int) -> str:
    return _join(f"**Report**: {models} evaluated models, {front} on the Pareto front "
                 "(artifacts: `leaderboard.csv`, `pareto.png`, `family_summary.md`).", leaderboard_md, GLOSSARY_LINE)


def spectral(model: str, base: str, matrices: int, headline: dict[str, float]) -> str:
    rows = [(f"`{k}`", fmt(v)) for k, v in headline.items()]
    return _join(f"**Spectral profile** of `{model}` against `{base}`: {matrices} weight matrices.",
                 table(("metric (mean over every matrix)", "value"), rows),
                 "Per-module-type means are the `spectral/<module>/<metric>` metrics; every matrix's numbers are in "
                 "the `spectral/per_matrix.json` table and the plots.", GLOSSARY_LINE)


def promotion(model_uri: str, source_run: str, alias: str, fidelity: float, bound: float) -> str:
    return _join(f"**Registered** `{model_uri}` from training run `{source_run}` and set `@{alias}`.",
                 table(("check", "value", "bound"),
                       [("merge max |logit diff|", fmt(fidelity), fmt(bound))]), GLOSSARY_LINE)
