"""MiSS (formerly Bone): one shared trainable shard per layer, tiled over the weight (Kang et al. 2024).

In the default ("standard") mode each layer gets D ∈ R^{r×out}, zero-initialised; the input is cut into chunks of
size r that are summed, then multiplied by D. Equivalently ΔW[:, j] = D[j mod r, :]ᵀ: a column-tiled update of
rank ≤ r with r·out_features parameters and no alpha. "bat" mixes the shard with the weight's own blocks
(needs in_features and out_features divisible by r); "mini" shrinks the shard to mini_r output rows.
The paper passed its LoRA dropout (0.05) as ``miss_dropout``.
"""

from __future__ import annotations

from peft_arena.methods.common import DEFAULT_TARGETS, PEFT_GRPO_LR, PEFT_SFT_LR, TARGETS_HELP, parse_targets, wrap
from peft_arena.methods.registry import BuildContext, MethodSpec, register

_INIT = {"standard": True, "bat": "bat", "mini": "mini"}


def build_miss(model, options: dict, ctx: BuildContext):
    from peft import MissConfig, TaskType

    config = MissConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options["r"],
        miss_dropout=options["dropout"],
        target_modules=parse_targets(options["target_modules"]),
        init_weights=_INIT[options["init"]],
        mini_r=options["mini_r"],
    )
    return wrap(model, config)


register(MethodSpec(
    name="miss", family="miss",
    summary="MiSS: a shared trainable r×out shard tiled over each weight (Kang et al. 2024, formerly Bone)",
    defaults={"r": 8, "dropout": 0.05, "init": "standard", "mini_r": 1, "target_modules": DEFAULT_TARGETS},
    option_help={
        "r": "shard size: the input is summed in chunks of r, the update has rank <= r",
        "dropout": "dropout on the adapter's input",
        "init": "standard (zero shard), bat (block-affine with the weight), mini (smaller shard)",
        "mini_r": "output rows of the shard in the mini mode",
        "target_modules": TARGETS_HELP,
    },
    choices={"init": list(_INIT)},
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_miss, label=lambda o: f"r{o['r']}",
))
