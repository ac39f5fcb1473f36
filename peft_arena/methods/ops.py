"""What stages do with a method: build it, save and load the trained result, merge it, count its parameters.

The trained-artifact format: a folder with either peft's ``save_pretrained`` output (adapter_config.json +
adapter_model.safetensors) or, for ``full``, a whole Hugging Face model folder; plus ``arena_method.json`` =
{"method", "options", "base_model", "base_source", "label"}.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft_arena.methods.registry import BuildContext, MergeError, MethodError, MethodSpec, get_method

ARENA_FILE = "arena_method.json"


def build(model, method: str, overrides: dict[str, Any] | None = None, ctx: BuildContext | None = None):
    """(trainable model, resolved options): ``method`` applied to ``model`` with its defaults updated by overrides."""
    spec = get_method(method)
    options = spec.resolve(overrides)
    return spec.build(model, options, ctx or BuildContext()), options


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; a tied embedding counts once. Buffers (VeRA's shared projections) don't count."""
    trainable = total = 0
    for param in model.parameters():  # parameters() yields each tensor once, so tied weights count once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def count_params(base: str, method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameter counts of ``method`` on ``base`` (short name, folder or hub id), built on the meta device from the
    base's config alone: no weights are read or allocated, so a 7B model counts in about a second.

    Keys: method, label, options, base, trainable (what the optimizer updates), total (base + adapter),
    base_total, embedding (input embedding + LM head, once if tied: the part the paper's full-FT count leaves
    out), trainable_pct (of base_total).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from peft_arena.models import base_config

    spec = get_method(method)
    options = spec.resolve(overrides)
    config = base_config(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        base_total = count_parameters(model)[1]
        embedding = _embedding_params(model)
        # total_steps only feeds AdaLoRA's schedule checks; any value large enough for the default ratios does.
        trained = spec.build(model, options, BuildContext(structure_only=True, total_steps=1000))
    trainable, total = count_parameters(trained)
    return {"method": method, "label": spec.label(options), "options": options, "base": base,
            "trainable": trainable, "total": total, "base_total": base_total, "embedding": embedding,
            "trainable_pct": 100.0 * trainable / base_total}


def _embedding_params(model) -> int:
    tensors = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
               for p in m.parameters()}
    return sum(p.numel() for p in tensors.values())


