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

peft's own BOFT would not train a 7B model: each adapted layer holds its butterfly permutations as a dense
m×in×in float buffer (about 97 GB in fp32 for all-linear Qwen2.5-7B at m=2, filled one Python assignment per
feature) and every forward multiplies dense in×in matrices (in³ flops per factor, 18944³ for ``down_proj``). Here
layers are built and loaded inside :func:`peft_boft_layers`: no dense permutation buffer is allocated, and
:mod:`peft_arena.training.lean.boft` replaces peft's Linear forward, merge and unmerge with the same math on
index permutations (the rotation is block-diagonal with blocks of block_size·2^(m−1); the activations are rotated
by one batched block product; in training all layers' blocks are computed as one stack per layer shape). The
adapter's parameters, initialisation and saved file are peft's, so peft loads it. Merging and unmerging (promote,
spectral, TRL's weight sync to vLLM) rotate each weight by the same blocks (out·in·L flops instead of peft's
in²·out with a dense rotation). Training keeps one bf16 T×out tensor per adapted linear for the gradient of the
output scale s (as DoRA does).

The butterfly factors need a block-diagonal kernel. peft ships it as a CUDA extension compiled at first use and,
when that compilation fails (always on CPU), silently drops to m=1, i.e. plain OFT. Here peft's kernel slot holds
:class:`TorchBlockDiag`, the same operation in plain PyTorch (any device, exact, differentiable), so BOFT is BOFT
everywhere (peft looks for the kernel when it builds a layer; the lean forward does not need it); the builder also
checks every layer got the requested factors and block size.
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
    (``ops.load_trained``), else peft would build them with one butterfly factor and the weights would not fit
    (:func:`peft_boft_layers` does it)."""
    from peft.tuners.boft import layer as boft_layer

    if boft_layer._FBD_CUDA is None:
        boft_layer._FBD_CUDA = TorchBlockDiag()


class _TorchWithoutPermutationStack:
    """peft's BOFT layer file sees this as ``torch`` while layers are built: the dense (m, in, in) permutation stack
    ``boft_P`` becomes (m, 0, 0); everything else is torch itself."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], tuple) and len(args[0]) == 3 \
                and args[0][1] == args[0][2]:
            return torch.empty((args[0][0], 0, 0))
        return torch.empty(*args, **kwargs)


@contextlib.contextmanager
def peft_boft_layers():
    """peft builds (or loads) BOFT layers inside this: BOFT as BOFT (the block-diagonal kernel), the lean forward
    and merge of :mod:`peft_arena.training.lean.boft` installed, and no dense permutation matrices.

    peft fills a dense m×in×in float buffer per layer (``perm2mat``, one Python assignment per feature), ~97 GB
    for all-linear Qwen2.5-7B at m=2; the lean methods use index permutations computed from the layer's shape, so
    that buffer is neither allocated nor filled; :func:`drop_permutation_stacks` removes its empty stand-in after.
    """
    from peft.tuners.boft import BOFTLayer
    from peft.tuners.boft import layer as boft_layer

    from peft_arena.training.lean import boft as lean_boft

    install_block_diag_kernel()
    lean_boft.install()
    with mock.patch.object(boft_layer, "torch", _TorchWithoutPermutationStack()), \
            mock.patch.object(BOFTLayer, "block_butterfly_perm", lambda self, n, *args, **kwargs: None), \
            mock.patch.object(BOFTLayer, "perm2mat", lambda self, indices: torch.empty(0, 0)):
        yield


def drop_permutation_stacks(model) -> int:
    """Remove the empty ``boft_P`` stand-ins left by :func:`peft_boft_layers`; returns the layers seen.

    Raises if a layer holds a dense stack (peft changed how it builds it) or is not a linear layer (the lean
    forward covers ``boft.layer.Linear``; peft's Conv2d forward needs the dense stack)."""
    from peft.tuners.boft import BOFTLayer
    from peft.tuners.boft.layer import Linear

    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, BOFTLayer):
            continue
        if not isinstance(module, Linear):
            raise MethodError(f"boft: {name} is a {type(module).__name__}; the arena's BOFT adapts linear layers "
                              "only (choose linear target_modules)")
        stack = module._buffers.get("boft_P")
        if stack is not None and stack.numel():
            raise MethodError(f"boft: {name} holds a dense permutation stack of {tuple(stack.shape)}: this peft "
                              "version builds BOFT layers differently than peft_arena.methods.boft expects")
        module._buffers.pop("boft_P", None)
        n += 1
    return n


def build_boft(model, options: dict, ctx: BuildContext):
    from peft import BOFTConfig, TaskType
    from peft.tuners.boft import BOFTLayer

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
        with peft_boft_layers():  # also on the meta device (parameter counts): no permutation is computed
            peft_model = wrap(model, config)
    except MethodError:  # e.g. the model already carries an adapter: that message is the right one
        raise
    except ValueError as err:  # peft's divisibility checks name the layer size, not the fix
        raise MethodError(f"boft: block_size {block} with n_butterfly_factor {factors} does not fit this model "
                          f"({err}); every adapted input size must be divisible by block_size·2^(factors−1) = "
                          f"{block * 2 ** (factors - 1)}") from None
    drop_permutation_stacks(peft_model)
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
