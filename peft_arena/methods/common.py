"""Pieces every method module shares: target-module parsing, the LoRA family's options, wrapping with peft.

Not a registry member: it registers nothing.
"""

from __future__ import annotations

import copy
from typing import Any

from peft_arena.methods.registry import MethodError

# The paper trains every linear layer of every block (q, k, v, o, gate, up, down), never lm_head: peft's
# "all-linear" selects exactly those for Llama/Qwen-style models.
DEFAULT_TARGETS = "all-linear"
TARGETS_HELP = 'modules to adapt: "all-linear" (q,k,v,o,gate,up,down; not lm_head) or a comma list of names'

# Options shared by every additive low-rank method (LoRA, DoRA, rsLoRA, LoRA+, PiSSA, MiLoRA, KeepLoRA), with the
# paper's run.py defaults: --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05.
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": DEFAULT_TARGETS}
LORA_HELP: dict[str, str] = {
    "r": "rank of the update B·A",
    "alpha": "scaling numerator: the update is (alpha / r)·B·A",
    "dropout": "dropout on the adapter's input (LoRA dropout)",
    "target_modules": TARGETS_HELP,
}

# The paper's learning rates (run.py resolve_train_lr): SFT 2e-4 for every adapter, GRPO 1e-5 for every PEFT.
PEFT_SFT_LR = 2e-4
PEFT_GRPO_LR = 1e-5


def parse_targets(value: str | list[str]) -> str | list[str]:
    """ "all-linear" stays a string (peft resolves it per model); "q_proj,v_proj" becomes a list."""
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value if str(v).strip()]
    else:
        if value.strip() == "all-linear":
            return "all-linear"
        names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise MethodError('target_modules is empty: give "all-linear" or a comma list such as "q_proj,v_proj"')
    return names


def lora_label(options: dict) -> str:
    return f"r{options['r']}a{options['alpha']}"


def wrap(model, peft_config):
    """``get_peft_model`` with the arena's invariants: a causal-LM task and one adapter named "default"."""
    from peft import get_peft_model

    if getattr(model, "peft_config", None):
        raise MethodError("the model already carries a PEFT adapter; build methods on a plain base model")
    return get_peft_model(model, peft_config)


def remember_initial_adapter(peft_model) -> None:
    """Keep a copy of the adapter as initialised, for methods that also rewrite the base weights (PiSSA, MiLoRA).

    Such an adapter only makes sense on the residual base it was trained against. At save time
    :func:`peft_arena.methods.ops.save_trained` hands this copy to peft's
    ``path_initial_model_for_weight_conversion``, which turns the trained adapter into a plain LoRA of rank 2r
    (ΔW = B·A − B₀·A₀) that loads on the original base.
    """
    from peft import get_peft_model_state_dict

    config = copy.deepcopy(peft_model.peft_config["default"])
    config.init_lora_weights = True  # peft requires this on the initial copy (else it subtracts the init twice)
    state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model._arena_initial_adapter = (config, state)


def lora_layers(peft_model):
    """(name, layer) of every LoRA-wrapped linear layer."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
