"""The promote stage: merge a trained adapter into its base, register the merged model, move ``candidate``.

With ``alias=champion`` it instead applies ``registry/policy.yaml`` to an already evaluated version
(``model_uri=models:/NAME/N``): ``champion`` moves only when every gate passes.

A merge failure is raised, never papered over (the paper's merge tool saved the unmerged base when merging
failed, which then got evaluated as if it were the finetuned model).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

from peft_arena.config import PromoteConfig
from peft_arena.methods.registry import MergeError
from peft_arena.tracking import registry as reg
from peft_arena.tracking import search
from peft_arena.tracking import notes
from peft_arena.tracking.naming import policy_run_name, run_name

# A fixed probe for the merge-fidelity number: logits of the adapter model vs the merged model on it.
_PROBE = "Question: what is 12 times 7? Answer:"
# Default bound on that number per merge dtype (max_merge_logit_diff=0): a float32 merge reproduces the adapter
# model up to rounding; a 16-bit merge rounds every merged weight, which moves logits by up to a few tenths.
MERGE_BOUNDS = {"float32": 1e-2, "bfloat16": 1.0, "float16": 1.0}


def run_promote(cfg: PromoteConfig, tracker) -> dict:
    """Run the stage in the promote run ``tracker`` logs to; returns ``{"name", "version", "model_uri", …}``."""
    if cfg.alias == reg.CHAMPION:
        return _promote_champion(cfg, tracker)
    if cfg.alias != reg.CANDIDATE:
        raise ValueError(f"promote sets alias 'candidate' (merge + register) or 'champion' (policy); got {cfg.alias!r}")
    if not cfg.source_run:
        raise ValueError("promote needs source_run=<training run id or runs:/ID/adapter>")
    if not cfg.max_merge_logit_diff >= 0:
        raise ValueError(f"max_merge_logit_diff={cfg.max_merge_logit_diff} must be >= 0 (0 = the bound for the dtype)")
    return _promote_candidate(cfg, tracker)


def _promote_candidate(cfg: PromoteConfig, tracker) -> dict:
    from peft_arena.methods import ops

    run_id, artifact_path = search.parse_run_ref(cfg.source_run)
    source = search.get_run(run_id)
    stage = source.tags.get("arena.stage", "")
    if stage not in search.TRAIN_STAGES:
        raise ValueError(f"run {run_id} is a {stage or 'untagged'} run, not a training run; pass the run that trained "
                         "the adapter")
    if source.status != "FINISHED":
        error = source.tags.get("arena.error")
        raise ValueError(f"training run {run_id} is {source.status}, not FINISHED"
                         + (f" ({error})" if error else "") + "; promote only a training run that finished")
    t = source.tags
    domain = cfg.domain or t.get("arena.domain")
    base_short = t.get("arena.base_model")
    name = reg.registered_name(base_short, domain)
    lineage = {"arena.source_run": run_id, "arena.method": t.get("arena.method"), "arena.train": t.get("arena.train"),
               "arena.domain": domain, "arena.base_model": base_short, "arena.method_label": t.get("arena.method_label")}
    tracker.set_tags({"arena.stage": "promote", **{k: v for k, v in lineage.items() if v}, "arena.registered_model": name,
                      "mlflow.runName": cfg.run_name or run_name("promote", t.get("arena.train"), t.get("arena.method"),
                                                                t.get("arena.method_label"), domain, base_short)})
    tracker.log_params({"cfg.source_run": run_id, "cfg.alias": cfg.alias})

    work = Path(tempfile.mkdtemp(prefix="arena-promote-"))
    try:
        adapter = search.download_run_artifacts(run_id, artifact_path or "adapter", work / "download")
        record = ops.read_arena_method(adapter)
        base_source = _base_source(record, t)
        tracker.set_tags({"arena.base_source": base_source})
        started = time.perf_counter()
        dtype, device = _merge_placement(cfg)
        tracker.log_params({"cfg.merge_dtype": dtype, "cfg.merge_device": device,
                            "cfg.max_merge_logit_diff": merge_bound(cfg, dtype)})
        model = ops.load_trained(_load_base(base_source, record, dtype, device), adapter, dtype=dtype)
        tokenizer = _tokenizer(adapter, base_source)
        before = _probe_logits(model, tokenizer)
        merged = ops.merge(model)  # MergeError propagates: the run ends FAILED with the reason
        # fidelity of the merged weights in the dtype they are saved in (bf16 on a GPU), against the adapter model
        fidelity = (before - _probe_logits(merged, tokenizer)).abs().max().item()
        _check_fidelity(fidelity, cfg, dtype)
        merge_seconds = time.perf_counter() - started
        size_mb = sum(p.numel() * p.element_size() for p in merged.parameters()) / 2**20
        tracker.log_metrics({"promote/merge_seconds": merge_seconds, "promote/merge_max_abs_logit_diff": fidelity,
                             "promote/merged_size_mb": size_mb})
        # the merged model goes from memory into the MLflow model once (no intermediate folder)
        version = reg.register_merged_model(None, name, lineage, tracker.run_id, dtype=dtype,
                                            alias=reg.CANDIDATE, model=merged, tokenizer=tokenizer,
                                            model_name=(source.tags.get("mlflow.runName") or "model") + "-merged",
                                            reason=f"newest promoted model (training run {run_id}, promote run "
                                                   f"{tracker.run_id})")
        del model, merged
        gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    uri = f"models:/{name}/{version.version}"
    tracker.set_tags({"arena.model_version": str(version.version), "arena.model_uri": uri})
    tracker.describe(notes.promotion(uri, run_id, reg.CANDIDATE, fidelity, merge_bound(cfg, dtype)))
    return {"name": name, "version": str(version.version), "model_uri": uri, "alias": reg.CANDIDATE,
            "merge_max_abs_logit_diff": fidelity}


def _promote_champion(cfg: PromoteConfig, tracker) -> dict:
    if not cfg.model_uri:
        raise ValueError("alias=champion applies the policy to an evaluated version: pass model_uri=models:/NAME/N")
    version = reg.lookup_version(cfg.model_uri)
    t = version.tags
    tracker.set_tags({"arena.stage": "promote", "arena.registered_model": version.name,
                      "arena.model_version": str(version.version), "arena.model_uri": cfg.model_uri,
                      **{k: t[k] for k in ("arena.source_run", "arena.method", "arena.train", "arena.domain",
                                           "arena.base_model") if t.get(k)},
                      "mlflow.runName": cfg.run_name or _policy_name("deciding", t)})
    tracker.log_params({"cfg.model_uri": cfg.model_uri, "cfg.alias": reg.CHAMPION, "cfg.policy": cfg.policy})
    decision = reg.apply_policy(version.name, version.version, cfg.policy,
                                actor=f"{reg.default_actor()} (promote run {tracker.run_id})")
    outcome = "promoted" if decision.promote else "kept"
    tracker.set_tags({"arena.policy_decision": "promote" if decision.promote else "keep",
                      **({} if cfg.run_name else {"mlflow.runName": _policy_name(outcome, t)})})
    tracker.log_params({f"policy.{k}": v for k, v in decision.gates.items() if v is not None})
    tracker.log_metrics({"policy/promoted": float(decision.promote),
                         **{f"policy/{gate}": value for gate, (value, _, _) in decision.checks.items()
                            if isinstance(value, (int, float))}})
    tracker.log_dict({"promote": decision.promote, "reasons": decision.reasons, "gates": decision.gates,
                      "checks": {g: {"value": v, "threshold": th, "passed": ok}
                                 for g, (v, th, ok) in decision.checks.items()},
                      "policy": cfg.policy, "model": f"models:/{version.name}/{version.version}"},
                     "policy_decision.json")
    tracker.describe(notes.policy(f"models:/{version.name}/{version.version}", decision.promote, reg.CHAMPION,
                                  {g: (th, ok) for g, (_, th, ok) in decision.checks.items()},
                                  {g: v for g, (v, _, _) in decision.checks.items()}, decision.reasons, cfg.policy))
    return {"name": version.name, "version": str(version.version),
            "model_uri": f"models:/{version.name}/{version.version}", "alias": reg.CHAMPION,
            "promoted": decision.promote, "reasons": decision.reasons}


def _policy_name(outcome: str, t: dict) -> str:
    return policy_run_name(outcome, reg.CHAMPION, t.get("arena.train"), t.get("arena.method"),
                           t.get("arena.method_label"), t.get("arena.domain"), t.get("arena.base_model"))


def merge_bound(cfg: PromoteConfig, dtype: str) -> float:
    """The largest logit change the merge may cause: ``max_merge_logit_diff``, or by the merge dtype when it is 0."""
    if cfg.max_merge_logit_diff:
        return cfg.max_merge_logit_diff
    return MERGE_BOUNDS.get(dtype, MERGE_BOUNDS["float32"])


def _check_fidelity(fidelity: float, cfg: PromoteConfig, dtype: str) -> None:
    """The merged model must compute what the adapter model computed: a finite logit change within the bound."""
    import math

    bound = merge_bound(cfg, dtype)
    if not math.isfinite(fidelity):
        raise MergeError(f"the merged model's logits differ from the adapter model's by {fidelity} (not finite): the "
                         "adapter holds non-finite weights or the merge overflowed; nothing was registered")
    if fidelity > bound:
        raise MergeError(f"the merge changed the logits by {fidelity:.4g} > {bound:g} (max_merge_logit_diff for "
                         f"{dtype}): the merged model is not the trained one; nothing was registered")


def _base_source(record: dict, tags: dict) -> str:
    """Where to load the base from: the recorded source if it is reachable here, else the base's short name
    resolved on this machine (the same model: known short names rebuild their cache, hub ids download)."""
    from peft_arena.models import resolve_base

    recorded = record.get("base_source") or tags.get("arena.base_source") or ""
    if recorded and (Path(recorded).exists() or not recorded.startswith(("/", ".", "~"))):
        return recorded
    short = record.get("base_model") or tags.get("arena.base_model")
    if not short:
        raise ValueError(f"the base {recorded!r} is not on this machine and the run records no base short name")
    return resolve_base(short).source


def _tokenizer(adapter: Path, base_source: str):
    from peft_arena.models import load_tokenizer

    return load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").exists() else base_source)


def _probe_logits(model, tokenizer):
    import torch

    batch = tokenizer(_PROBE, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**batch).logits.float().cpu()


def _merge_placement(cfg: PromoteConfig) -> tuple[str, str]:
    """(dtype, device) of the merge: ``auto`` = bfloat16 on the GPU when there is one, else float32 on the CPU."""
    import torch

    cuda = torch.cuda.is_available()
    device = cfg.device if cfg.device != "auto" else ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device=auto or cpu")
    dtype = cfg.merge_dtype if cfg.merge_dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"merge_dtype must be auto, float32, bfloat16 or float16; got {cfg.merge_dtype!r}")
    return dtype, device


def _load_base(base_source: str, record: dict, dtype: str, device: str):
    """The base on the merge device in the merge dtype (a full finetune is loaded by ``load_trained`` itself)."""
    import torch

    from peft_arena.training.precision import load_base_for_training

    if record.get("method") == "full":
        return None
    return load_base_for_training(base_source, getattr(torch, dtype), device=None if device == "cpu" else device)
