"""Verifiable rewards for GRPO, as plain TRL reward functions.

TRL calls ``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and wants one float per
completion. Completions are strings, or conversations (``[{"role": "assistant", "content": ...}]``) for chat
prompts; both are accepted. Every function returns 0.0 rather than raising on any model output.

The correctness rewards judge a completion with exactly the rule the benchmarks score it with
(``peft_arena.answers``, ``docs/grading.md``), so training and evaluation cannot disagree on the same text:

* :func:`math_reward`: 1.0 when the completion's answer (last ``\\boxed{}``, else "the answer is …", else the
  last number of the last line, never a step label) equals the ground truth under the math grader
  (math-verify with its known mistakes corrected), else 0.0. Like the paper's RL scorer (reference §3.2) there is
  no partial credit; its fall-backs to unboxed answers are the paper's too. :func:`format_reward` is the
  separate incentive to box the answer.
* :func:`med_mc_reward`: 1.0 when the option the completion chose (``answers.choice.extract_choice``, the
  options read from the prompt) is the ground truth letter (or worded label such as "yes").
* :func:`format_reward`: 1.0 when the completion ends its reasoning with a non-empty ``\\boxed{}``.

Time: the math grader bounds its work by a count of Python calls, not by a wall clock, so a verdict does not
change when the machine is loaded, and it runs in any thread without a helper process
(``peft_arena.answers.budget``). Inputs are capped before parsing, so neither a 1 MB completion nor an exponent
tower like ``9^{9^{9^9}}`` can stall training.
"""

from __future__ import annotations

from typing import Any, Iterable

from peft_arena.answers import choice_correct, grade_math, last_boxed, options_in_prompt
from peft_arena.answers.boxed import last_box_start

MAX_ANSWER_CHARS = 300  # a boxed answer longer than this is not an answer
_DEFAULT_LETTERS = "ABCDEFGHIJ"  # options A–J (MMLU-Pro's ten) when a prompt lists none


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, a conversation's assistant turns joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        parts = [m.get("content") or "" for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "\n".join(str(p) for p in parts)
    return "" if completion is None else str(completion)


# ---------------------------------------------------------------------------------------------------- math


def math_reward(completions: list, ground_truth: list[str], **kwargs) -> list[float]:
    """1.0 per completion whose answer equals its ground truth under the math grader, else 0.0."""
    return [1.0 if math_correct(completion_text(c), str(gt)) else 0.0 for c, gt in zip(completions, ground_truth)]


def math_correct(text: str, ground_truth: str) -> bool:
    """Is the answer in ``text`` equivalent to ``ground_truth``? Never raises, never hangs."""
    try:
        return grade_math(text, ground_truth)
    except Exception:  # the grader is total on strings; a reward must survive anything else too
        return False


# ---------------------------------------------------------------------------------------------------- medical


def med_mc_reward(completions: list, ground_truth: list[str], prompts: list | None = None, **kwargs) -> list[float]:
    """1.0 per completion whose chosen option matches its ground truth (a letter, or a label such as "yes")."""
    prompts = list(prompts) if prompts is not None else [None] * len(completions)
    return [1.0 if med_correct(completion_text(c), str(gt), _prompt_text(p)) else 0.0
            for c, gt, p in zip(completions, ground_truth, prompts)]


def med_correct(text: str, ground_truth: str, prompt: str | None = None) -> bool:
    """Did ``text`` choose ``ground_truth`` among the options listed in ``prompt`` (A–J when it lists none)?"""
    options = options_in_prompt(prompt or "") or _DEFAULT_LETTERS
    try:
        return choice_correct(text, ground_truth, options)
    except ValueError:
        return False


def _prompt_text(prompt: Any) -> str:
    """A prompt's text: a string as is, a conversation's last user turn."""
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return "" if prompt is None else str(prompt)


# ---------------------------------------------------------------------------------------------------- format


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion has a closed, non-empty ``\\boxed{}`` and at most a short sentence after it."""
    scores = []
    for c in completions:
        text = completion_text(c)
        start = last_box_start(text)
        boxed = last_boxed(text, max_chars=MAX_ANSWER_CHARS)
        if start < 0 or boxed is None or not boxed.strip():
            scores.append(0.0)
            continue
        after = len(text) - (start + len("\\boxed{") + len(boxed) + 1)
        scores.append(1.0 if after <= 200 else 0.0)
    return scores


# ---------------------------------------------------------------------------------------------------- helpers

CORRECTNESS_REWARDS = {"math": math_reward, "med": med_mc_reward}


def correctness_reward(domain: str):
    """The 0/1 correctness reward of a domain (what accuracy is measured with)."""
    try:
        return CORRECTNESS_REWARDS[domain]
    except KeyError:
        raise ValueError(f"no reward for domain {domain!r}: use one of {', '.join(CORRECTNESS_REWARDS)}") from None


def is_correct(completion: Any, ground_truth: str, domain: str) -> bool:
    return correctness_reward(domain)([completion], [ground_truth])[0] == 1.0


def accuracy(completions: Iterable[Any], ground_truths: Iterable[str], domain: str) -> float:
    """Fraction of completions judged correct (0.0 for an empty list)."""
    completions, ground_truths = list(completions), list(ground_truths)
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    if not completions:
        return 0.0
    scores = correctness_reward(domain)(completions, ground_truths)
    return sum(scores) / len(scores)
