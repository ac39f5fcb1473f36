"""Math benchmark scoring: per-problem records built on the shared extraction and grader (``peft_arena.answers``),
plus OpenCompass's GSM8K protocol.

MATH-500/AMC23/AIME24 and the GRPO math reward use one rule (``answers.math_answer``: last ``\\boxed{}`` →
"the answer is" → last number of the last line, judged by math-verify with its known mistakes corrected; see
``docs/grading.md``). GSM8K keeps OpenCompass's own extraction (``gsm8k_gen_1d7fe4``: the last number before the
next "Question:"), because the paper ran GSM8K through OpenCompass (``eval_broad_general.sh``, reference §4.3).
"""

from __future__ import annotations

import re

from peft_arena.answers.math_answer import extract_math_answer, math_equal


def score_math(gold: str, completions: list[str]) -> dict:
    """Per-problem record: extracted answers, the rule that found each, per-sample correctness, correct count."""
    answers = [extract_math_answer(c) for c in completions]
    flags = [math_equal(gold, a.text) for a in answers]
    return {"extracted": [a.text or "" for a in answers], "rule": [a.rule for a in answers],
            "sample_correct": flags, "n_correct": sum(flags), "correct": sum(flags) / max(len(flags), 1)}


# --- GSM8K (OpenCompass gsm8k_postprocess / Gsm8kEvaluator) ---------------------------------------------


def gsm8k_postprocess(text: str) -> str:
    """OpenCompass: cut at the next "Question:", take the last number."""
    text = text.split("Question:")[0]
    numbers = re.findall(r"\-?\d+\.\d+|\-?\d+", text)
    return numbers[-1] if numbers else "NULL"


def gsm8k_gold(answer: str) -> str:
    """Gold from the ``#### n`` line, commas removed."""
    return answer.split("#### ")[-1].replace(",", "").strip()


def gsm8k_equal(pred: str, gold: str) -> bool:
    try:
        return pred == gold or abs(float(pred) - float(gold)) < 1e-6
    except ValueError:
        return False
