"""The one ``\\boxed{}`` reader: every domain's extraction, the data loaders and the format reward use it.

Pure string code, linear in the input length, so it is safe on adversarial model output (megabytes of text,
unbalanced braces).
"""

from __future__ import annotations

import re

BOX_COMMANDS = ("\\boxed", "\\fbox")
_BARE_ARGUMENT = re.compile(r" +([^\s$]+)")


def last_box_start(text: str) -> int:
    """Index of the last ``\\boxed``/``\\fbox`` command in ``text``, -1 when there is none."""
    return max(text.rfind(cmd) for cmd in BOX_COMMANDS)


def last_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces matched; None if there is none.

    The *last* box wins: a model that corrects itself ("\\boxed{5} … no, \\boxed{6}") answered 6.
    ``\\boxed 5`` (no braces, allowed by LaTeX) gives ``5``. An unclosed last box gives None rather than a
    guess (a generation cut off inside its answer has not answered). ``max_chars`` caps the returned content:
    a longer one gives None (a grader must not feed a 50 kB "answer" to a symbolic parser).
    """
    start = last_box_start(text)
    if start < 0:
        return None
    cmd = next(c for c in BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    j = i
    while j < len(text) and text[j] == " " and j - i < 64:
        j += 1
    if not text.startswith("{", j):
        if j == i:
            return None
        # "\boxed 5": the argument is the next token
        match = _BARE_ARGUMENT.match(text[i:i + (max_chars or 1000) + 64])
        return match.group(1) if match and (max_chars is None or len(match.group(1)) <= max_chars) else None
    i = j
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
