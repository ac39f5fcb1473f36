"""Answer extraction shared by data loading (deriving a ground truth from a worked solution) and the rewards.

Pure string functions, no heavy imports: every one is linear in the input length, so they are safe on
adversarial model output (megabytes of text, unbalanced braces).
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def last_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces matched; None if there is none.

    ``\\boxed 5`` (no braces, allowed by LaTeX) gives ``5``. An unclosed last box gives None rather than
    a guess. ``max_chars`` caps the returned content: a longer one gives None (a reward must not feed a
    50 kB "answer" to a symbolic parser).
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if text.startswith(" ", i) and not text.startswith("{", i):
        # "\boxed 5": the argument is the next token
        match = re.match(r" +([^\s$]+)", text[i:i + (max_chars or 1000) + 64])
        return match.group(1) if match and (max_chars is None or len(match.group(1)) <= max_chars) else None
    if not text.startswith("{", i):
        return None
    depth = 0
    limit = len(text) if max_chars is None else min(len(text), i + max_chars + 2)
    for j in range(i, limit):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


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