def save_trained(model, method: str | MethodSpec, options: dict, out_dir: str | Path, *, base_model: str,
                 base_source: str, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write the trained-artifact folder of ``model`` (as trained by ``method`` with ``options``); returns it.

    PiSSA/MiLoRA rewrote the base weights in memory; their adapter is converted by peft to a rank-2r LoRA on the
    original base (``path_initial_model_for_weight_conversion``), so the folder loads on the untouched base.
    A method with its own ``save_adapter`` (KeepLoRA: (B − B₀, A₀) when the base was offset) writes the folder itself.
    ``state_dict``: the full (gathered) weights when ``model``'s own parameters are sharded (FSDP, ZeRO-3).
    """
    from peft import PeftModel

    spec = method if isinstance(method, MethodSpec) else get_method(method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.name == "full":
        if isinstance(model, PeftModel):
            raise MethodError("method 'full' was given a PEFT model; save it under its adapter method")
        model.save_pretrained(out, state_dict=state_dict)
    elif not isinstance(model, PeftModel):
        raise MethodError(f"method {spec.name!r} trains an adapter, but the model to save carries none")
    elif state_dict is not None and (spec.save_adapter is not None or spec.rewrites_base):
        raise MethodError(f"{spec.name}: its adapter is written from the live unsharded model, not a state dict")
    elif spec.save_adapter is not None:
        spec.save_adapter(model, options, out)
    elif spec.rewrites_base:
        if not hasattr(model, "_arena_initial_adapter"):
            raise MethodError(f"{spec.name}: the model lost its initial-adapter copy (was it re-wrapped after "
                              "build?); without it the adapter only fits the residual base, so nothing was saved")
        _save_converted(model, out)
    else:
        model.save_pretrained(out, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = {"method": spec.name, "options": options, "base_model": base_model, "base_source": base_source,
              "label": spec.label(options)}
    (out / ARENA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _save_converted(model, out: Path) -> None:
    from safetensors.torch import save_file

    config, state = model._arena_initial_adapter
    scratch = Path(tempfile.mkdtemp(prefix="arena-initial-adapter-"))
    try:
        initial = scratch / "initial"
        config.save_pretrained(initial)
        save_file({k: v.contiguous() for k, v in state.items()}, initial / "adapter_model.safetensors")
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_arena_method(trained_dir: str | Path) -> dict:
    path = Path(trained_dir) / ARENA_FILE
    if not path.exists():
        raise MethodError(f"{trained_dir} has no {ARENA_FILE}: it is not a trained artifact of the arena "
                          "(a plain Hugging Face model folder is loaded as a base model instead)")
    return json.loads(path.read_text())


def load_trained(base_source_or_model, trained_dir: str | Path, dtype: str = "float32"):
    """The trained model of an artifact folder: a PeftModel on its base, or the full model for method ``full``.

    ``base_source_or_model``: a loaded base model, a folder or hub id, or None for the base recorded in
    ``arena_method.json``.
    """
    from peft import PeftModel

    from peft_arena.models import load_model

    record = read_arena_method(trained_dir)
    if record["method"] == "full":
        return load_model(str(trained_dir), dtype=dtype)
    base = base_source_or_model if base_source_or_model is not None else record["base_source"]
    if isinstance(base, (str, Path)):
        base = load_model(str(base), dtype=dtype)
    if isinstance(base, PeftModel):
        raise MethodError("load_trained needs a plain base model, not one that already carries an adapter")
    if record["method"] == "boft":  # BOFT's factors, lean forward and merge, no dense permutation matrices
        from peft_arena.methods.boft import drop_permutation_stacks, peft_boft_layers

        with peft_boft_layers():
            model = _load_complete(PeftModel, base, trained_dir)
        drop_permutation_stacks(model)
        return model
    return _load_complete(PeftModel, base, trained_dir)


def _load_complete(peft_model_cls, base, trained_dir: str | Path):
    """``PeftModel.from_pretrained``, refusing an adapter whose weights do not all load.

    peft only warns ("Found missing adapter keys") and leaves the missing matrices at their initialisation, e.g. a
    random ``lora_A`` when the keys were renamed; merged, that is a different model than the trained one. peft's own
    check decides what counts as missing (shared parameters are filtered out there), so there are no false alarms.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft_model_cls.from_pretrained(base, str(trained_dir))
    for w in caught:
        if "missing adapter keys" in str(w.message):
            text = str(w.message)
            raise MethodError(f"the adapter in {trained_dir} does not load completely ({text[:300]}"
                              f"{'…' if len(text) > 300 else ''}); its weight names do not match the model: "
                              "it was renamed, truncated or saved for another base; retrain or restore it")
    for w in caught:  # everything else as it would have been shown
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def merge(model):
    """A plain transformers model with the adapter folded into the weights; a full model is returned as is.

    Raises MergeError when peft cannot merge (never falls back to the unmerged or base model).
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        kind = model.peft_config[model.active_adapter].peft_type
        try:
            merged = model.merge_and_unload(safe_merge=True)
        except Exception as err:  # peft raises ValueError, NotImplementedError, AttributeError… depending on type
            raise MergeError(f"merging the {kind} adapter failed: {type(err).__name__}: {err}") from err
        leftover = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
        if leftover:
            raise MergeError(f"merging the {kind} adapter left adapter layers behind, e.g. {leftover[0]}")
        return merged
    if isinstance(model, PreTrainedModel):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise MergeError("the model holds injected adapter layers without a PeftModel wrapper; cannot merge")
        return model
    raise MergeError(f"cannot merge a {type(model).__name__}: expected a PeftModel or a transformers model")
