"""Rewards on real-looking completions, garbage, huge and adversarial inputs (each must return fast)."""

import threading
import time

import pytest

from peft_arena.data import load_records
from peft_arena.training.rewards import (
    accuracy,
    extract_option_letter,
    format_reward,
    math_reward,
    med_mc_reward,
)

SOLUTION = (
    "We add the fractions over the common denominator 6: $\\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$.\n"
    "Therefore the answer is $\\boxed{\\dfrac{5}{6}}$."
)


def chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("completion, truth, expected", [
    (SOLUTION, "\\frac{5}{6}", 1.0),
    (chat(SOLUTION), "\\frac{5}{6}", 1.0),                       # conversational completion
    ("so $x = \\boxed{0.5}$", "\\frac{1}{2}", 1.0),               # numeric equivalence
    ("the set is \\boxed{\\{1,2,3,4\\}}", "\\{1,3\\} \\cup \\{2,4\\}", 1.0),
    ("expand: \\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("first \\boxed{5}, on reflection \\boxed{6}", "6", 1.0),      # the LAST box counts
    ("first \\boxed{6}, on reflection \\boxed{5}", "6", 0.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # nested braces
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{3.14}", "\\pi", 0.0),
    ("The answer is 42.", "42", 0.0),                              # no box, no reward
    ("\\boxed{42", "42", 0.0),                                     # unclosed box
    ("\\boxed{}", "42", 0.0),
    ("}}}{{{\\boxed{{{{ \x00\ufffd garbage $$$ \\frac{", "1", 0.0),
    ("", "1", 0.0),
])
def test_math_reward(completion, truth, expected):
    assert math_reward([completion], [truth]) == [expected]


def test_math_reward_huge_and_adversarial_inputs_return_quickly():
    huge = "x" * 1_000_000 + "\\boxed{7}"
    huge_box = "\\boxed{" + "1+" * 500_000 + "1}"
    tower = "\\boxed{9^{9^{9^{9}}}}"
    deep = "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}"
    start = time.time()
    scores = math_reward([huge, huge_box, tower, deep], ["7", "3", "3", "3"])
    elapsed = time.time() - start
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert elapsed < 10, f"rewards took {elapsed:.1f}s"


def test_math_reward_off_the_main_thread_is_time_limited():
    results = {}

    def work():
        start = time.time()
        results["scores"] = math_reward(["\\boxed{9^{9^{9}}}", "\\boxed{\\frac{2}{4}}"], ["3", "\\frac{1}{2}"])
        results["elapsed"] = time.time() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert results["scores"] == [0.0, 1.0]
    assert results["elapsed"] < 60  # includes starting the helper process once


def test_every_bundled_math_answer_earns_its_reward():
    records = load_records("math-sample")
    assert math_reward([r["answer"] for r in records], [r["ground_truth"] for r in records]) == [1.0] * len(records)


def test_every_bundled_med_answer_earns_its_reward():
    records = load_records("med-sample")
    assert med_mc_reward([r["answer"] for r in records], [r["ground_truth"] for r in records]) == [1.0] * len(records)
    wrong = [chr(ord("A") + (ord(r["ground_truth"]) - ord("A") + 1) % 4) for r in records]
    assert med_mc_reward([r["answer"] for r in records], wrong) == [0.0] * len(records)


@pytest.mark.parametrize("text, letter", [
    ("Scurvy is vitamin C deficiency, so the answer is \\boxed{C}.", "C"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("\\boxed{D. Vitamin D}", "D"),
    ("Thinking... The answer is (B). Because...", "B"),
    ("Reasoning about the options.\nAnswer: E", "E"),
    ("Long reasoning here.\n(C)", "C"),
    ("A vaccine makes antibodies.", None),            # a sentence starting with "A" chose nothing
    ("the answer is a tricky one", None),
    ("\\boxed{vitamin}", None),                      # a box without a letter is a wrong answer
    ("", None),
])
def test_extract_option_letter(text, letter):
    assert extract_option_letter(text) == letter


def test_med_reward_accepts_worded_labels_and_garbage():
    assert med_mc_reward(["... \\boxed{yes}", "\\boxed{\\text{No}}", "\\boxed{maybe}"], ["yes", "no", "yes"]) == [1.0, 1.0, 0.0]
    start = time.time()
    assert med_mc_reward(["A" * 1_000_000, "\x00" * 10, chat("\\boxed{C}")], ["B", "A", "C"]) == [0.0, 0.0, 1.0]
    assert time.time() - start < 2


def test_format_reward():
    assert format_reward([
        "reasoning... so the answer is \\boxed{12}.",
        chat("\\boxed{C}"),
        "no box at all",
        "\\boxed{}",
        "\\boxed{3} " + "and then rambling on " * 50,
        "\\boxed{unclosed",
    ]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy():
    assert accuracy(["\\boxed{2}", "\\boxed{3}", "nothing", "\\boxed{2.0}"], ["2"] * 4, "math") == 0.5
    assert accuracy([], [], "med") == 0.0
    with pytest.raises(ValueError, match="domain"):
        accuracy(["x"], ["1"], "law")
