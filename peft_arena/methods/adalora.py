"""AdaLoRA: SVD-shaped low-rank updates P·Λ·Q whose rank budget is reallocated during training (Zhang et al. 2023).

Every layer starts at ``init_r`` triplets; after ``tinit`` warm-up steps the budget is pruned, every
``delta_t`` steps, by importance scores down to an average of ``r`` per layer, and held fixed for the last
``tfinal`` steps. peft does the pruning in ``update_and_allocate``, which must run after each optimizer step
while the gradients still exist; the orthogonality regulariser w·(‖PᵀP − I‖ + ‖QQᵀ − I‖) keeps P and Q
near-orthogonal. ``adalora_callbacks`` gives the Trainer callback that does both (a training loop without a
Trainer calls the same two pieces: ``orthogonality_penalty`` in the loss, ``update_and_allocate`` after the step).

The paper's trainer never called ``update_and_allocate`` and computed its own cross-entropy, so neither the rank
reallocation nor the orthogonality regulariser ever ran: it trained a fixed rank-12 SVD-shaped adapter on the plain
task loss. ``reallocate=false`` reproduces exactly that: no pruning and no regulariser (``orth_reg_weight`` is then
ignored). ``reallocate=true`` (the default) is AdaLoRA as published: pruning plus the regulariser. The paper's "r8"
row has 1.5× LoRA-r8's parameters: peft's init_r=12.
"""

from __future__ import annotations

import torch

from peft_arena.methods.common import (
    DEFAULT_TARGETS,
    PEFT_GRPO_LR,
    PEFT_SFT_LR,
    TARGETS_HELP,
    parse_targets,
    wrap,
)
from peft_arena.methods.registry import BuildContext, MethodError, MethodSpec, register


def build_adalora(model, options: dict, ctx: BuildContext):
    from peft import AdaLoraConfig, TaskType

    if ctx.total_steps < 1:
        raise MethodError(f"adalora needs the planned number of optimizer steps; got total_steps={ctx.total_steps}")
    if options["reallocate"] and options["r"] >= options["init_r"]:
        raise MethodError(f"adalora: r ({options['r']}) must be below init_r ({options['init_r']}) to reallocate "
                          "ranks (r is the average rank left after pruning; with r >= init_r peft's pruning step "
                          "fails); lower r, raise init_r, or set reallocate=false for fixed ranks")
    tinit = int(options["tinit_ratio"] * ctx.total_steps)
    tfinal = int(options["tfinal_ratio"] * ctx.total_steps)
    if tinit + tfinal >= ctx.total_steps:
        raise MethodError(f"adalora: tinit ({tinit}) + tfinal ({tfinal}) leave no budget steps out of "
                          f"{ctx.total_steps}; lower tinit_ratio/tfinal_ratio")
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_r=options["r"],
        init_r=options["init_r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=parse_targets(options["target_modules"]),
        total_step=ctx.total_steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=options["delta_t"],
        # peft adds the regulariser to ``outputs.loss``, which TRL's SFT and GRPO trainers never use (they compute
        # the loss from log-probs). The arena's callback owns it instead, so it applies once whatever the trainer.
        orth_reg_weight=0.0,
    )
    model = wrap(model, config)
    freeze_ranknum(model)
    return model


def freeze_ranknum(model) -> None:
    """Make every layer's ``ranknum`` a constant again, as peft creates it (``requires_grad=False``).

    ``ranknum`` is the initial rank, the denominator of the update's scale; peft never saves it (a loaded adapter
    gets ``init_r`` back). On a bf16/fp16 base peft's fp32 upcast of the adapter re-registers it as a fresh
    Parameter, which requires a gradient: the optimizer then moves it (weight decay included), the gradient clip
    counts it, the saved adapter no longer computes what was trained, and every adapted linear keeps its T×out
    output for ranknum's gradient (one bf16 T×out tensor per adapted linear: the +24 GiB over LoRA measured on a
    7B bf16 base at 4×2048 tokens).
    """
    from peft.tuners.adalora.layer import AdaLoraLayer

    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for ranknum in module.ranknum.values():
                ranknum.requires_grad_(False)


