"""Natural Questions scoring, as OpenCompass's ``NQEvaluator`` does it.

The prediction's first line is lower-cased, cut after the last "answer is", and normalised with
``general_postprocess`` (cut at the first newline/period/comma, drop punctuation and articles, squeeze spaces);
each gold answer gets the same normalisation. An item counts as correct when any normalised gold answer is a
*substring* of the normalised prediction (OpenCompass's rule; its strict-equality line is commented out).
"""

from __future__ import annotations

import re


def general_postprocess(text: str) -> str:
    truncated = re.split(r"[\n.,]", text, maxsplit=1)[0]
    no_punctuation = re.sub(r"[^\w\s]", "", truncated)
    no_articles = re.sub(r"\b(a|an|the)\b", "", no_punctuation, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", no_articles).strip()


def nq_prediction(text: str) -> str:
    prediction = text.strip().split("\n")[0].lower()
    if "answer is" in prediction:
        prediction = prediction.split("answer is")[-1]
    return general_postprocess(prediction)


def nq_correct(completion: str, answers: list[str]) -> tuple[str, bool]:
    pred = nq_prediction(completion)
    golds = [general_postprocess(a).lower() for a in answers]
    return pred, any(g in pred for g in golds)
