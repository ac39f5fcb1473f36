"""SVD-initialised LoRA: PiSSA (principal components) and MiLoRA (minor components).

Both split each weight with its SVD, W = U·S·Vᵀ, move r singular triplets into the adapter and keep the rest as a
residual base, so the model is unchanged at step 0:

    B = U_r·sqrt(S_r/s),  A = sqrt(S_r/s)·V_rᵀ,  W_res = W − s·B·A          (s = alpha/r)

PiSSA (Meng et al. 2024) takes the r largest triplets and trains the principal directions; MiLoRA (Wang et al.
2024) takes the r smallest and leaves the principal ones alone. The paper's code had no initialisation for either
(it trained them as plain LoRA unless handed a pre-initialised adapter); here they are the methods themselves:
PiSSA through peft's ``init_lora_weights="pissa"``, MiLoRA with the same formula on the minor triplets.

Because the base is rewritten, the trained adapter is saved converted to a rank-2r LoRA on the *original* base
(see ``common.remember_initial_adapter``), so evaluation, merging and spectral analysis need no residual base.
"""

from __future__ import annotations

import torch

from peft_arena.methods.common import (
    LORA_DEFAULTS,
    LORA_HELP,
    PEFT_GRPO_LR,
    PEFT_SFT_LR,
    lora_label,
    lora_layers,
    remember_initial_adapter,
    wrap,
)
from peft_arena.methods.gram_svd import truncated_svd, use_gram_svd
from peft_arena.methods.lora import lora_config
from peft_arena.methods.registry import BuildContext, MethodSpec, register


def build_pissa(model, options: dict, ctx: BuildContext):
    if ctx.structure_only:  # same shapes; the SVD needs real weights
        return wrap(model, lora_config(_lora_options(options)))
    niter = options["svd_niter"]
    init = "pissa" if niter == 0 else f"pissa_niter_{niter}"
    if niter == 0 and use_gram_svd(next(model.parameters())):
        # GPU: peft's exact init runs cuSOLVER's full SVD (seconds per matrix at 7B); the same triplets come
        # from the Gram matrix (methods/gram_svd.py). The config then reads as peft's own PiSSA.
        peft_model = wrap(model, lora_config(_lora_options(options)))
        for _, layer in lora_layers(peft_model):
            _init_components(layer, "default", largest=True)
        peft_model.peft_config["default"].init_lora_weights = init
    else:
        peft_model = wrap(model, lora_config(_lora_options(options), init_lora_weights=init))
    remember_initial_adapter(peft_model)
    return peft_model


def build_milora(model, options: dict, ctx: BuildContext):
    peft_model = wrap(model, lora_config(_lora_options(options)))
    if ctx.structure_only:
        return peft_model
    for _, layer in lora_layers(peft_model):
        _init_components(layer, "default", largest=False)
    remember_initial_adapter(peft_model)
    return peft_model


@torch.no_grad()
def _init_components(layer, adapter: str, largest: bool) -> None:
    """One LoRA layer from r singular triplets of W (largest: PiSSA, smallest: MiLoRA); the rest stays in the base."""
    base = layer.get_base_layer()
    weight = base.weight
    r, scale = layer.r[adapter], layer.scaling[adapter]
    if use_gram_svd(weight):
        u, s, vh = truncated_svd(weight, r, largest=largest)
        s = s / scale
    else:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        u, s, vh = (u[:, :r], s[:r] / scale, vh[:r]) if largest else (u[:, -r:], s[-r:] / scale, vh[-r:])
    lora_b = u * s.sqrt()  # out × r
    lora_a = s.sqrt()[:, None] * vh  # r × in
    layer.lora_A[adapter].weight.copy_(lora_a)
    layer.lora_B[adapter].weight.copy_(lora_b)
    weight.copy_((weight.float() - scale * lora_b @ lora_a).to(weight.dtype))


def _lora_options(options: dict) -> dict:
    return {k: options[k] for k in LORA_DEFAULTS}


register(MethodSpec(
    name="pissa", family="lora",
    summary="PiSSA: LoRA initialised with the top-r singular triplets of W, residual base (Meng et al. 2024)",
    defaults={**LORA_DEFAULTS, "svd_niter": 0},
    option_help={**LORA_HELP, "svd_niter": "0: exact SVD; N>0: peft's fast randomised SVD with N subspace iterations"},
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_pissa, label=lora_label, rewrites_base=True,
))

register(MethodSpec(
    name="milora", family="lora",
    summary="MiLoRA: LoRA initialised with the r smallest singular triplets of W, residual base (Wang et al. 2024)",
    defaults=dict(LORA_DEFAULTS), option_help=dict(LORA_HELP),
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_milora, label=lora_label, rewrites_base=True,
))
