"""LoRA and its variants that keep LoRA's zero-initialised update: DoRA, rsLoRA, LoRA+.

W' = W + s·B·A with A (r×in) Kaiming-random, B (out×r) zero, s = alpha/r (rsLoRA: alpha/√r).
DoRA adds a learned per-output-row magnitude; LoRA+ trains B with a larger learning rate than A.
All four are built exactly as the paper's SFT trainer builds them: ``LoraConfig(r, lora_alpha, lora_dropout,
init_lora_weights=True, bias="none")`` on every linear layer of every block.
"""

from __future__ import annotations

from peft_arena.methods.common import (
    LORA_DEFAULTS,
    LORA_HELP,
    PEFT_GRPO_LR,
    PEFT_SFT_LR,
    lora_label,
    parse_targets,
    wrap,
)
from peft_arena.methods.registry import BuildContext, MethodSpec, register


def lora_config(options: dict, **extra):
    """The ``LoraConfig`` every additive low-rank method starts from (extra fields: use_dora, init, …)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=parse_targets(options["target_modules"]),
        bias="none",
        **extra,
    )


def build_lora(model, options: dict, ctx: BuildContext):
    return wrap(model, lora_config(options))


def build_dora(model, options: dict, ctx: BuildContext):
    return wrap(model, lora_config(options, use_dora=True))


def build_rslora(model, options: dict, ctx: BuildContext):
    return wrap(model, lora_config(options, use_rslora=True))


def build_loraplus(model, options: dict, ctx: BuildContext):
    # LoRA+ changes the optimizer, not the adapter: see loraplus_optimizer.
    return wrap(model, lora_config({k: v for k, v in options.items() if k != "lr_ratio"}))


def loraplus_optimizer(model, options: dict, lr: float, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW with B (and DoRA magnitudes) at lr·lr_ratio, through peft's own LoRA+ grouping.

    The paper used bitsandbytes' 8-bit Adam here; plain torch AdamW keeps the method's learning-rate split
    without the CUDA-only dependency.
    """
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=options["lr_ratio"],
                                     loraplus_weight_decay=weight_decay, betas=tuple(betas))


register(MethodSpec(
    name="lora", family="lora",
    summary="LoRA: W + (alpha/r)·B·A, B zero-initialised (Hu et al. 2021)",
    defaults=dict(LORA_DEFAULTS), option_help=dict(LORA_HELP),
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_lora, label=lora_label,
))

register(MethodSpec(
    name="dora", family="lora",
    summary="DoRA: LoRA on the direction plus a learned per-row magnitude (Liu et al. 2024)",
    defaults=dict(LORA_DEFAULTS), option_help=dict(LORA_HELP),
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_dora, label=lora_label,
))

register(MethodSpec(
    name="rslora", family="lora",
    summary="rsLoRA: LoRA scaled by alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)",
    defaults=dict(LORA_DEFAULTS), option_help=dict(LORA_HELP),
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_rslora, label=lora_label,
))

register(MethodSpec(
    name="loraplus", family="lora",
    summary="LoRA+: LoRA with B trained at lr_ratio times A's learning rate (Hayou et al. 2024)",
    defaults={**LORA_DEFAULTS, "lr_ratio": 16.0},
    option_help={**LORA_HELP, "lr_ratio": "learning rate of B over that of A (the paper's loraplus_lr_ratio=16)"},
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_loraplus, label=lora_label,
    make_optimizer=loraplus_optimizer,
))
