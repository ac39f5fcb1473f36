"""Multiple-choice answers (the medical domain): the one option-letter rule for the GRPO reward and the benchmarks.

:func:`extract_choice` is the paper's medical scorer (``med_eval``'s ``match_choice``, from the m1/HuatuoGPT-o1
evaluation, reference §4.2) with three documented changes:

1. the last ``\\boxed{}`` comes first: the prompt asks for the letter in a box, so a box is the answer even when
   the reasoning later says "the answer is not D". A box holding no option letter but an option's text
   (``\\boxed{Vitamin C}``) chooses that option; a box holding neither is a wrong answer, not a cue to search
   the reasoning for a letter;
2. "answer is" also takes "answer is (B)", "answer is **B**", "answer is: B", "answer is option B" (the paper's
   pattern needs the letter right after the space);
3. the paper's last resort, the option most similar to the whole response (difflib), is dropped: a response
   that names no option chose none, and a guess made for it scores a base model's rambling 1/k of the time.

What is left of the paper's order runs unchanged: the response after "## Final Response" / "## Final Answer"
/ ``</think>``; the last "answer is X"; else the last stand-alone option letter (the paper's pattern, letters
limited to the item's options); else the option whose text is mentioned last.

The GRPO reward reads an item's options from its prompt (:func:`options_in_prompt`) so that it applies the same
rule to the same text as the evaluation does.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from peft_arena.answers.boxed import last_box_start, last_boxed

LETTERS = "ABCDEFGHIJKLMN"  # the paper's scorer accepts up to 14 options
MAX_BOX_CHARS = 300
_FINAL_SECTIONS = ("## Final Response\n\n", "## Final Answer\n\n", "</think>")
_BOX_TEXT = re.compile(r"^\s*\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{(.*)\}\s*$", re.S)
_OPTION_LINE = re.compile(r"^\s*\(?([A-N])[.):]\s+(.+?)\s*$")


def extract_choice(text: str, options: Mapping[str, str] | Sequence[str] | str) -> tuple[str | None, str]:
    """``(letter, rule)`` for the option a response chose; ``(None, rule)`` when it chose none.

    ``options``: ``{letter: text}`` (the option texts enable the option-text rules), or just the letters
    (``"ABCD"`` / ``["A", "B"]``). ``rule`` is one of ``box``, ``answer_is``, ``letter``, ``option_text``,
    ``none`` (recorded per sample, so how often a rule fired is visible).
    """
    texts = dict(options) if isinstance(options, Mapping) else {}
    letters = "".join(k for k in (texts or options) if len(k) == 1 and k in LETTERS)
    if not letters:
        raise ValueError(f"no option letters in {options!r}")
    text = text or ""
    for marker in _FINAL_SECTIONS:
        if marker in text:
            text = text.split(marker)[-1]
            break
    if last_box_start(text) >= 0:
        boxed = last_boxed(text, max_chars=MAX_BOX_CHARS)
        if boxed is not None:
            return _choice_in_box(boxed, letters, texts), "box"
    matches = list(re.finditer(
        rf"answer is\s*:?\s*(?:option\s+)?[(*\s]*([{letters}])(?![A-Za-z])", text, re.S | re.IGNORECASE))
    matches = [m for m in matches if m.group(1).isupper()]  # "the answer is a …" chose nothing
    if matches:
        return matches[-1].group(1), "answer_is"
    matches = list(re.finditer(  # the paper's stand-alone letter pattern, Chinese context characters included
        r"([\u4e00-\u9fff]|is |是|项|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([" + letters + r"])(\W|[\u4e00-\u9fff]|$)",
        text, re.S))
    if matches:
        return matches[-1].group(2), "letter"
    lowered = text.lower()
    positions = [(k, lowered.rindex(v.lower())) for k, v in texts.items() if v and v.lower() in lowered]
    if positions:
        return max(positions, key=lambda p: p[1])[0], "option_text"
    return None, "none"


def _choice_in_box(boxed: str, letters: str, texts: Mapping[str, str]) -> str | None:
    content = boxed.strip()
    match = _BOX_TEXT.match(content)
    if match:
        content = match.group(1).strip()
    match = re.match(rf"^\(?\s*([{letters}])\s*\)?(?:[.:)]|\s|$)", content)
    if match:
        return match.group(1)
    wanted = _plain(content)
    for letter, option in texts.items():
        if wanted and _plain(option) == wanted:
            return letter
    return None


def _plain(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().rstrip(".").lower()


def options_in_prompt(prompt: str) -> dict[str, str]:
    """The lettered options listed in a question (``A. …`` / ``(B) …`` / ``C) …`` lines), in order from A.

    Only a run that starts at A and continues without gaps counts, so a stray "B. …" line is not an option list.
    """
    found: dict[str, str] = {}
    for line in (prompt or "").splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == LETTERS[len(found)]:
            found[match.group(1)] = match.group(2)
        elif match and match.group(1) == "A":
            found = {"A": match.group(2)}  # a new list starts: the last list in the prompt is the options
    return found


def choice_correct(text: str, gold: str, options: Mapping[str, str] | Sequence[str] | str) -> bool:
    """Did the response choose ``gold``? ``gold`` is a letter, or an option's text ("yes" for PubMedQA-style
    labels); a worded gold with no option list is compared with the boxed answer."""
    gold = gold.strip()
    texts = dict(options) if isinstance(options, Mapping) else {}
    if not (len(gold) == 1 and gold.upper() in LETTERS):
        letter = next((k for k, v in texts.items() if _plain(v) == _plain(gold)), None)
        if letter is None:
            boxed = last_boxed(text or "", max_chars=MAX_BOX_CHARS)
            if boxed is None:
                return False
            match = _BOX_TEXT.match(boxed.strip())
            return _plain(match.group(1) if match else boxed) == _plain(gold)
        gold = letter
    chosen, _ = extract_choice(text, options)
    return chosen == gold.upper()
