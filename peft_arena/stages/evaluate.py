"""The evaluate stage: resolve the model, run the suite, score it against its base's cached evaluation.

The base model is evaluated with exactly the same suite and settings (the ``arena.eval_key`` hash, which covers
the items, the generation settings and the prompt format of every benchmark); that evaluation is its own run,
reused by every later evaluation with the same key and never recomputed silently with other settings.

Prompts follow the model's kind (``base`` or ``instruct``, docs/prompting.md): a finetuned model has its base's
kind, so the model and its base get the same prompts. Only a full evaluation (``arena.provenance=full``) writes
scores onto a registry version; a provisional one is only listed in the version's evaluation history.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from peft_arena.config import EvalConfig
from peft_arena.models import model_kind, resolve_base
from peft_arena.stages.lineage import lineage_of
from peft_arena.tracking import notes
from peft_arena.tracking.naming import run_name
from peft_arena.tracking.locks import store_lock
from peft_arena.tracking.runs import find_base_evaluation, side_run



def _merged_folder(trained_dir: str, base_source: str | None) -> str:
    """A merged HF folder for a trained-artifact folder (runs:/ID/adapter), so every backend loads one model."""
    from peft_arena.methods import ops
    from peft_arena.models import load_tokenizer

    record = ops.read_arena_method(trained_dir)
    model = ops.merge(ops.load_trained(base_source or record["base_source"], trained_dir))
    out = Path(tempfile.mkdtemp(prefix="arena-eval-merged-"))
    model.save_pretrained(out)
    load_tokenizer(trained_dir if (Path(trained_dir) / "tokenizer_config.json").exists()
                   else record["base_source"]).save_pretrained(out)
    return str(out)


def _base_for(cfg: EvalConfig, lineage: dict) -> tuple[str, str] | None:
    """(short name, source) of the base to score against, or None when the lineage does not say."""
    if cfg.base_model:
        base = resolve_base(cfg.base_model)
        return base.short, base.source
    if lineage.get("arena.base_model"):
        short = lineage["arena.base_model"]
        source = lineage.get("arena.base_source") or resolve_base(short).source
        return short, source
    return None


def size_for_device(cfg: EvalConfig, cuda: bool | None = None) -> str | None:
    """On a CPU the ``demo`` suite carries its own small limits: settings left at 0 take
    :data:`DEMO_CPU_LIMITS` (the runs are subsets, recorded in ``arena.data_provenance``). Returns the line that
    says what was cut, or None when nothing was."""
    from peft_arena.evaluation.benchmarks import DEMO_CPU_LIMITS

    if "demo" not in [p.strip() for p in cfg.suite.split(",")] or cfg.backend == "openai" or cfg.base_url:
        return None
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return None
    cut = {k: v for k, v in DEMO_CPU_LIMITS.items() if not getattr(cfg, k)}
    for key, value in cut.items():
        setattr(cfg, key, value)
    if not cut:
        return None
    return ("[peft-arena] no GPU: the demo suite runs with its CPU limits "
            f"({', '.join(f'{k}={v}' for k, v in cut.items())}) instead of each benchmark's protocol; the run is "
            "provisional (a smoke check, not benchmark scores). Set limit/n_samples/max_new_tokens to "
            "choose other sizes.")


def _model_kind(cfg: EvalConfig, lineage: dict, base: tuple[str, str] | None, path: str) -> str:
    """``base``/``instruct``: the config's choice, else the base model's kind (a finetuned model keeps it)."""
    if cfg.model_kind not in ("auto", "base", "instruct"):
        raise ValueError(f"model_kind={cfg.model_kind!r}: use auto, base or instruct")
    if cfg.model_kind != "auto":
        return cfg.model_kind
    if base is not None:
        return model_kind(*base)
    return model_kind(lineage.get("arena.base_model"), cfg.model_uri, path)


def _evaluate(path: str, benchmarks, cfg: EvalConfig, kind: str):
    from peft_arena.evaluation.runner import evaluate_model

    return evaluate_model(
        path, benchmarks, limit=cfg.limit or None, n_samples=cfg.n_samples or None,
        max_new_tokens=cfg.max_new_tokens or None, backend=cfg.backend, batch_size=cfg.batch_size,
        seed=cfg.seed, data_dir=cfg.data_dir or None, model_kind=kind,
        engine_options={"dtype": cfg.dtype, "max_batch_tokens": cfg.max_batch_tokens,
                        "max_model_len": cfg.max_model_len, "tensor_parallel_size": cfg.tensor_parallel_size,
                        "gpu_memory_utilization": cfg.gpu_memory_utilization, "base_url": cfg.base_url},
    )


# a 0 means "decided elsewhere": logged as what decides it, never as the placeholder
_ZERO_MEANS = {"limit": "all", "n_samples": "protocol", "max_new_tokens": "protocol", "batch_size": "auto",
               "max_batch_tokens": "auto"}


def _effective_params(cfg: EvalConfig) -> dict:
    """``cfg.<key>`` params without placeholders: unset options left out, a 0 that means a per-benchmark protocol
    or an automatic size logged as ``protocol``/``auto`` (each benchmark's real settings: results/settings.json)."""
    out = {}
    for key, value in vars(cfg).items():
        if key == "run_name" or value in ("", None):
            continue
        out[f"cfg.{key}"] = _ZERO_MEANS[key] if key in _ZERO_MEANS and not value else value
    return out


def run_evaluate(cfg: EvalConfig, tracker) -> dict:
    from peft_arena.evaluation import resolve_suite
    from peft_arena.evaluation.runner import log_suite_result

    benchmarks = resolve_suite(cfg.suite)  # an unknown benchmark fails before any model loads
    cut = size_for_device(cfg)
    if cut:
        print(cut, file=sys.stderr)
    target = lineage_of(cfg.model_uri)
    lineage, resolved = target.lineage, target.resolved
    if target.kind == "adapter":  # every backend (vLLM included) loads one merged folder
        merged = _merged_folder(target.path, lineage.get("arena.base_source"))
        target.temporary.append(merged)
        target.path = merged
    base = _base_for(cfg, lineage)
    kind = _model_kind(cfg, lineage, base, target.path)
    name = cfg.run_name or (
        run_name("evaluate", lineage.get("arena.train"), lineage.get("arena.method"),
                 lineage.get("arena.method_label"), lineage.get("arena.domain"), lineage.get("arena.base_model"))
        if target.kind != "base" else f"eval-base-{lineage['arena.base_model']}"
    )
    tags = {**lineage, "arena.model_uri": cfg.model_uri, "arena.is_base": str(target.kind == "base").lower(),
            "arena.model_kind": kind, "mlflow.runName": name}
    if resolved is not None:
        tags.update({k: v for k, v in {
            "arena.source_run": resolved.source_run, "arena.registered_model": resolved.registered_model,
            "arena.model_version": resolved.version, "arena.model_alias": resolved.alias,
            "arena.model_id": resolved.model_id}.items() if v})
    tracker.set_tags(tags)
    tracker.log_params(_effective_params(cfg))

    try:
        result = _evaluate(target.path, benchmarks, cfg, kind)
    finally:
        target.cleanup()

    base_metrics = None
    if target.kind != "base" and base is not None:
        base_short, base_source = base
        # one base evaluation per settings key, also when several evaluations start at once: the others wait
        with store_lock(f"base-eval/{base_short}/{result.settings_key()}"):
            cached = find_base_evaluation(base_short, result.settings_key())
            if cached is None:
                print(f"[peft-arena] evaluating the base model {base_short} with the same settings (cached for reuse)",
                      file=sys.stderr)
                with side_run("evaluate", f"eval-base-{base_short}",
                              {"arena.base_model": base_short, "arena.base_source": base_source,
                               "arena.model_uri": base_short, "arena.is_base": "true"}) as base_tracker:
                    base_result = _evaluate(base_source, benchmarks, cfg, kind)
                    if base_result.settings_key() != result.settings_key():
                        raise RuntimeError("the base model's evaluation settings differ from the model's; "
                                           "scores would not be comparable")
                    base_scores = log_suite_result(base_tracker, base_result, base_short)
                    base_tracker.describe(notes.evaluation(f"{base_short} (base model)", base_scores,
                                                           base_result.per_benchmark, base_result.provenance,
                                                           base_result.provisional, None))
                    cached = (base_tracker.run_id, base_result.metrics)
        base_run_id, base_metrics = cached
        tracker.set_tags({"arena.base_eval_run": base_run_id})

    scores = log_suite_result(tracker, result, name, base_metrics, resolved.model_id if resolved else None,
                              domain=lineage.get("arena.domain"))
    tracker.describe(notes.evaluation(cfg.model_uri, scores, result.per_benchmark, result.provenance,
                                      result.provisional, base_run_id if base_metrics is not None else None))
    if resolved is not None and resolved.registered_model:
        from peft_arena.tracking.registry import SCORE_KEYS, record_scores

        headline = {k: v for k, v in scores.items() if k.removeprefix("score/") in SCORE_KEYS}
        record_scores(resolved.registered_model, resolved.version, headline, tracker.run_id, result.settings_key(),
                      provenance=result.provenance_tag, detail=result.provenance)
    if result.provisional:
        partial = ", ".join(f"{b}: {p}" for b, p in result.provenance.items() if p != "full")
        print(f"[peft-arena] note: provisional evaluation ({partial}); these numbers are smoke checks, not "
              "benchmark scores: the leaderboard leaves them out unless asked, and they are not written onto "
              "registry versions as scores", file=sys.stderr)
    return {"scores": scores, "metrics": result.metrics, "model_kind": target.kind, "prompt_kind": kind,
            "provenance": result.provenance_tag,
            "version": resolved.version if resolved else None}
