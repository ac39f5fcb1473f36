"""KeepLoRA: a LoRA whose update is kept out of the base weight's principal input subspace (Luo et al. 2026).

peft has no KeepLoRA; this follows the PEFT-Arena implementation (``utils/keeplora.py``, reference §2.2):

1. One forward/backward pass of the *base* model on a calibration batch gives the gradient G (out×in) of every
   adapted weight W. The batch is the trainer's own first micro-batch, taken from its shuffled sampler as
   training will see it (the paper: rank 0's first micro-batch): the recipes build the adapter with
   ``BuildContext(defer_calibration=True)``, create the trainer, then call :func:`calibrate_keeplora`. In a
   multi-process (DDP) run every process calibrates on its own first micro-batch and DDP's start-up broadcast
   from rank 0 makes rank 0's initialisation (and offset base) everyone's, as the paper's rank-0 init + broadcast.
2. V_k: the top-k right singular vectors of W (k = ``principal_rank``, 0 means 4·r).
3. The residual gradient G_res = G − G·V_k·V_kᵀ has no component along W's principal input directions.
4. Its rank-r SVD G_res ≈ U_r·Σ_r·Q_rᵀ initialises B₀ = U_r·Σ_r and A₀ = Q_rᵀ.
5. A is frozen, so every update ΔW = s·B·A₀ has its rows in span(Q_r), orthogonal to V_k: the principal
   subspace, where the general knowledge sits, is left alone.

``offset=true`` (default): the base is offset, W ← W − s·B₀·A₀, so the model at step 0 is exactly the base (up to
the weight dtype's rounding) while B starts at the gradient init as in the paper. ``offset=false`` is the paper's
code as it ran: the model starts at W + s·U_r·Σ_r·Q_rᵀ, a small step along the (projected) gradient.

Saving: the in-memory adapter with ``offset=true`` fits the offset base only. Because A stays A₀, the trained model
W − s·B₀·A₀ + s·B·A₀ = W + s·(B − B₀)·A₀ exactly, so the adapter is saved as the rank-r LoRA (B − B₀, A₀), which
loads on the original base (no rank doubling as for PiSSA/MiLoRA, whose A trains). With ``offset=false`` the
adapter is saved as trained. Either way the saved folder is a plain peft LoRA; A's freezing matters only in training.

Caveat for trainers that obtain a reference model through ``disable_adapter()`` (as for PiSSA/MiLoRA): with
``offset=true`` that gives the offset base W − s·B₀·A₀, not W.
"""

from __future__ import annotations

import torch

from peft_arena.methods.common import (
    LORA_DEFAULTS,
    LORA_HELP,
    PEFT_GRPO_LR,
    PEFT_SFT_LR,
    lora_layers,
    wrap,
)
from peft_arena.methods.gram_svd import truncated_svd, use_gram_svd
from peft_arena.methods.lora import lora_config
from peft_arena.methods.registry import BuildContext, MethodError, MethodSpec, register


def build_keeplora(model, options: dict, ctx: BuildContext):
    peft_model = wrap(model, lora_config({k: options[k] for k in LORA_DEFAULTS}))
    layers = lora_layers(peft_model)
    for _, layer in layers:
        layer.lora_A["default"].weight.requires_grad_(False)
    if ctx.structure_only:
        return peft_model
    if ctx.calibration_batch is not None:
        calibrate_keeplora(peft_model, options, ctx.calibration_batch)
    elif ctx.defer_calibration:
        peft_model._arena_keeplora_pending = True  # save_keeplora refuses an adapter that was never initialised
    else:
        raise MethodError("keeplora initialises from a gradient: pass BuildContext(calibration_batch=…), "
                          "a tokenised training batch with input_ids, attention_mask and labels, or "
                          "BuildContext(defer_calibration=True) and call calibrate_keeplora with the trainer's "
                          "first micro-batch")
    return peft_model


def calibrate_keeplora(peft_model, options: dict, batch: dict) -> None:
    """KeepLoRA's initialisation on a built model, from one batch: (B₀, A₀) from the base model's residual gradient
    and, with ``offset``, the base offset by −s·B₀·A₀. Runs once; a second call is an error."""
    if getattr(peft_model, "_arena_keeplora_done", False):
        raise MethodError("keeplora is already initialised; calibrating twice would offset the base twice")
    layers = lora_layers(peft_model)
    gradients = residual_gradient_inits(peft_model, layers, batch, options)
    initial_b = {}
    with torch.no_grad():
        for name, layer in layers:
            lora_b, lora_a = gradients[name]
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
            if options["offset"]:
                weight = layer.get_base_layer().weight
                offset = layer.scaling["default"] * (lora_b.float() @ lora_a.float())
                weight.copy_((weight.float() - offset).to(weight.dtype))
                initial_b[name] = (layer.lora_B["default"].weight.detach().clone(),
                                   layer.lora_A["default"].weight.detach().clone())
    if options["offset"]:
        peft_model._arena_keeplora_initial = initial_b  # for save_keeplora's exact conversion
    for _, layer in layers:  # again: leaving disable_adapter() makes the adapter trainable once more
        layer.lora_A["default"].weight.requires_grad_(False)
    peft_model._arena_keeplora_pending = False
    peft_model._arena_keeplora_done = True


