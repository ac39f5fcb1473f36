"""Typed configs for every stage: recipe YAML + dotted overrides, validated with one-line errors.

A stage config is a dataclass. It is built from, in order of precedence (last wins):
1. the dataclass defaults (they run on the embedded model),
2. a recipe YAML file (``config=recipes/sft_math.yaml``) with the same keys,
3. dotted overrides (``lr=1e-4``, ``method.r=16``): the ``set`` parameter and any undeclared ``-P k=v``
   of ``mlflow run`` (which arrives as ``--k v``).

``method.<option>`` overrides go to ``method_options`` and are validated by the method's own spec.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe, parameter or override that cannot be used as given."""


@dataclass
class SFTConfig:
    """Supervised finetuning of one method on one domain (paper §3.1, CPU-sized defaults)."""

    base_model: str = "smollm2-135m"  # short name, local folder or hub id
    adapter: str = "lora"  # method registry name (`peft-arena methods`)
    method_options: dict = field(default_factory=dict)  # method.<option>=value overrides
    domain: str = "math"  # target domain: math | med
    data: str = ""  # training data source; empty = the domain's bundled sample
    limit: int = 64  # training examples used (0 = all)
    max_length: int = 384  # prompt + response tokens; longer examples are dropped (paper: filter, no truncation)
    epochs: float = 1.0  # passes over the training data (paper: 4)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # sequences per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (paper: 256 global / 2 micro)
    lr: float = 0.0  # 0 = the method's default SFT learning rate
    warmup_ratio: float = 0.1  # paper: cosine with 10% linear warmup to 0
    weight_decay: float = 0.01  # AdamW, adapters included (paper)
    adam_beta2: float = 0.95  # AdamW betas (0.9, adam_beta2) (paper)
    max_grad_norm: float = 1.0  # gradient clipping (paper)
    seed: int = 0  # model init, data order and sampling
    logging_steps: int = 1  # log the training curves every N optimizer steps
    monitor_every: int = 0  # forgetting monitor: probe general retention every N optimizer steps (0 = off)
    forgetting_budget: float = 0.0  # stop once the monitor's general NLL rose more than this many % (0 = none)
    monitor_select: str = "last"  # final adapter: last (as trained) | pareto (chosen on the probes' front)
    monitor_size: int = 16  # items per monitor probe set (general text, general choice, held-out target)
    num_processes: int = 1  # > 1: accelerate launch with this many processes (GPUs); rank 0 logs
    distributed: str = "ddp"  # with num_processes > 1: ddp | fsdp (FSDP2) | deepspeed (ZeRO-3) | accelerate YAML
    precision: str = "auto"  # base weights: auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp32; adapters train in fp32
    attn_implementation: str = "auto"  # auto (transformers' default, SDPA) | sdpa | eager | flex_attention | …
    gradient_checkpointing: str = "auto"  # on | off | auto (on when the activations would not fit the GPU)
    padding_free: str = "auto"  # pack each micro-batch, position ids reset per example: auto = on with flash/flex attention
    liger: str = "auto"  # Liger RMSNorm/SwiGLU/RoPE kernels: auto = when installed and on a GPU | on | off
    compile: str = "auto"  # torch.compile each decoder layer: on | off | auto (= off)
    save_steps: int = -1  # checkpoint every N steps (resume); -1 = auto: none under 50 steps, else every 5 %; 0 = never
    divergence_factor: float = 4.0  # fail when the loss stays above this × its running minimum (README: guards)
    divergence_patience: int = 3  # for this many consecutive logged steps (a NaN/inf loss or grad fails at once)
    output_dir: str = ".arena/outputs"  # local working folder; the adapter is logged to MLflow
    run_name: str = ""  # empty = descriptive name (sft-lora-r8-math-smollm2-135m)
    recipe: str = ""  # preset name (recipes/*.yaml set it): tagged arena.recipe and appended to the run name


