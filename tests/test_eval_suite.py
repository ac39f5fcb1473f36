"""Benchmark registry, data provenance, arena scores by hand, and an end-to-end run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peft_arena.evaluation as evaluation
from peft_arena.evaluation import describe_benchmarks, get_benchmark, resolve_suite
from peft_arena.evaluation.runner import effective_generation, evaluate_model, log_suite_result, select_items
from peft_arena.evaluation.scores import arena_scores

# The full benchmark copies that sit beside a checkout (../shared/data) on developer and CI machines.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_registry_groups_and_suite_resolution():
    assert [s.name for s in resolve_suite("math")] == ["math500", "amc23", "aime24", "gsm8k"]
    assert [s.name for s in resolve_suite("general")] == ["bbh", "ifeval", "nq"]
    assert {s.name for s in resolve_suite("med")} == {"medqa", "medmcqa", "pubmedqa", "mmlu_medical"}
    assert {s.name for s in resolve_suite("extended")} == {"humaneval", "hellaswag", "winogrande", "mmlu", "arc_c",
                                                           "xcopa"}
    assert [s.name for s in resolve_suite("general, nq,humaneval")] == ["bbh", "ifeval", "nq", "humaneval"]
    assert len(resolve_suite("all")) == len(evaluation.BENCHMARKS) == 17
    with pytest.raises(ValueError, match="valid: .*math500"):
        resolve_suite("math,nope")
    with pytest.raises(ValueError):
        get_benchmark("mmlu-pro")


def test_paper_protocol_settings():
    for name in ("math500", "amc23", "aime24"):
        g = get_benchmark(name).generation
        assert (g.temperature, g.n_samples, g.max_new_tokens) == (0.6, 16, 8192)
        assert get_benchmark(name).metrics == ("acc", "pass_at_1", "pass_at_2", "pass_at_4", "pass_at_8",
                                               "pass_at_16")
    assert get_benchmark("medqa").generation.temperature == 0.0
    assert get_benchmark("ifeval").headline == "inst_strict"
    assert get_benchmark("bbh").headline == "avg" and len(get_benchmark("bbh").metrics) == 28
    assert get_benchmark("xcopa").protocol == "loglikelihood"
    # overrides: n_samples only for sampled benchmarks, max_new_tokens caps
    assert effective_generation(get_benchmark("math500"), 4, 64).n_samples == 4
    assert effective_generation(get_benchmark("nq"), 4, 64).n_samples == 1
    assert effective_generation(get_benchmark("nq"), None, 640).max_new_tokens == 50


def test_describe_benchmarks_is_json_and_documents_sources():
    rows = json.loads(json.dumps(describe_benchmarks()))
    by_name = {r["name"]: r for r in rows}
    assert by_name["amc23"]["source"]["local_path"] == "$PEFT_ARENA_DATA_DIR/math/amc23.jsonl"
    assert by_name["amc23"]["source"]["sample"] == "math/amc23.jsonl"
    assert "olmo" in by_name["medqa"]["source"]["package"]
    assert by_name["nq"]["metric_keys"] == ["general/nq/em"]
    assert by_name["math500"]["metric_keys"][0] == "target/math500/acc"
    assert all(r["prompt"] and r["extraction"] and r["reference_config"] for r in rows)


def test_limit_spreads_over_subsets():
    items = [{"s": s, "i": i} for s in "abc" for i in range(3)]
    assert [x["s"] for x in select_items(items, 4, "s")] == ["a", "b", "c", "a"]
    assert select_items(items, 4, None) == items[:4]


def test_sources_sample_then_local_dir(monkeypatch):
    monkeypatch.delenv("PEFT_ARENA_DATA_DIR", raising=False)
    for name in ("amc23", "aime24", "bbh", "ifeval", "pubmedqa", "xcopa"):
        assert get_benchmark(name).load(None, None).provenance == "sample"
    assert get_benchmark("math500").load(None, None).provenance == "full"
    loaded = get_benchmark("math500").load(None, None)
    assert len(loaded.items) == 500 and all(item["gold"] for item in loaded.items)
    assert len(get_benchmark("medqa").load(None, None).items) == 1273
    assert all(len(i["options"]) == 5 for i in get_benchmark("medqa").load(None, None).items)
    if not SHARED_DATA.exists():
        pytest.skip("no local full copies on this machine")
    monkeypatch.setenv("PEFT_ARENA_DATA_DIR", str(SHARED_DATA))
    assert len(get_benchmark("amc23").load(None, None).items) == 40
    assert len(get_benchmark("aime24").load(None, None).items) == 30
    bbh = get_benchmark("bbh").load(None, None)
    assert bbh.provenance == "full" and len(bbh.items) == 6511 and len(bbh.extra["prompts"]) == 27
    assert not bbh.extra["prompts"]["boolean_expressions"].startswith("BENCHMARK DATA")  # canary header dropped
    assert len(get_benchmark("ifeval").load(None, None).items) == 541
    assert len(get_benchmark("pubmedqa").load(None, None).items) == 500


def test_missing_data_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_benchmark("ifeval").load(str(tmp_path / "nope.jsonl"), None)


def test_arena_scores_by_hand():
    suite = ["math500", "amc23", "aime24", "gsm8k", "bbh", "ifeval", "nq", "humaneval"]
    base = {"target/math500/acc": 30.0, "target/amc23/acc": 20.0, "target/aime24/acc": 10.0, "target/gsm8k/acc": 70.0,
            "general/bbh/avg": 40.0, "general/ifeval/inst_strict": 50.0, "general/nq/em": 12.0,
            "general/humaneval/pass_at_1": 30.0}
    tuned = {"target/math500/acc": 45.0, "target/amc23/acc": 35.0, "target/aime24/acc": 13.0,
             "target/gsm8k/acc": 90.0, "general/bbh/avg": 30.0, "general/ifeval/inst_strict": 41.0,
             "general/nq/em": 10.0, "general/humaneval/pass_at_1": 0.0}
    scores = arena_scores(tuned, base, suite)
    assert scores["score/target_avg"] == pytest.approx((45 + 35 + 13) / 3)  # GSM8K is not in the paper's average
    assert scores["score/general_avg"] == pytest.approx((30 + 41 + 10) / 3)  # IFEval, NQ, BBH only
    assert scores["score/target_gain_pp"] == pytest.approx((45 + 35 + 13) / 3 - (30 + 20 + 10) / 3)
    assert scores["score/general_delta_pp"] == pytest.approx((30 + 41 + 10) / 3 - (40 + 50 + 12) / 3)
    assert scores["score/forget_pp"] == pytest.approx(-scores["score/general_delta_pp"]) and scores["score/forget_pp"] > 0
    better = arena_scores(base, tuned, suite)
    assert better["score/forget_pp"] == 0.0
    # the extended benchmarks are their own average, never the general one
    extended = arena_scores({"general/humaneval/pass_at_1": 20.0, "general/mmlu/acc": 50.0}, None, ["humaneval", "mmlu"])
    assert extended == {"score/extended_avg": pytest.approx(35.0)}
    with pytest.raises(ValueError, match="base model metrics lack"):
        arena_scores(tuned, {"target/math500/acc": 1.0}, suite)


MATH_CORE, MED_CORE, GENERAL_CORE = ("math500", "amc23", "aime24"), ("medqa", "medmcqa", "pubmedqa", "mmlu_medical"), \
    ("ifeval", "nq", "bbh")


def _metrics(values: dict[str, float]) -> dict[str, float]:
    return {get_benchmark(b).metric_key(get_benchmark(b).headline): v for b, v in values.items()}


def test_target_average_is_the_model_domain_when_both_domains_are_evaluated():
    suite = [*MATH_CORE, *MED_CORE, *GENERAL_CORE]
    base = _metrics({**dict.fromkeys(MATH_CORE, 10.0), **dict.fromkeys(MED_CORE, 40.0),
                     **dict.fromkeys(GENERAL_CORE, 20.0)})
    tuned = _metrics({**dict.fromkeys(MATH_CORE, 30.0), **dict.fromkeys(MED_CORE, 30.0),
                      **dict.fromkeys(GENERAL_CORE, 15.0)})
    unknown = arena_scores(tuned, None, suite)
    assert "score/target_avg" not in unknown  # two domains and no model domain: no single target average
    assert unknown["score/target_math_avg"] == unknown["score/target_med_avg"] == 30.0
    math = arena_scores(tuned, base, suite, domain="math")
    assert math["score/target_avg"] == 30.0 and math["score/target_med_avg"] == 30.0
    assert math["score/target_gain_pp"] == pytest.approx(20.0)  # 30 - 10 on math only, not (30+30)/2 - (10+40)/2
    med = arena_scores(tuned, base, suite, domain="med")
    assert med["score/target_gain_pp"] == pytest.approx(-10.0)
    assert med["score/forget_pp"] == pytest.approx(5.0)


def test_contract_metrics_exist_only_where_their_definition_holds():
    # NQ alone is not the paper's general average; MATH-500 alone is not its math target; GSM8K is not a core one
    suite = ["math500", "gsm8k", "nq", "humaneval"]
    base = _metrics({"math500": 10.0, "gsm8k": 50.0, "nq": 20.0, "humaneval": 5.0})
    tuned = _metrics({"math500": 30.0, "gsm8k": 70.0, "nq": 10.0, "humaneval": 9.0})
    scores = arena_scores(tuned, base, suite, domain="math")
    assert scores == {"score/target_math_partial_avg": pytest.approx(50.0),
                      "score/general_partial_avg": pytest.approx(10.0), "score/extended_avg": pytest.approx(9.0)}
    # med without PubMedQA: partial, so no med target, no gain
    med = arena_scores(_metrics(dict.fromkeys(["medqa", "medmcqa", "mmlu_medical"], 40.0)), None,
                       ["medqa", "medmcqa", "mmlu_medical"], domain="med")
    assert med == {"score/target_med_partial_avg": 40.0}


@pytest.fixture(scope="module")
def tiny_result():
    from peft_arena.models import ensure_tiny

    return evaluate_model(str(ensure_tiny()), resolve_suite("all"), limit=2, n_samples=2, max_new_tokens=6,
                          backend="transformers", batch_size=4, progress=False)


def test_end_to_end_every_benchmark_on_tiny(tiny_result):
    r = tiny_result
    assert set(r.per_benchmark) == set(evaluation.BENCHMARKS)
    assert r.backend == "transformers"
    for name, values in r.per_benchmark.items():
        spec = get_benchmark(name)
        assert spec.headline in values and all(0.0 <= v <= 100.0 for v in values.values())
        assert spec.metric_key(spec.headline) in r.metrics
        frame = r.samples[name]
        assert len(frame) == 2 and {"prompt", "completion", "extracted", "gold", "correct"} <= set(frame.columns)
    assert {"pass_at_1", "pass_at_2"} <= set(r.per_benchmark["math500"]) and "pass_at_4" not in r.per_benchmark["math500"]
    assert len(json.loads(r.samples["math500"]["completions"][0])) == 2
    assert r.provenance["math500"] == "subset(limit=2)+n_samples(2/16)+max_new_tokens(6/8192)"
    assert r.provenance["amc23"] == "sample+subset(limit=2)+n_samples(2/16)+max_new_tokens(6/8192)"
    assert r.provenance["xcopa"] == "sample+subset(limit=2)"  # a likelihood benchmark has no generation override
    assert r.provisional and r.provenance_tag == "provisional"
    assert r.settings["model_kind"] == "instruct"  # the tiny model has the SmolLM2-Instruct tokenizer
    assert r.settings["benchmarks"]["bbh"]["prompt_format"] == "chat"
    assert r.settings["benchmarks"]["xcopa"]["prompt_format"] == "raw"
    assert r.settings["benchmarks"]["math500"]["n_samples"] == 2
    assert r.settings["benchmarks"]["nq"]["n_samples"] == 1
    assert r.sources["ifeval"] == "bundled-sample:ifeval/input_data.jsonl"
    rows = r.paper_rows("ckpt")
    assert {"checkpoint", "domain", "benchmark", "metric", "value"} == set(rows[0])
    assert any(row["benchmark"] == "AVG" and row["domain"] == "math" for row in rows)
    assert r.paper_csv("ckpt").splitlines()[0] == "checkpoint,domain,benchmark,metric,value"


def test_settings_key_is_stable_and_sensitive(tiny_result):
    import copy

    key = tiny_result.settings_key()
    assert key == tiny_result.settings_key() and len(key) == 16
    other = copy.deepcopy(tiny_result.settings)
    other["benchmarks"]["math500"]["n_samples"] = 16
    from peft_arena.evaluation.runner import settings_key

    assert settings_key(other) != key


def test_log_suite_result_through_memory_tracker(tiny_result):
    from peft_arena.tracking.tracker import MemoryTracker

    tracker = MemoryTracker()
    scores = log_suite_result(tracker, tiny_result, "ckpt", base_metrics=tiny_result.metrics, domain="math")
    assert scores["score/target_gain_pp"] == 0.0 and scores["score/forget_pp"] == 0.0
    assert tracker.last("general/ifeval/inst_strict") == tiny_result.metrics["general/ifeval/inst_strict"]
    assert tracker.last("score/general_avg") == pytest.approx(scores["score/general_avg"])
    assert "samples/math500.json" in tracker.artifacts and "results/paper_results.csv" in tracker.artifacts
    assert tracker.tags["arena.provenance"] == "provisional" and tracker.tags["arena.samples_only"] == "true"
    detail = json.loads(tracker.tags["arena.data_provenance"])
    assert detail["ifeval"].startswith("sample+subset(limit=2)")
    assert tracker.tags["arena.eval_key"] == tiny_result.settings_key()


def test_prompt_style_per_benchmark_and_model_kind():
    # the paper's harness: IFEval/NQ and the math/med targets always in chat form; the other OpenCompass configs
    # raw for base models; XCOPA is likelihood-scored raw text for every model
    chat_always = {"math500", "amc23", "aime24", "medqa", "medmcqa", "pubmedqa", "mmlu_medical", "ifeval", "nq"}
    for name, spec in evaluation.BENCHMARKS.items():
        assert spec.prompt_format("instruct") == ("raw" if name == "xcopa" else "chat"), name
        assert spec.prompt_format("base") == ("chat" if name in chat_always else "raw"), name
    row = next(r for r in describe_benchmarks() if r["name"] == "bbh")
    assert row["prompt_style"] == "chat_if_instruct" and row["prompt_format"] == {"base": "raw", "instruct": "chat"}


def test_model_kind_follows_the_papers_rule():
    from peft_arena.models import model_kind

    assert model_kind("qwen2.5-7b") == "base" and model_kind("Qwen/Qwen2.5-7B") == "base"
    assert model_kind("llama3.2-3b") == "instruct" and model_kind("smollm2-135m") == "instruct"
    assert model_kind("Qwen/Qwen2.5-7B-Instruct") == "instruct" and model_kind("meta-llama/Llama-3.2-3B") == "base"
    assert model_kind("/ckpt/math_sft_llama3.2-3b-ins_lora") == "instruct"
    assert model_kind(None, "/ckpt/sft_math_qwen2.5-7b_lora-r8_780") == "base"


def test_raw_prompts_join_turns_with_newlines_as_opencompass_does():
    from peft_arena.evaluation.common import completion_text
    from peft_arena.evaluation.generation import render_prompt
    from peft_arena.models import ensure_tiny, load_tokenizer

    tok = load_tokenizer(str(ensure_tiny()))
    messages = [{"role": "user", "content": "Question: 1+1?\nAnswer:"}, {"role": "assistant", "content": "2\n"},
                {"role": "user", "content": "Question: 2+2?\nAnswer:"}]
    raw = completion_text(messages)
    assert raw == "Question: 1+1?\nAnswer:\n2\n\nQuestion: 2+2?\nAnswer:"
    assert render_prompt(tok, raw) == raw  # a raw prompt reaches the backend as text, no template
    assert render_prompt(tok, messages).startswith("<|im_start|>")


def test_a_base_model_gets_raw_prompts_where_the_paper_used_them():
    from peft_arena.models import ensure_tiny

    suite = resolve_suite("bbh,ifeval")
    base = evaluate_model(str(ensure_tiny()), suite, limit=1, max_new_tokens=2, backend="transformers",
                          progress=False, model_kind="base")
    instruct = evaluate_model(str(ensure_tiny()), suite, limit=1, max_new_tokens=2, backend="transformers",
                              progress=False, model_kind="instruct")
    assert "<|im_start|>" not in base.samples["bbh"]["prompt"][0]
    assert base.samples["bbh"]["prompt"][0].startswith("Follow the given examples")
    assert base.samples["ifeval"]["prompt"][0].startswith("<|im_start|>")  # IFEval: chat template for every model
    assert instruct.samples["bbh"]["prompt"][0].startswith("<|im_start|>")
    assert base.settings["benchmarks"]["bbh"]["prompt_format"] == "raw"
    assert base.settings_key() != instruct.settings_key()  # a base score is never compared with a chat-prompt one


def test_prompting_doc_table_matches_the_specs():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "prompting.md").read_text()
    table = doc.split("## The table", 1)[1].split("##", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in evaluation.BENCHMARKS:
            rows[cells[0]] = (cells[1], cells[2])
    assert set(rows) == set(evaluation.BENCHMARKS)
    for name, (base, instruct) in rows.items():
        assert (base, instruct) == (get_benchmark(name).prompt_format("base"),
                                    get_benchmark(name).prompt_format("instruct")), name
