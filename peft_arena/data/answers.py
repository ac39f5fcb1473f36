"""Ground truths from worked solutions: the last ``\\boxed{}`` (the shared reader in ``peft_arena.answers``) and
GSM8K's ``#### n`` answers.

Pure string functions, linear in the input length.
"""

from __future__ import annotations

import re

from peft_arena.answers.boxed import last_boxed

__all__ = ["gsm8k_solution", "is_gsm8k_answer", "last_boxed"]

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """GSM8K's ``"…<<2*3=6>>6 …\\n#### 6"`` → (worked solution ending in ``\\boxed{6}``, ``"6"``).

    The calculator annotations ``<<…>>`` are removed; the final number loses its thousands separators.
    """
    match = _GSM8K_FINAL.search(answer)
    if not match:
        raise ValueError("not a GSM8K answer: no '#### <number>' line")
    final = match.group(1).replace(",", "").strip()
    body = _GSM8K_CALC.sub("", answer[:match.start()]).rstrip()
    return f"{body}\nThe final answer is $\\boxed{{{final}}}$.", final


def is_gsm8k_answer(answer: str) -> bool:
    return bool(_GSM8K_FINAL.search(answer)) and "\\boxed" not in answer