@dataclass
class GRPOStageConfig:
    """GRPO with verifiable rewards (paper §3.2); knobs not listed here go to ``grpo.<field>`` overrides."""

    base_model: str = "smollm2-135m"  # short name, local folder or hub id
    adapter: str = "lora"  # method registry name (`peft-arena methods`)
    method_options: dict = field(default_factory=dict)
    grpo_options: dict = field(default_factory=dict)  # grpo.<field>=value overrides of GRPORecipe
    domain: str = "math"  # target domain: math | med (sets the reward and the default data)
    data: str = ""  # training prompts source; empty = the domain's bundled sample
    limit: int = 32  # prompts used (0 = all)
    max_steps: int = 4  # GRPO optimizer steps
    lr: float = 0.0  # 0 = the method's default GRPO learning rate
    seed: int = 0  # model init, data order and sampling
    monitor_every: int = 0  # forgetting monitor: probe general retention every N optimizer steps (0 = off)
    forgetting_budget: float = 0.0  # stop once the monitor's general NLL rose more than this many % (0 = none)
    monitor_select: str = "last"  # final adapter: last (as trained) | pareto (chosen on the probes' front)
    monitor_size: int = 16  # items per monitor probe set (general text, general choice, held-out target)
    num_processes: int = 1  # > 1: accelerate launch with this many processes (GPUs); rank 0 logs
    distributed: str = "ddp"  # with num_processes > 1: ddp | fsdp (FSDP2) | deepspeed (ZeRO-3) | accelerate YAML
    save_steps: int = -1  # checkpoint every N steps (resume); -1 = auto: none under 50 steps, else every 5 %; 0 = never
    output_dir: str = ".arena/outputs"  # local working folder; the adapter is logged to MLflow
    run_name: str = ""  # empty = descriptive name (grpo-lora-r8a16-math-smollm2-135m)
    recipe: str = ""  # preset name (recipes/*.yaml set it): tagged arena.recipe and appended to the run name


@dataclass
class PromoteConfig:
    """Merge a trained adapter into its base and register it (alias candidate), or gate champion by policy."""

    source_run: str = ""  # training run id (or runs:/ID/adapter); required for alias=candidate
    domain: str = ""  # default: the training run's domain
    merge_dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16: the saved dtype
    device: str = "auto"  # where the merge runs: auto (cuda when available) | cpu | cuda
    max_merge_logit_diff: float = 0.0  # refuse a merge that moves the logits more; 0 = by merge dtype (1e-2 fp32, 1 bf16/fp16)
    alias: str = "candidate"  # candidate | champion
    model_uri: str = ""  # for alias=champion: the evaluated version (models:/NAME/N)
    policy: str = "registry/policy.yaml"  # champion policy YAML (gates and thresholds, applied with alias=champion)
    run_name: str = ""  # empty = a descriptive name from the lineage and what the promotion did


@dataclass
class EvalConfig:
    """Evaluate one model (registry URI, run URI, folder, hub id or base short name) on a benchmark suite."""

    model_uri: str = "smollm2-135m"  # models:/NAME@ALIAS or /N, runs:/ID/adapter, a folder, hub id or base name
    suite: str = "demo"  # group name(s) or benchmark names, comma separated (`peft-arena benchmarks`)
    limit: int = 0  # items per benchmark (0 = all; a limit that cuts makes the run provisional: not a benchmark score)
    n_samples: int = 0  # samples per item for sampled benchmarks (0 = the protocol; another value: provisional)
    max_new_tokens: int = 0  # 0 = the benchmark's protocol (another value makes the run provisional)
    batch_size: int = 0  # most sequences per generation batch (0 = auto: 16 on CPU, 256 on GPU; transformers backend)
    max_batch_tokens: int = 0  # KV-cache token budget per batch (0 = auto: half the free GPU memory; 16384 on CPU)
    backend: str = "auto"  # auto | transformers | vllm | openai (auto: openai if base_url, else vllm if installed)
    dtype: str = "auto"  # auto = bfloat16 on a GPU, float32 on the CPU (vLLM: the model's own)
    max_model_len: int = 9216  # vLLM context length (paper: 9216); clamped to the model's limit
    tensor_parallel_size: int = 1  # vLLM: GPUs per engine
    gpu_memory_utilization: float = 0.85  # vLLM: share of GPU memory the engine may take
    base_url: str = ""  # backend=openai: a running OpenAI-compatible vLLM server (http://host:8000)
    base_model: str = ""  # the base to score gain/forgetting against; empty = from the model's lineage
    data_dir: str = ""  # folder with full benchmark files (like shared/data); empty = packaged or sample (provisional)
    model_kind: str = "auto"  # base | instruct | auto (the base model's kind): picks the prompts (docs/prompting.md)
    seed: int = 0  # sampling seed (sampled benchmarks)
    run_name: str = ""  # empty = a descriptive name from the model's lineage


