"""OFT: a learned block-diagonal orthogonal rotation of each weight's input side (Qiu et al. 2023; peft's OFTv2).

W' = W·R with R = diag(R_1, …, R_b), each R_i = Cayley(Q_i) = (I + Q_i)(I − Q_i)⁻¹ for a skew-symmetric Q_i of
size block_size. Q_i starts at zero (R = I). A rotation keeps the angles between W's rows, which is the paper's
explanation of OFT's stability. Trainable parameters per layer: in_features·(block_size − 1)/2.

As in the paper, peft's defaults apply besides the block size (the Cayley–Neumann series approximates the
inverse). The paper's ``OFTV3Config(normalize_rotation=…)`` comes from a peft fork that was never published and is
not offered here.
"""

from __future__ import annotations

from peft_arena.methods.common import DEFAULT_TARGETS, PEFT_GRPO_LR, PEFT_SFT_LR, TARGETS_HELP, parse_targets, wrap
from peft_arena.methods.registry import BuildContext, MethodError, MethodSpec, register


def build_oft(model, options: dict, ctx: BuildContext):
    from peft import OFTConfig, TaskType
    from peft.tuners.oft import OFTLayer

    config = OFTConfig(
        task_type=TaskType.CAUSAL_LM,
        r=0,  # the number of blocks follows from oft_block_size
        oft_block_size=options["block_size"],
        target_modules=parse_targets(options["target_modules"]),
        module_dropout=options["module_dropout"],
        coft=options["coft"],
        eps=options["eps"],
        block_share=options["block_share"],
        use_cayley_neumann=options["use_cayley_neumann"],
        num_cayley_neumann_terms=options["num_cayley_neumann_terms"],
    )
    peft_model = wrap(model, config)
    # peft quietly shrinks a block size that does not divide in_features; a run labelled b32 must be b32.
    for name, module in peft_model.named_modules():
        if isinstance(module, OFTLayer) and module.oft_block_size.get("default") != options["block_size"]:
            raise MethodError(f"oft: block_size {options['block_size']} does not divide the input size "
                              f"{module.in_features} of {name}; pick a divisor of every adapted layer's input")
    return peft_model


register(MethodSpec(
    name="oft", family="oft",
    summary="OFT: block-diagonal orthogonal (Cayley) rotation of each weight's input side (Qiu et al. 2023)",
    defaults={"block_size": 32, "target_modules": DEFAULT_TARGETS, "module_dropout": 0.0, "coft": False,
              "eps": 6e-5, "block_share": False, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5},
    option_help={
        "block_size": "size of each orthogonal block (the paper's headline b32; b16/b64/b128 in its sweep)",
        "target_modules": TARGETS_HELP,
        "module_dropout": "probability of dropping a whole block's rotation during training (multiplicative dropout)",
        "coft": "constrained OFT: keep each Q within eps of zero",
        "eps": "COFT's radius (used only with coft)",
        "block_share": "one rotation shared by all blocks of a layer",
        "use_cayley_neumann": "approximate the Cayley inverse with a Neumann series (peft's default)",
        "num_cayley_neumann_terms": "terms of that series",
    },
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_oft, label=lambda o: f"b{o['block_size']}",
))