def adalora_callbacks(model, options: dict, ctx: BuildContext) -> list:
    """The TrainerCallback that runs AdaLoRA's training-time parts, with ``reallocate``: the orthogonality
    regulariser and the rank budget. With ``reallocate=false`` (the paper's code) it does nothing."""
    from transformers import TrainerCallback  # here, so that listing methods does not import transformers

    weight = options["orth_reg_weight"] if options["reallocate"] else 0.0

    class AdaLoraTraining(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            # The gradients are zero here, before the step's micro-batches: adding ∇(w·R) now equals training
            # on loss + w·R once per optimizer step, clipped together with the task gradient.
            if weight > 0 and model.training:
                (weight * orthogonality_penalty(model)).backward()

        def on_optimizer_step(self, args, state, control, **kwargs):
            # After optimizer.step() and before zero_grad(): the importance scores need the gradients.
            if options["reallocate"]:
                model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraTraining()]


def orthogonality_penalty(model):
    """Mean over P and Q matrices of ‖PᵀP − I‖_F / ‖QQᵀ − I‖_F: peft's AdaLoRA regulariser.

    Matrices of one shape are stacked and their Gram matrices come from one batched matmul, their norms from one
    call: a 7B model's 392 matrices fall in 5 shapes, so a handful of kernels instead of ~4,000 (forward and
    backward) for the same value and gradient.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and (".lora_A." in name or ".lora_B." in name):
            key = (".lora_A." in name, param.shape, param.dtype, param.device)
            groups.setdefault(key, []).append(param)
    if not groups:
        raise MethodError("adalora: the orthogonality penalty found no trainable P (lora_B) or Q (lora_A) matrix")
    norms = []
    for (is_q, _, dtype, device), params in groups.items():
        stacked = torch.stack(params)  # n × r × in (Q = lora_A) or n × out × r (P = lora_B)
        cov = stacked @ stacked.mT if is_q else stacked.mT @ stacked  # n × r × r: QQᵀ or PᵀP
        eye = torch.eye(cov.shape[-1], device=device, dtype=dtype)
        norms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.cat(norms).mean()


register(MethodSpec(
    name="adalora", family="lora",
    summary="AdaLoRA: SVD-shaped low-rank update with importance-based rank reallocation (Zhang et al. 2023)",
    defaults={"r": 8, "init_r": 12, "alpha": 16, "dropout": 0.05, "target_modules": DEFAULT_TARGETS,
              "tinit_ratio": 0.1, "tfinal_ratio": 0.2, "delta_t": 10, "orth_reg_weight": 0.5, "reallocate": True},
    option_help={
        "r": "average rank per layer after reallocation (peft target_r); below init_r with reallocate=true",
        "init_r": "rank every layer starts with (peft's default 12, as in the paper)",
        "alpha": "scaling numerator of the update",
        "dropout": "dropout on the adapter's input",
        "target_modules": TARGETS_HELP,
        "tinit_ratio": "fraction of the steps trained before any pruning (tinit)",
        "tfinal_ratio": "fraction of the steps at the end with the final budget fixed (tfinal)",
        "delta_t": "steps between two budget reallocations",
        "orth_reg_weight": "weight of the orthogonality regulariser on P and Q, added once per optimizer step under "
                           "SFT and GRPO alike (only with reallocate=true)",
        "reallocate": "true: AdaLoRA as published (rank pruning + orthogonality regulariser); false: the paper's "
                      "code, fixed init_r ranks trained on the task loss alone (no pruning, no regulariser)",
    },
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_adalora, label=lambda o: f"r{o['r']}a{o['alpha']}",
    callbacks=adalora_callbacks,
))