@dataclass
class SpectralConfig:
    """Spectral profile of a finetuned model against its base (paper §5, plus subspace metrics)."""

    model_uri: str = ""  # required: trained run (runs:/ID/adapter), registry URI or folder
    base_model: str = ""  # empty = from the model's lineage
    layers: str = ""  # comma list of layer indices; empty = all
    modules: str = ""  # comma list of module-name substrings (e.g. down_proj); empty = all linear
    window: int = 5  # fluctuation-score moving-average window
    top_k: int = 32  # subspace size for principal angles / energy share / intruders
    plot_layers: str = ""  # layer names to plot curves for; empty = the middle layer's modules
    device: str = "auto"  # where the SVDs run: auto (cuda when available) | cpu | cuda
    run_name: str = ""  # empty = a descriptive name from the model's lineage


@dataclass
class ReportConfig:
    """Leaderboard, Pareto plot and family summaries from mlflow.search_runs."""

    experiments: str = ""  # comma list of experiment names; empty = all
    domain: str = ""  # only runs of this domain (math | med); empty = all
    base_model: str = ""  # only runs on this base model; empty = all
    train: str = ""  # only runs of this training kind (sft | grpo); empty = all
    method: str = ""  # only runs of this method; empty = all
    include_provisional: bool = False  # also rank provisional (sample/subset) evaluations, flagged in a column
    output_dir: str = ".arena/report"  # local folder for the report files (also logged as artifacts)
    run_name: str = ""  # empty = a descriptive name from the filters


@dataclass
class ArenaConfig:
    """A sweep: train → promote → evaluate → spectral for every (train, method, domain), then the report."""

    methods: str = "lora"  # comma list of method registry names (`peft-arena methods`)
    domains: str = "math"  # comma list of target domains: math, med
    train: str = "sft"  # comma list of training kinds: sft, grpo
    base_model: str = "smollm2-135m"  # the sweep's one base (short name, local folder or hub id)
    stages: str = "train,promote,evaluate,spectral"  # what every chain runs (train first; order is fixed)
    parallel: int = 1  # chains at once, one process each; 0 = one per GPU (1 without GPUs)
    gpus: str = ""  # GPU ids for the chains (one chain per GPU); empty = CUDA_VISIBLE_DEVICES or every GPU
    monitor_every: int = 0  # forgetting-monitor probe every N steps in every training (0 = off)
    sft_set: str = ""  # overrides for every SFT training, e.g. "max_steps=20 limit=64"
    grpo_set: str = ""  # overrides for every GRPO training, e.g. "max_steps=8 grpo.num_generations=4"
    promote_set: str = ""  # overrides for every promotion
    eval_set: str = ""  # overrides for every evaluation, e.g. "suite=med limit=8"
    spectral_set: str = ""  # overrides for every spectral profile, e.g. "modules=down_proj"
    report: bool = True  # run the report over the sweep's experiment at the end
    report_provisional: bool = False  # the report also ranks provisional (sample/limit) evaluations, flagged
    fresh: bool = False  # run every stage again, even where a finished run has the same configuration
    dry_run: bool = False  # print the plan (what runs, what is reused or retried) and run nothing
    output_dir: str = ".arena/sweep"  # chain specs, outcomes and logs (also logged to the parent run)
    run_name: str = ""  # empty = arena-<base>


STAGE_CONFIGS = {
    "train_sft": SFTConfig,
    "train_grpo": GRPOStageConfig,
    "promote": PromoteConfig,
    "evaluate": EvalConfig,
    "spectral": SpectralConfig,
    "report": ReportConfig,
    "arena": ArenaConfig,
}

