"""The CLI tells a new user what every option does, lists the evaluation suites, and sizes the demo suite to the CPU."""

import argparse
import re

from peft_arena.cli import build_parser, main
from peft_arena.config import EvalConfig


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_of_every_verb_has_help_text():
    verbs = _verbs()
    assert {"train-sft", "train-grpo", "promote", "evaluate", "spectral", "report", "arena", "methods",
            "benchmarks", "count-params", "doctor", "demo"} <= set(verbs)
    missing = []
    for verb, parser in verbs.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = re.sub(r"\s*\(default: .*\)$", "", action.help or "").strip()
            if len(text) < 8:
                missing.append(f"{verb} {action.option_strings[0]}")
    assert not missing, f"options without help text: {missing}"


def test_benchmarks_lists_the_suites_evaluate_accepts(capsys):
    from peft_arena.evaluation import resolve_suite

    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    suites = {}
    for line in out.splitlines():
        m = re.match(r"  (demo|math|med|general|extended|all)\s+(\w+(?:, \w+)*)$", line)
        if m:
            suites[m.group(1)] = m.group(2).split(", ")
    assert set(suites) == {"demo", "math", "med", "general", "extended", "all"}
    for name, members in suites.items():  # the same names and members as `evaluate --suite NAME`
        assert members == [s.name for s in resolve_suite(name)]
    assert "math500" in suites["math"] and "medqa" in suites["med"] and suites["general"] == ["bbh", "ifeval", "nq"]
    # the benchmark table uses the suite names, not the internal group names
    assert "target_math" not in out and re.search(r"^  math500\s+math\s", out, re.M)


def test_methods_listing_has_a_header(capsys):
    assert main(["methods"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[:2] == ["method", "family"] and "lr" in first


def test_demo_suite_carries_small_limits_on_cpu_only():
    from peft_arena.evaluation.benchmarks import DEMO_CPU_LIMITS
    from peft_arena.stages.evaluate import size_for_device

    cfg = EvalConfig(suite="demo", max_new_tokens=64)
    line = size_for_device(cfg, cuda=False)
    assert cfg.limit == DEMO_CPU_LIMITS["limit"] and cfg.n_samples == DEMO_CPU_LIMITS["n_samples"]
    assert cfg.max_new_tokens == 64  # an explicit setting wins
    assert "(limit=4, n_samples=1)" in line and "not benchmark scores" in line
    gpu = EvalConfig(suite="demo")
    assert size_for_device(gpu, cuda=True) is None and gpu.limit == 0
    other = EvalConfig(suite="math")
    assert size_for_device(other, cuda=False) is None and other.limit == 0 and other.max_new_tokens == 0


def test_method_labels_name_the_method():
    from peft_arena.plotting.style import METHOD_COLORS, method_color, method_label

    assert method_label("oft", "b32") == "oft b32" and method_label("lora", "lora") == "lora"
    assert method_label("oft", "oft b32") == "oft b32" and method_label("vera", None) == "vera"
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)  # one colour per method
    assert method_color("my-method") == method_color("my-method") and method_color("my-method") != "grey"
