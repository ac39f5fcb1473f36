"""Math answers: extraction (last ``\\boxed{}``, "the answer is", last number) and equivalence via math-verify.

Equivalence is judged by HF's ``math-verify`` (string, numeric, set/interval and symbolic comparison) instead of
the paper's ``grader.math_equal``; both accept boxed, fraction, set and interval forms. math-verify uses
``signal.alarm`` for its timeouts, which only works in the main thread; off the main thread we call it without
timeouts (dependency-notes §4.4).
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) with balanced braces, else None."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    start = text.find("{", idx)
    if start < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def extract_answer(text: str) -> str:
    """The paper's extraction order: last ``\\boxed{}`` → "the answer is" → "final answer is" → last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in ("he answer is", "final answer is"):
        if marker in text:
            tail = text.split(marker)[-1].strip()
            tail = tail.split("\n")[0].strip().rstrip(".").strip()
            return tail.strip("$ ")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else ""


def _timeouts() -> dict:
    main = threading.current_thread() is threading.main_thread()
    return {} if main else {"parsing_timeout": None}


def _parse(text: str):
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], **_timeouts())


def math_equal(gold: str, prediction: str) -> bool:
    """Is the extracted ``prediction`` equivalent to ``gold``? Both are bare answers (no ``\\boxed``)."""
    if not prediction.strip():
        return False
    if prediction.strip() == gold.strip():
        return True
    gold_parsed = _parse(f"${gold}$")
    pred_parsed = _parse(f"${prediction}$")
    if not gold_parsed or not pred_parsed:
        return False
    kwargs = {} if threading.current_thread() is threading.main_thread() else {"timeout_seconds": None}
    return bool(verify(gold_parsed, pred_parsed, **kwargs))


def score_math(gold: str, completions: list[str]) -> dict:
    """Per-problem record: extracted answers, per-sample correctness, and the count of correct samples."""
    extracted = [extract_answer(c) for c in completions]
    flags = [math_equal(gold, e) for e in extracted]
    return {"extracted": extracted, "sample_correct": flags, "n_correct": sum(flags),
            "correct": sum(flags) / max(len(flags), 1)}


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
