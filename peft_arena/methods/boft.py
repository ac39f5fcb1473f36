"""BOFT: orthogonal finetuning with a butterfly-factorised rotation (Liu et al. 2024, "Parameter-Efficient
Orthogonal Finetuning via Butterfly Factorization"); peft's ``BOFTConfig``.

W' = (R·Wᵀ)ᵀ·diag(s) with R = B_m ··· B_1, each butterfly factor B_i = P_i·diag(R_i1, …, R_iD)·P_iᵀ a block-diagonal
Cayley rotation (blocks of ``block_size``) conjugated by the i-th butterfly permutation, so that m factors mix
inputs block_size·2^(m−1) apart: a dense rotation from sparse factors, as the FFT builds a dense transform.
R starts at the identity and the per-output scale s at one (the model is unchanged at step 0).
``n_butterfly_factor=1`` is block-diagonal OFT (with an exact Cayley inverse and the scale s).

Trainable parameters per layer: m·in_features·block_size (peft stores each block as a full b×b matrix and
skew-symmetrises it in the forward pass) + out_features (s).

Defaults: ``block_size=8, n_butterfly_factor=2``. Each layer's input must be divisible by block_size·2^(m−1) = 16:
true for all seven projections of Llama/Qwen-style models (Qwen2.5-7B: 3584 and 18944; Llama-3.2-3B: 3072 and
8192), and the budget is close to the paper's LoRA r8 and OFT b32 rows (Qwen2.5-7B: 19.51M vs 20.19M and 17.55M).
The paper's code offers no BOFT; like ``oft`` it keeps peft's defaults otherwise (no multiplicative dropout).
Other divisor-safe settings for these models: block_size 4/8/16/32 with m ≤ 4 (block_size·2^(m−1) ≤ 128 divides
3584 = 2⁹·7, 18944 = 2⁸·74 and 3072 = 2¹⁰·3).

peft's memory caveat, worth knowing before a 7B run: each adapted layer holds its butterfly permutations as a dense
m×in×in float buffer, about 97 GB in fp32 for all-linear Qwen2.5-7B at m=2 (≈3 GB per down_proj).

The butterfly factors need a block-diagonal kernel. peft ships it as a CUDA extension compiled at first use and,
when that compilation fails (always on CPU), silently drops to m=1, i.e. plain OFT. Here peft's kernel slot holds
:class:`TorchBlockDiag`, the same operation in plain PyTorch (any device, exact, differentiable), so BOFT is BOFT
everywhere; the builder also checks every layer got the requested factors and block size.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from peft_arena.methods.common import DEFAULT_TARGETS, PEFT_GRPO_LR, PEFT_SFT_LR, TARGETS_HELP, parse_targets, wrap
from peft_arena.methods.registry import BuildContext, MethodError, MethodSpec, register


class TorchBlockDiag:
    """peft's ``fbd_cuda`` interface (``forward(blocks)[0]``, ``backward(grad, blocks)[0]``) in plain PyTorch.

    forward: (N, D, H, H) blocks -> (N, D·H, D·H) block-diagonal matrices. backward: the diagonal blocks of the
    incoming gradient, which is the exact gradient of that scatter.
    """

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = blocks.shape
        out = blocks.new_zeros(n, d * h, d * h)
        diag = torch.arange(d, device=blocks.device)
        # out viewed as (N, D, H, D, H): block (i, i) of every matrix; advanced indices put the D axis first
        out.view(n, d, h, d, h)[:, diag, :, diag, :] = blocks.transpose(0, 1)
        return [out]

    @staticmethod
    def backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = blocks.shape
        diag = torch.arange(d, device=grad_output.device)
        return [grad_output.reshape(n, d, h, d, h)[:, diag, :, diag, :].transpose(0, 1).contiguous()]


def install_block_diag_kernel() -> None:
    """Fill peft's kernel slot unless a compiled extension already sits there (then peft uses it as usual).

    Needed before peft creates BOFT layers: when building (here) and when loading a saved BOFT adapter
    (``ops.load_trained``), else peft would build them with one butterfly factor and the weights would not fit."""
    from peft.tuners.boft import layer as boft_layer

    if boft_layer._FBD_CUDA is None:
        boft_layer._FBD_CUDA = TorchBlockDiag()


@contextlib.contextmanager
def _shapes_only_permutations():
    """For meta-device builds (parameter counts): peft computes the butterfly permutations with ``.item()`` calls
    that meta tensors cannot answer. They fill a non-persistent buffer, not a parameter, so an unfilled buffer of
    the right shape leaves every count unchanged; peft's own divisibility checks still run before."""
    from peft.tuners.boft import BOFTLayer

    with mock.patch.object(BOFTLayer, "block_butterfly_perm", lambda self, n, *args, **kwargs: torch.arange(n)), \
            mock.patch.object(BOFTLayer, "perm2mat", lambda self, indices: torch.empty(len(indices), len(indices))):
        yield


def build_boft(model, options: dict, ctx: BuildContext):
    from peft import BOFTConfig, TaskType
    from peft.tuners.boft import BOFTLayer

    install_block_diag_kernel()
    block, factors = options["block_size"], options["n_butterfly_factor"]
    if block < 1 or factors < 1:
        raise MethodError(f"boft: block_size ({block}) and n_butterfly_factor ({factors}) must be positive")
    config = BOFTConfig(
        task_type=TaskType.CAUSAL_LM,
        boft_block_size=block,
        boft_n_butterfly_factor=factors,
        boft_dropout=options["dropout"],
        target_modules=parse_targets(options["target_modules"]),
        bias="none",
    )
    try:
        with _shapes_only_permutations() if ctx.structure_only else contextlib.nullcontext():
            peft_model = wrap(model, config)
    except MethodError:  # e.g. the model already carries an adapter: that message is the right one
        raise
    except ValueError as err:  # peft's divisibility checks name the layer size, not the fix
        raise MethodError(f"boft: block_size {block} with n_butterfly_factor {factors} does not fit this model "
                          f"({err}); every adapted input size must be divisible by block_size·2^(factors−1) = "
                          f"{block * 2 ** (factors - 1)}") from None
    for name, module in peft_model.named_modules():
        if isinstance(module, BOFTLayer):
            got = tuple(module.boft_R["default"].shape[i] for i in (0, 2))
            if got != (factors, block):  # never a silently different method under the same name
                raise MethodError(f"boft: {name} got {got[0]} butterfly factors of block size {got[1]} instead of "
                                  f"{factors} of {block}")
    return peft_model


register(MethodSpec(
    name="boft", family="oft",
    summary="BOFT: orthogonal finetuning with a butterfly-factorised block rotation (Liu et al. 2024)",
    defaults={"block_size": 8, "n_butterfly_factor": 2, "dropout": 0.0, "target_modules": DEFAULT_TARGETS},
    option_help={
        "block_size": "size of each orthogonal block of every butterfly factor",
        "n_butterfly_factor": "number of butterfly factors m (1 is block-diagonal OFT); inputs must divide by "
                              "block_size·2^(m−1)",
        "dropout": "multiplicative dropout: probability of setting a block to the identity during training",
        "target_modules": TARGETS_HELP,
    },
    sft_lr=PEFT_SFT_LR, grpo_lr=PEFT_GRPO_LR, build=build_boft,
    label=lambda o: f"b{o['block_size']}m{o['n_butterfly_factor']}",
))
