"""Multiple-choice answer extraction.

* :func:`match_choice` – the paper's medical scorer (``third_party/med_eval``, from the m1/HuatuoGPT-o1 eval):
  last "answer is X", else the last standalone option letter, else the option text mentioned last, else the
  option most similar to the response. The *last* match is the prediction.
* :func:`first_option_postprocess` – OpenCompass's extractor for ARC-C, HellaSwag and WinoGrande gen configs
  (English patterns in OpenCompass's order; the Chinese-language patterns cannot match English prompts' answers
  except the generic tail ones, which are kept).
* :func:`first_capital_postprocess` – OpenCompass's MMLU extractor: the first upper-case character.
"""

from __future__ import annotations

import difflib
import re

LETTERS = "ABCDEFGHIJKLMN"


def _most_similar_index(options: list[str], text: str) -> int:
    best, best_index = 0.0, 0
    for i, option in enumerate(options):
        similarity = difflib.SequenceMatcher(None, option, text).ratio()
        if similarity >= best:  # ">=": ties go to the later option, as in the reference
            best, best_index = similarity, i
    return best_index


def match_choice(text: str, options: dict[str, str]) -> tuple[str, int]:
    """Predicted option letter and the rule that found it (1 letter, 2 option text, 3 similarity)."""
    if "## Final Response\n\n" in text:
        text = text.split("## Final Response\n\n")[-1]
    elif "## Final Answer\n\n" in text:
        text = text.split("## Final Answer\n\n")[-1]
    elif "</think>" in text:
        text = text.split("</think>")[-1]
    matches = list(re.finditer(r"(answer is\s*?)([A-N])", text, re.S))
    if matches:
        return matches[-1].group(2), 1
    letters = LETTERS[: len(options)]
    matches = list(re.finditer(
        r"([\u4e00-\u9fff]|is |是|项|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([" + letters + r"])(\W|[\u4e00-\u9fff]|$)",
        text, re.S))
    if matches:
        return matches[-1].group(2), 1
    lowered = text.lower()
    positions = [(k, lowered.rindex(v.lower())) for k, v in options.items() if v.lower() in lowered]
    if positions:
        return max(positions, key=lambda p: p[1])[0], 2
    keys = list(options)
    return keys[_most_similar_index([v.lower() for v in options.values()], lowered)], 3


def first_option_postprocess(text: str, options: str, cushion: bool = True) -> str:
    """OpenCompass ``first_option_postprocess``: first pattern that matches, in its priority order."""
    o = options
    patterns = [
        rf"(?i)ANSWER\s*:\s*([{o}])",
        rf"[Tt]he answer is:?\s+\(?([{o}])\)?",
        rf"[Tt]he answer is:?\s+\(?\*?\*?([{o}])\*?\*?\)?",
        rf"[Tt]he answer is option:?\s+\(?([{o}])\)?",
        rf"[Tt]he correct answer is:?\s+\(?([{o}])\)?",
        rf"[Tt]he correct answer is option:?\s+\(?([{o}])\)?",
        rf"[Tt]he correct answer is:?.*?boxed{{([{o}])}}",
        rf"[Tt]he correct option is:?.*?boxed{{([{o}])}}",
        rf"[Tt]he correct answer option is:?.*?boxed{{([{o}])}}",
        rf"[Tt]he answer to the question is:?\s+\(?([{o}])\)?",
        rf"(\s|^)[{o}][\s。，,：:\.$]",
        r"1.\s?(.*?)$",
        rf"1.\s?([{o}])[.。$]?$",
    ]
    # OpenCompass also tries Chinese-language patterns before these ("答案是 X" …) and a few generic tail
    # patterns after the first one: "[\s，：:,]([ABCD])[。，,\.]?$" – kept here in the same relative place.
    patterns.insert(0, rf"[\s，：:,]([{o}])[。，,\.]?$")
    if cushion:
        patterns += [rf"([{o}]):", rf"([{o}])"]
    text = text.strip()
    for pattern in patterns:
        match = re.search(pattern, text, re.DOTALL)
        if match:
            group = match.group(1) if match.group(1) else match.group(0)
            for letter in o:
                if letter in group:
                    return letter
    return ""


def first_capital_postprocess(text: str) -> str:
    """OpenCompass ``first_capital_postprocess``: the first upper-case character, else ""."""
    for ch in text:
        if ch.isupper():
            return ch
    return ""
