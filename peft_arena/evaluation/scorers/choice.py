"""OpenCompass's multiple-choice extractors for the general benchmarks (each benchmark keeps its harness's rule).

The medical suite's option extraction, shared with the GRPO reward, is ``peft_arena.answers.choice``.

* :func:`first_option_postprocess` – OpenCompass's extractor for ARC-C, HellaSwag and WinoGrande gen configs
  (English patterns in OpenCompass's order; the Chinese-language patterns cannot match English prompts' answers
  except the generic tail ones, which are kept).
* :func:`first_capital_postprocess` – OpenCompass's MMLU extractor: the first upper-case character.
"""

from __future__ import annotations

import re


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
