"""VeRA: frozen random low-rank projections shared by all layers, with trainable per-layer scaling vectors
(Kopiczko et al. 2024).

ΔW = Λ_b·B·Λ_d·A with A (r×in) and B (out×r) random, frozen and shared (seeded by ``projection_prng_key``), and
trainable diagonals Λ_d (r, starts at d_initial) and Λ_b (out, starts at zero). Parameters per layer:
r + out_features. The paper's setting is r=256 with dropout 0.05 and its SFT learning rate of 2e-4 (VeRA's own
paper used far larger rates, which is worth knowing when reading the paper's VeRA row).
"""

from __future__ import annotations

from peft_arena.methods.common import DEFAULT_TARGETS, PEFT_GRPO_LR, PEFT_SFT_LR, TARGETS_HELP, parse_targets, wrap
from peft_arena.methods.registry import BuildContext, MethodSpec, register


def build_vera(model, options: dict, ctx: BuildContext):
    from peft import TaskType, VeraConfig

    config = VeraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options["r"],
        target_modules=parse_targets(options["target_modules"]),
        vera_dropout=options["dropout"],
        d_initial=options["d_initial"],
        projection_prng_key=options["projection_prng_key"],
        save_projection=True,  # the adapter then loads without regenerating A and B
    )
    return wrap(model, config)


register(MethodSpec(
    name="vera", family="vera",
    summary="VeRA: shared frozen random projections, trainable scaling vectors (Kopiczko et al. 2024)",
    defaults={"r": 256, "dropout": 0.05, "d_initial": 0.1, "projection_prng_key": 0,
              "target_modules": DEFAULT_TARGETS},
    option_help={
        "r": "rank of the shared random projections",
        "dropout": "dropout on the adapter's input",
        "d_initial": "initial value of the rank-side scaling vector Λ_d",
        "projection_prng_key": "seed of the shared random projections A and B",
        "target_modules": TARGETS_HELP,
    },
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_vera, label=lambda o: f"r{o['r']}",
))
