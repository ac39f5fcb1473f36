"""IFEval scoring with lm-eval's copy of Google's instruction checkers (``lm_eval.tasks.ifeval``).

Deviation (documented in the benchmark spec): the checkers split sentences with NLTK's ``punkt_tab`` model,
which is not installable offline. Before the checkers are imported we create a minimal, untrained
``punkt_tab`` (no collocations or sentence starters, a short abbreviation list) in the project's cache and
put it on NLTK's search path. It splits at ``.!?`` except after the listed abbreviations, so only the
sentence-counting checkers (``length_constraints:number_sentences``) can differ from the reference on text with
unusual abbreviations. A real ``punkt_tab`` already on ``NLTK_DATA`` is used as is.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "e.g", "i.e", "etc", "vs", "u.s", "no", "st", "jr", "sr",
                  "inc", "ltd")


def _ensure_punkt_tab() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    from peft_arena.models import cache_dir

    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (english / name).touch()
    (english / "abbrev_types.txt").write_text("\n".join(_ABBREVIATIONS) + "\n")
    os.environ["NLTK_DATA"] = os.pathsep.join(filter(None, [str(root), os.environ.get("NLTK_DATA")]))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


@lru_cache(maxsize=1)
def _checkers():
    _ensure_punkt_tab()
    from lm_eval.tasks.ifeval import utils

    return utils


def normalise_ids(ids: list[str]) -> list[str]:
    """M-IFEval's English file prefixes every instruction id with ``en:``; IFEval's ids have none."""
    return [i.split(":", 1)[1] if i.startswith("en:") else i for i in ids]


def score_ifeval(doc: dict, response: str) -> dict:
    """lm-eval's ``process_results`` for one prompt: prompt-level booleans and instruction-level lists."""
    utils = _checkers()
    doc = {"key": doc.get("key", 0), "prompt": doc["prompt"],
           "instruction_id_list": normalise_ids(doc["instruction_id_list"]), "kwargs": doc["kwargs"]}
    return utils.process_results(doc, [response])


def aggregate_ifeval(results: list[dict]) -> dict[str, float]:
    """Prompt-level means and instruction-level means over all instructions (lm-eval's ``agg_inst_level_acc``)."""
    def inst(key: str) -> float:
        flat = [x for r in results for x in r[key]]
        return 100.0 * sum(flat) / max(len(flat), 1)

    def prompt(key: str) -> float:
        return 100.0 * sum(bool(r[key]) for r in results) / max(len(results), 1)

    return {"inst_strict": inst("inst_level_strict_acc"), "prompt_strict": prompt("prompt_level_strict_acc"),
            "inst_loose": inst("inst_level_loose_acc"), "prompt_loose": prompt("prompt_level_loose_acc")}

