"""BBH answer extraction, as OpenCompass ``bbh_gen_5b92b0`` scores it (``opencompass/datasets/bbh.py``).

Multiple-choice subtasks: ``bbh_mcq_postprocess`` on both prediction and target, exact match of the letter.
Free-form subtasks: ``bbh_freeform_postprocess`` on the prediction, exact match with the raw target.
"""

from __future__ import annotations

import re

MCQ_TASKS = (
    "temporal_sequences", "disambiguation_qa", "date_understanding", "tracking_shuffled_objects_three_objects",
    "penguins_in_a_table", "geometric_shapes", "snarks", "ruin_names", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_five_objects", "logical_deduction_three_objects", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects", "movie_recommendation",
    "salient_translation_error_detection", "reasoning_about_colored_objects",
)
FREE_FORM_TASKS = (
    "multistep_arithmetic_two", "navigate", "dyck_languages", "word_sorting", "sports_understanding",
    "boolean_expressions", "object_counting", "formal_fallacies", "causal_judgement", "web_of_lies",
)
ALL_TASKS = MCQ_TASKS + FREE_FORM_TASKS  # the 27 subtasks


def bbh_mcq_postprocess(text: str) -> str:
    ans = text
    parts = ans.split("answer is ")
    if len(parts) != 1:
        ans = parts[1].strip()
    match = re.search(r"\(([A-Z])\)*", ans)
    if match:
        return match.group(1)
    match = re.search(r"([A-Z])", ans)
    if match:
        return match.group(1)
    return ans


def bbh_freeform_postprocess(text: str) -> str:
    ans = text
    parts = ans.split("answer is ")
    if len(parts) != 1:
        ans = parts[1].strip()
    ans = ans.split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    match = re.search(r"\*\*(.*?)\*\*", ans)
    if match:
        return match.group(1)
    return ans


def score_bbh(task: str, target: str, completion: str) -> tuple[str, bool]:
    """(extracted prediction, correct) for one BBH item."""
    if task in MCQ_TASKS:
        pred = bbh_mcq_postprocess(completion)
        return pred, pred == bbh_mcq_postprocess(target)
    pred = bbh_freeform_postprocess(completion)
    return pred, pred == target
