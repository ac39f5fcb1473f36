"""IA3: learned rescaling vectors on activations (Liu et al. 2022).

Attention projections get a learned per-output-channel scale; feed-forward modules (``down_proj``) a learned
per-input-channel scale. Vectors start at one (the model is unchanged at step 0). Parameters per block:
Σ out_features of the non-feed-forward layers + in_features of down_proj.

The paper built it with ``task_type=SEQ_CLS`` on a causal LM, apparently by slip; the adapter is the same, and
here it is a causal-LM adapter.
"""

from __future__ import annotations

import torch

from peft_arena.methods.common import DEFAULT_TARGETS, PEFT_GRPO_LR, PEFT_SFT_LR, TARGETS_HELP, parse_targets, wrap
from peft_arena.methods.registry import BuildContext, MethodError, MethodSpec, register


def build_ia3(model, options: dict, ctx: BuildContext):
    from peft import IA3Config, TaskType

    targets = parse_targets(options["target_modules"])
    if targets == "all-linear":
        # peft 0.21.2 turns "all-linear" into full module paths for IA3, and the saved config then fails its own
        # "feedforward_modules ⊆ target_modules" check on load; leaf names select the same layers and round-trip.
        head = model.get_output_embeddings()
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and module is not head})
    feedforward = parse_targets(options["feedforward_modules"])
    if isinstance(feedforward, str):
        raise MethodError("ia3: feedforward_modules must name modules (e.g. down_proj), not all-linear")
    if isinstance(targets, list) and not set(feedforward) <= set(targets):
        raise MethodError(f"ia3: feedforward_modules {feedforward} must be among target_modules {targets}")
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    return wrap(model, config)


register(MethodSpec(
    name="ia3", family="ia3",
    summary="IA3: learned per-channel rescaling of layer outputs (inputs for feed-forward) (Liu et al. 2022)",
    defaults={"target_modules": DEFAULT_TARGETS, "feedforward_modules": "down_proj"},
    option_help={
        "target_modules": TARGETS_HELP,
        "feedforward_modules": "modules whose input (not output) is rescaled, comma list",
    },
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_ia3, label=lambda o: "default",
))
