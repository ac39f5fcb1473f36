"""Stability/plasticity scores (percentage points), as the paper reports them (reference §4.4–4.5).

A contract metric exists only when its definition holds; otherwise it is not logged under that name:

* ``score/target_<domain>_avg`` – the mean of the headline metrics of *every* core benchmark of the domain:
  math = MATH-500, AMC23, AIME24 ``acc`` (avg@n; the paper's ``math_avg``; GSM8K is reported but not averaged);
  med = MedQA, MedMCQA, PubMedQA and the MMLU medical subjects ``acc`` (unweighted mean over sources, as the
  paper's ``med_avg``; these four are the offline part of the paper's medical suite, see ``target_med.py``).
  With only some of them in the suite, the mean of the domain's benchmarks present is logged as
  ``score/target_<domain>_partial_avg`` instead.
* ``score/target_avg`` – the evaluated model's own domain's ``target_<domain>_avg`` (a math model is not scored on
  medicine); for a model of unknown domain (a base model), the one domain whose average holds, if exactly one does.
* ``score/general_avg`` – the paper's general average: the mean of IFEval ``inst_strict``, NQ ``em`` and BBH
  ``avg``, all three required. With only some of them: ``score/general_partial_avg``. The extended retention
  benchmarks (HumanEval ``pass_at_1``, the others ``acc``) are averaged as ``score/extended_avg``; they never enter
  the general average.
* With a base-model evaluation under the same evaluation key: ``score/target_gain_pp`` = target_avg − base
  target_avg, ``score/general_delta_pp`` = general_avg − base general_avg, ``score/forget_pp`` =
  max(0, −general_delta_pp). No gain or forgetting is computed from a partial average.
"""

from __future__ import annotations

from statistics import mean
from typing import Iterable

from peft_arena.evaluation.benchmarks import BenchmarkSpec, get_benchmark

CORE_TARGET = {"math": ("math500", "amc23", "aime24"), "med": ("medqa", "medmcqa", "pubmedqa", "mmlu_medical")}
CORE_GENERAL = ("ifeval", "nq", "bbh")


def _specs(benchmarks: Iterable[BenchmarkSpec | str]) -> list[BenchmarkSpec]:
    return [b if isinstance(b, BenchmarkSpec) else get_benchmark(b) for b in benchmarks]


def _headline(metrics: dict[str, float], spec: BenchmarkSpec, which: str) -> float:
    key = spec.metric_key(spec.headline)
    if key not in metrics:
        raise ValueError(f"{which} metrics lack {key}; evaluate that model on the same suite first")
    return float(metrics[key])


def averaged_benchmarks(benchmarks: Iterable[BenchmarkSpec | str]) -> dict[str, list[BenchmarkSpec]]:
    """The benchmarks each average is taken over, keyed by the metric's name without ``score/`` and ``_avg``:
    ``target_<domain>`` / ``general`` where the definition holds, ``target_<domain>_partial`` /
    ``general_partial`` where it does not, and ``extended``."""
    specs = _specs(benchmarks)
    out: dict[str, list[BenchmarkSpec]] = {}
    for domain in sorted({s.domain for s in specs if s.domain}):
        present = [s for s in specs if s.domain == domain]
        core = CORE_TARGET.get(domain, ())
        names = {s.name for s in present}
        if core and set(core) <= names:
            out[f"target_{domain}"] = [s for s in present if s.name in core]
        else:
            out[f"target_{domain}_partial"] = present
    general = [s for s in specs if s.group == "general"]
    if general:
        complete = set(CORE_GENERAL) <= {s.name for s in general}
        out["general" if complete else "general_partial"] = [s for s in general if s.name in CORE_GENERAL]
    extended = [s for s in specs if s.group == "extended"]
    if extended:
        out["extended"] = extended
    return out


def _averages(metrics: dict[str, float], groups: dict[str, list[BenchmarkSpec]], which: str,
              domain: str | None = None) -> dict[str, float]:
    out = {f"score/{group}_avg": mean(_headline(metrics, s, which) for s in specs) for group, specs in groups.items()}
    if domain:
        if f"score/target_{domain}_avg" in out:
            out["score/target_avg"] = out[f"score/target_{domain}_avg"]
    else:
        complete = [g for g in groups if g.startswith("target_") and not g.endswith("_partial")]
        if len(complete) == 1:
            out["score/target_avg"] = out[f"score/{complete[0]}_avg"]
    return out


def arena_scores(metrics: dict[str, float], base_metrics: dict[str, float] | None,
                 benchmarks: Iterable[BenchmarkSpec | str], domain: str | None = None) -> dict[str, float]:
    """Target/general averages of ``metrics`` and, with ``base_metrics``, gain, general delta and forgetting.

    ``domain``: the evaluated model's target domain (its training domain); the base is scored on the same one.
    """
    groups = averaged_benchmarks(benchmarks)
    scores = _averages(metrics, groups, "evaluated model", domain)
    if base_metrics is None:
        return scores
    base = _averages(base_metrics, groups, "base model", domain)
    if "score/target_avg" in scores:
        scores["score/target_gain_pp"] = scores["score/target_avg"] - base["score/target_avg"]
    if "score/general_avg" in scores:
        delta = scores["score/general_avg"] - base["score/general_avg"]
        scores["score/general_delta_pp"] = delta
        scores["score/forget_pp"] = max(0.0, -delta)
    return scores