def save_keeplora(model, options: dict, out_dir) -> None:
    """``save_pretrained`` of an adapter that loads on the original base: with ``offset`` the trained (B, A₀) on the
    offset base is written as (B − B₀, A₀); B is restored afterwards, so training can go on."""
    if getattr(model, "_arena_keeplora_pending", False):
        raise MethodError("keeplora: the adapter was built with deferred calibration and never calibrated "
                          "(calibrate_keeplora); its A is random and frozen, so nothing was saved")
    if not options["offset"]:
        model.save_pretrained(out_dir)
        return
    initial = getattr(model, "_arena_keeplora_initial", None)
    if initial is None:
        raise MethodError("keeplora (offset=true): the model lost its initial B₀ (was it re-wrapped after build?); "
                          "without it the adapter only fits the offset base, so nothing was saved")
    layers = dict(lora_layers(model))
    if set(layers) != set(initial):
        raise MethodError("keeplora (offset=true): the adapted layers differ from those built; nothing was saved")
    for name, (_, lora_a0) in initial.items():
        if not torch.equal(layers[name].lora_A["default"].weight, lora_a0.to(layers[name].lora_A["default"].weight)):
            raise MethodError(f"keeplora (offset=true): A of {name} changed during training (it must stay frozen "
                              "for the exact (B − B₀, A₀) conversion); nothing was saved")
    trained = {name: layer.lora_B["default"].weight.detach().clone() for name, layer in layers.items()}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_B["default"].weight.sub_(initial[name][0].to(trained[name]))
        model.save_pretrained(out_dir)
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_B["default"].weight.copy_(trained[name])


def residual_gradient_inits(peft_model, layers, batch: dict, options: dict) -> dict[str, tuple]:
    """{layer name: (U_r·Σ_r, Q_rᵀ)} from one backward pass of the base model (adapters disabled).

    Each weight's init is computed in a post-accumulate-grad hook and its gradient dropped at once, so the pass
    never holds more than one full-size gradient beyond what autograd itself keeps.
    """
    r = options["r"]
    principal_rank = options["principal_rank"] or 4 * r
    inits: dict[str, tuple] = {}
    handles = []

    def hook_for(name, weight):
        def hook(param):
            inits[name] = _project_and_factor(weight.detach(), param.grad, principal_rank, r)
            param.grad = None
        return hook

    weights = [(name, layer.get_base_layer().weight) for name, layer in layers]
    was_training = peft_model.training
    try:
        for name, weight in weights:
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(hook_for(name, weight)))
        peft_model.eval()  # no dropout: the gradient of the model as it is
        device = weights[0][1].device
        # padding-free batches carry position_ids (sequence boundaries) instead of an attention mask
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        if "labels" not in inputs:
            raise MethodError("keeplora's calibration batch needs labels (the training loss's masked targets)")
        with peft_model.disable_adapter():
            loss = peft_model(**inputs).loss
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for _, weight in weights:
            weight.requires_grad_(False)
            weight.grad = None
        peft_model.train(was_training)
    missing = [name for name, _ in weights if name not in inits]
    if missing:
        raise MethodError(f"keeplora: no gradient reached {missing[0]} (and {len(missing) - 1} more); "
                          "the calibration batch's labels may all be masked (-100)")
    return inits


@torch.no_grad()
def _project_and_factor(weight: torch.Tensor, grad: torch.Tensor, principal_rank: int, r: int):
    w, g = weight.float(), grad.float()
    k = min(principal_rank, min(w.shape))
    if use_gram_svd(w):  # GPU: truncated SVDs through the smaller Gram matrix (methods/gram_svd.py)
        v_k = truncated_svd(w, k)[2].T
        g_res = g - (g @ v_k) @ v_k.T
        u, s, qh = truncated_svd(g_res, r)
    else:
        v_k = torch.linalg.svd(w, full_matrices=False)[2][:k].T  # in × k
        g_res = g - (g @ v_k) @ v_k.T
        u, s, qh = torch.linalg.svd(g_res, full_matrices=False)
    rank = min(r, s.numel())
    lora_b = torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device)
    lora_a = torch.zeros(r, w.shape[1], dtype=w.dtype, device=w.device)
    lora_b[:, :rank] = u[:, :rank] * s[:rank]
    lora_a[:rank] = qh[:rank]
    return lora_b, lora_a


register(MethodSpec(
    name="keeplora", family="lora",
    summary="KeepLoRA: LoRA with A frozen to the residual gradient's top-r directions, orthogonal to W's "
            "principal subspace (Luo et al. 2026)",
    defaults={**LORA_DEFAULTS, "principal_rank": 0, "offset": True},
    option_help={**LORA_HELP,
                 "principal_rank": "k, the number of W's top right singular vectors the update avoids (0: 4·r)",
                 "offset": "true: B₀ = U_r·Σ_r, A₀ = Q_rᵀ and the base offset by −s·B₀·A₀, so step 0 is the base; "
                           "false: the paper's code, no offset (step 0 is W + s·B₀·A₀)"},
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_keeplora,
    label=lambda o: f"r{o['r']}" if o["offset"] else f"r{o['r']}nooffset",
    needs_calibration=True, calibrate=calibrate_keeplora, save_adapter=save_keeplora,
))
