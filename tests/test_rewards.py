"""Rewards on real-looking completions, garbage, huge and adversarial inputs (each must return fast)."""

import threading
import time

import pytest

from peft_arena.answers import extract_choice, options_in_prompt
from peft_arena.data import load_records
from peft_arena.evaluation.benchmarks import get_benchmark
from peft_arena.training.rewards import accuracy, format_reward, math_reward, med_mc_reward

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
    ("The answer is 42.", "42", 1.0),                              # no box: the paper's "the answer is" fall-back
    ("Step 3: we get 2 + 2 = 4.\nStep 4: unclear", "4", 0.0),      # a step label is not an answer
    ("Adding them up gives 17 apples.", "17", 1.0),                 # last number of the last line
    ("\\boxed{42", "42", 0.0),                                     # unclosed box: cut off, no answer
    ("x \\boxed{\\varnothing}", "\\emptyset", 1.0),                  # math-verify's misses, fixed
    ("\\boxed{x \\le 3}", "(-\\infty, 3]", 1.0),
    ("\\boxed{0.0000002}", "0.0000001", 0.0),
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


def test_math_reward_off_the_main_thread_gives_the_same_verdicts():
    """No signal.alarm and no helper process: a worker thread grades exactly like the main thread."""
    completions = ["\\boxed{9^{9^{9}}}", "\\boxed{\\frac{2}{4}}", "\\boxed{x < 1 \\text{ or } x > 3}"]
    truths = ["3", "\\frac{1}{2}", "(-\\infty, 1) \\cup (3, \\infty)"]
    results = {}

    def work():
        results["scores"] = math_reward(completions, truths)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert results["scores"] == math_reward(completions, truths) == [0.0, 1.0, 1.0]


def test_math_reward_and_benchmark_judge_the_same_text_alike():
    """Issue 14: one extraction and one grader for the reward and MATH-500/AMC23/AIME24."""
    spec = get_benchmark("math500")
    texts = ["so \\boxed{5}, no: \\boxed{6}", "The answer is 6.", "Step 5: recheck\nStep 6: unclear",
             "we get \\fbox{6}", "\\boxed{6.0}", "The total is 6 apples.", "\\boxed{6", "nothing"]
    rewards = math_reward(texts, ["6"] * len(texts))
    scored = spec.score({"gold": "6"}, texts)
    assert rewards == [1.0 if ok else 0.0 for ok in scored["sample_correct"]]
    assert rewards == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_every_bundled_math_answer_earns_its_reward():
    records = load_records("math-sample")
    assert math_reward([r["answer"] for r in records], [r["ground_truth"] for r in records]) == [1.0] * len(records)


def test_every_bundled_med_answer_earns_its_reward():
    records = load_records("med-sample")
    assert med_mc_reward([r["answer"] for r in records], [r["ground_truth"] for r in records]) == [1.0] * len(records)
    wrong = [chr(ord("A") + (ord(r["ground_truth"]) - ord("A") + 1) % 4) for r in records]
    assert med_mc_reward([r["answer"] for r in records], wrong) == [0.0] * len(records)


PROMPT = "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D"


@pytest.mark.parametrize("text, truth, expected", [
    ("Scurvy is vitamin C deficiency, so the answer is \\boxed{C}.", "C", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{D. Vitamin D}", "D", 1.0),
    ("\\boxed{Vitamin C}", "C", 1.0),                   # the option's text in the box
    ("Thinking... The answer is (B). Because...", "B", 1.0),
    ("Reasoning about the options.\nAnswer: D", "D", 1.0),
    ("The answer is B. On reflection, \\boxed{C}", "C", 1.0),  # the box wins
    ("A vaccine makes antibodies.", "A", 0.0),           # a sentence starting with "A" chose nothing
    ("\\boxed{vitamin}", "A", 0.0),                      # a box without an option is a wrong answer
    ("", "A", 0.0),
])
def test_med_reward(text, truth, expected):
    assert med_mc_reward([text], [truth], prompts=[[{"role": "user", "content": PROMPT}]]) == [expected]


def test_options_are_read_from_the_prompt():
    assert options_in_prompt(PROMPT) == {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
    assert options_in_prompt("B. not a list\nA) x\nB) y") == {"A": "x", "B": "y"}
    assert options_in_prompt("no options") == {}


def test_med_reward_and_benchmark_read_the_same_letter():
    """Issue 14: the reward and the medical benchmarks used to extract letters differently."""
    spec = get_benchmark("medqa")
    options = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
    item = {"options": options, "gold": "C"}
    texts = ["The answer is B.\n\n\\boxed{C}", "I pick vitamin c", "no idea", "Answer: (C)", "\\boxed{Vitamin C}"]
    for text in texts:
        chosen, _ = extract_choice(text, options)
        reward = med_mc_reward([text], ["C"], prompts=[PROMPT])[0]
        assert spec.score(item, [text])["correct"] == reward == float(chosen == "C"), text


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
