"""Stability/plasticity scores (percentage points), as the paper reports them (reference §4.4–4.5).

Which headline metric feeds each average:

* ``score/target_avg`` – per target domain, the mean of the headline metrics of its *core* benchmarks present in
  the suite: math = MATH-500, AMC23, AIME24 ``acc`` (avg@n; the paper's ``math_avg``; GSM8K is reported but not
  averaged); med = every medical benchmark's ``acc`` (unweighted mean over sources, the paper's ``med_avg``).
  If no core benchmark of a domain is in the suite, the domain's benchmarks present are averaged instead.
  Each domain's average is reported as ``score/target_<domain>_avg``. ``target_avg`` is the evaluated model's
  own domain's average when the model's domain is known (a math model is not scored on medicine); for a model of
  unknown domain with both domains in the suite it is the mean of the two.
* ``score/general_avg`` – mean of IFEval ``inst_strict``, NQ ``em`` and BBH ``avg`` (those present); if none of the
  three is in the suite, the mean of the headline metrics of the general/extended benchmarks present
  (HumanEval ``pass_at_1``, the others ``acc``).
* With a base-model evaluation of the same suite: ``score/target_gain_pp`` = target_avg − base target_avg,
  ``score/general_delta_pp`` = general_avg − base general_avg, ``score/forget_pp`` = max(0, −general_delta_pp).
"""

from __future__ import annotations

from statistics import mean
from typing import Iterable

from peft_arena.evaluation.benchmarks import BenchmarkSpec, get_benchmark

CORE_TARGET = {"math": ("math500", "amc23", "aime24")}
CORE_GENERAL = ("ifeval", "nq", "bbh")


def _specs(benchmarks: Iterable[BenchmarkSpec | str]) -> list[BenchmarkSpec]:
    return [b if isinstance(b, BenchmarkSpec) else get_benchmark(b) for b in benchmarks]


def _headline(metrics: dict[str, float], spec: BenchmarkSpec, which: str) -> float:
    key = spec.metric_key(spec.headline)
    if key not in metrics:
        raise ValueError(f"{which} metrics lack {key}; evaluate that model on the same suite first")
    return float(metrics[key])


def averaged_benchmarks(benchmarks: Iterable[BenchmarkSpec | str]) -> dict[str, list[BenchmarkSpec]]:
    """The benchmarks each average is taken over: keys ``target_<domain>`` and ``general``."""
    specs = _specs(benchmarks)
    out: dict[str, list[BenchmarkSpec]] = {}
    for domain in sorted({s.domain for s in specs if s.domain}):
        present = [s for s in specs if s.domain == domain]
        core = [s for s in present if s.name in CORE_TARGET.get(domain, ())]
        out[f"target_{domain}"] = core or present
    general = [s for s in specs if s.domain is None]
    core = [s for s in general if s.name in CORE_GENERAL]
    if general:
        out["general"] = core or general
    return out


def _averages(metrics: dict[str, float], groups: dict[str, list[BenchmarkSpec]], which: str,
              domain: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    domain_avgs = []
    for group, specs in groups.items():
        value = mean(_headline(metrics, s, which) for s in specs)
        if group == "general":
            out["score/general_avg"] = value
        else:
            out[f"score/{group}_avg"] = value
            domain_avgs.append(value)
    if domain and f"score/target_{domain}_avg" in out:
        out["score/target_avg"] = out[f"score/target_{domain}_avg"]
    elif domain_avgs:
        out["score/target_avg"] = mean(domain_avgs)
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
