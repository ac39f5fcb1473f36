"""Full finetuning: every weight trains; no adapter. The arena's plasticity ceiling and stability floor.

The paper's trainable count for full FT (6.53B for Qwen2.5-7B's 7.61B) leaves out the embedding and output
matrices; that is a way of counting, not of training: its trainer updated every parameter. ``count_params``
reports the embedding share separately so both figures are at hand.
"""

from __future__ import annotations

from peft_arena.methods.registry import BuildContext, MethodSpec, register


def build_full(model, options: dict, ctx: BuildContext):
    model.requires_grad_(True)
    if not options["train_embeddings"]:
        model.get_input_embeddings().requires_grad_(False)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().requires_grad_(False)
    return model


register(MethodSpec(
    name="full", family="full",
    summary="Full finetuning: all weights train, no adapter",
    defaults={"train_embeddings": True},
    option_help={"train_embeddings": "also train the input embeddings and the LM head (false freezes both)"},
    # SFT: the paper's example recipe (configs/train) uses 5e-5 for full FT; its run.py default of 2e-4 for every
    # method is a PEFT learning rate. GRPO: run.py's 1e-6 for full FT.
    sft_lr=5e-5, grpo_lr=1e-6, build=build_full, label=lambda o: "all" if o["train_embeddings"] else "noemb",
))