# Dotted prefixes that collect into a dict field instead of a top-level field.
_PREFIX_FIELDS = {"method": "method_options", "grpo": "grpo_options"}


def parse_assignments(text: str) -> dict[str, str]:
    """``"lr=1e-4 method.r=16"`` → ``{"lr": "1e-4", "method.r": "16"}`` (shell-style quoting allowed)."""
    out: dict[str, str] = {}
    for token in shlex.split(text or ""):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {token!r} is not key=value")
        out[key.strip()] = value
    return out


def pairs_to_overrides(argv: list[str]) -> dict[str, str]:
    """Undeclared ``mlflow run -P k=v`` arrive as ``--k v``; also accept ``--k=v``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --key value or key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        out[key.replace("-", "_") if "." not in key else key] = value
        i += 1
    return out


def build_config(stage: str, recipe: str | None = None, overrides: dict[str, Any] | None = None):
    """The stage's config from defaults, an optional recipe YAML and overrides; raises ConfigError."""
    cls = STAGE_CONFIGS[stage]
    values: dict[str, Any] = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {recipe!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {recipe!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {recipe!r} must be a mapping of config keys")
        values.update(_flatten(loaded))
    values.update(overrides or {})
    return _instantiate(cls, values)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and (prefix or key in _PREFIX_FIELDS):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _instantiate(cls, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot and head in _PREFIX_FIELDS and _PREFIX_FIELDS[head] in names:
            kwargs.setdefault(_PREFIX_FIELDS[head], {})[rest] = _yaml_scalar(value)
            continue
        if key not in names or key in _PREFIX_FIELDS.values():
            valid = ", ".join(sorted(n for n in names if n not in _PREFIX_FIELDS.values()))
            raise ConfigError(f"unknown {cls.__name__} key {key!r}; valid keys: {valid}")
        kwargs[key] = coerce(key, value, hints[key])
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def _yaml_scalar(value: Any) -> Any:
    """Type an override value the way YAML would (``16`` → int, ``true`` → bool, ``1e-4`` → float)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and _looks_float(value):
        return float(value)
    return parsed if isinstance(parsed, (int, float, bool, str, list)) else value


def _looks_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def coerce(key: str, value: Any, hint: Any) -> Any:
    """The one value coercer: a recipe/override value (often a string) to the field's type, or ConfigError.

    ``"16"`` → 16 for an int, ``"1e-4"`` → 1e-4 and ``1`` → 1.0 for a float, ``"yes"/"false"`` for a bool, and
    ``""``/``"none"``/``"null"`` → None for an optional field.
    """
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping")
        return value
    target = hint if isinstance(hint, type) else None
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
        target = next(a for a in typing.get_args(hint) if a is not type(None))
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
    if value is None or target is None or (type(value) is target):
        return value
    try:
        if target is bool:
            text = str(value).strip().lower()
            if text not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError
            return text in {"true", "1", "yes"}
        if target is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value.strip()) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if target is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if target is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be {target.__name__}, got {value!r}") from None
    return value


# The allowed values of every numeric setting (and the paths that must exist), checked as soon as a config is
# built, before anything is loaded. A rule is an interval ("[1,inf)": at least 1; "(0,inf)": greater than 0;
# "[0,1)": from 0 up to, not including, 1) or "dir" (when given, an existing folder). Non-finite numbers never
# pass. Keyed by class name, so the GRPO recipe of training/grpo.py is checked by the same table.
_SEED = "[0,4294967295]"  # numpy's seed range (HF set_seed seeds numpy too)
RULES: dict[str, dict[str, str]] = {
    "SFTConfig": {
        "limit": "[0,inf)", "max_length": "[1,inf)", "epochs": "(0,inf)", "max_steps": "[-1,inf)",
        "batch_size": "[1,inf)", "grad_accum": "[1,inf)", "lr": "[0,inf)", "warmup_ratio": "[0,1)",
        "weight_decay": "[0,inf)", "adam_beta2": "[0,1)", "max_grad_norm": "(0,inf)", "seed": _SEED,
        "logging_steps": "[1,inf)", "save_steps": "[-1,inf)", "divergence_factor": "(1,inf)",
        "divergence_patience": "[1,inf)", "monitor_every": "[0,inf)", "forgetting_budget": "[0,inf)",
        "monitor_size": "[1,inf)",
    },
    "GRPOStageConfig": {
        "limit": "[0,inf)", "max_steps": "[1,inf)", "lr": "[0,inf)", "seed": _SEED, "save_steps": "[-1,inf)",
        "monitor_every": "[0,inf)", "forgetting_budget": "[0,inf)", "monitor_size": "[1,inf)",
    },
    "ArenaConfig": {"parallel": "[0,inf)", "monitor_every": "[0,inf)"},
    "EvalConfig": {
        "limit": "[0,inf)", "n_samples": "[0,inf)", "max_new_tokens": "[0,inf)", "batch_size": "[0,inf)",
        "max_batch_tokens": "[0,inf)", "max_model_len": "[1,inf)", "tensor_parallel_size": "[1,inf)",
        "gpu_memory_utilization": "(0,1]", "seed": _SEED, "data_dir": "dir",
    },
    "SpectralConfig": {"window": "[1,inf)", "top_k": "[1,inf)"},
    "GRPORecipe": {
        "num_generations": "[2,inf)", "prompts_per_generation": "[1,inf)", "updates_per_generation": "[1,inf)",
        "grad_accum": "[1,inf)", "max_steps": "[1,inf)", "learning_rate": "(0,inf)", "weight_decay": "[0,inf)",
        "max_grad_norm": "(0,inf)", "epsilon": "(0,1)", "epsilon_high": "(0,inf)", "delta": "(1,inf)",
        "beta": "[0,inf)", "temperature": "(0,inf)", "top_p": "(0,1]", "max_completion_length": "[1,inf)",
        "max_prompt_length": "[1,inf)", "format_reward_weight": "[0,inf)", "log_completions_every": "[0,inf)",
        "completions_table_rows": "[1,inf)", "logging_steps": "[1,inf)", "seed": _SEED,
        "vllm_gpu_memory_utilization": "(0,1]",
    },
}

_INTERVAL = re.compile(r"^([\[(])(-?inf|-?[\d.]+),(-?inf|-?[\d.]+)([\])])$")


def check_value(key: str, value: Any, rule: str) -> None:
    """Raise ConfigError (one line) when ``value`` breaks ``rule`` (see RULES); None always passes."""
    if value is None:
        return
    if rule == "dir":
        if value and not Path(str(value)).expanduser().is_dir():
            raise ConfigError(f"{key} {value!r} is not an existing folder")
        return
    low_side, low, high, high_side = _INTERVAL.match(rule).groups()
    lo, hi = float(low), float(high)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    ok = (math.isfinite(number) and (number >= lo if low_side == "[" else number > lo)
          and (number <= hi if high_side == "]" else number < hi))
    if ok:
        return
    text = {v: f"{v:g}" for v in (lo, hi)}
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if hi == math.inf:
        bound = f"at least {text[lo]}" if low_side == "[" else f"greater than {text[lo]}"
    else:
        bound = f"in {low_side}{text[lo]}, {text[hi]}{high_side}"
    raise ConfigError(f"{key} must be {bound}, got {value!r}")


def validate(obj, prefix: str = "") -> None:
    """Check every field of a config (or the GRPO recipe) that RULES names; ``prefix`` names it (``grpo.``)."""
    for name, rule in RULES.get(type(obj).__name__, {}).items():
        check_value(prefix + name, getattr(obj, name), rule)
    grpo_options = getattr(obj, "grpo_options", None) or {}  # checked again, typed, when the recipe is built
    for name, value in grpo_options.items():
        if name in RULES["GRPORecipe"] and not isinstance(value, bool):
            check_value(f"grpo.{name}", value, RULES["GRPORecipe"][name])


def config_params(cfg) -> dict[str, Any]:
    """Flat params for MLflow: ``method.r``-style keys for the nested option dicts."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        prefix = {v: k for k, v in _PREFIX_FIELDS.items()}.get(f.name)
        if prefix:
            out.update({f"{prefix}.{k}": v for k, v in value.items()})
        else:
            out[f.name] = value
    return out
