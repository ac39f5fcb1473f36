"""Answer extraction and grading, one module per domain, shared by the GRPO rewards and the benchmarks.

A leaf package: it imports no other ``peft_arena`` room, so ``training/`` (rewards), ``evaluation/``
(benchmark scorers) and ``data/`` (ground truths from worked solutions) all use the same rule on the same text.

* :mod:`~peft_arena.answers.boxed`: the one ``last_boxed`` (``\\boxed{}`` / ``\\fbox{}``, the last box wins).
* :mod:`~peft_arena.answers.math_answer`: math extraction and the one math grader (math-verify, corrected).
* :mod:`~peft_arena.answers.choice`: the option letter a multiple-choice (medical) response chose.
* :mod:`~peft_arena.answers.budget`: the load-independent work limit the math grader runs under.

The rules and every deviation from the paper and from math-verify: ``docs/grading.md``.
"""

from peft_arena.answers.boxed import last_boxed
from peft_arena.answers.choice import choice_correct, extract_choice, options_in_prompt
from peft_arena.answers.math_answer import MathAnswer, extract_math_answer, grade_math, math_equal

__all__ = ["MathAnswer", "choice_correct", "extract_choice", "extract_math_answer", "grade_math", "last_boxed",
           "math_equal", "options_in_prompt"]
