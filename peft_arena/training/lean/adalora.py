"""AdaLoRA (Zhang et al. 2023) without T×out temporaries and per-tensor loops: the same math as peft's ``SVDLinear``
forward and ``RankAllocator``.

peft's ``SVDLinear`` adds ``(dropout(x) @ (A ⊙ E)ᵀ @ Bᵀ) * scaling / (ranknum + 1e-5)`` to the base output:

* ``* scaling`` and ``/ ranknum`` are two more passes over the T×out product, and ``ranknum`` is a 1-element fp32
  tensor (not a 0-dim one), so on a bf16 base the quotient is a T×out **fp32** tensor added into the bf16 result;
* when ``ranknum`` requires a gradient (peft's fp32 upcast of the adapter on a bf16 base re-registers it as a
  trainable Parameter; ``methods/adalora.py`` freezes it again), the division also keeps the T×out product for the
  backward pass and reduces a T×out fp32 product into ranknum's gradient, for every adapted linear.

Here ``scaling / (ranknum + 1e-5)`` (computed once while ranknum is constant) multiplies the r×in factor
``A ⊙ E`` (the same product regrouped), and the low-rank term is added into the base output by the GEMM itself
(``addmm_`` with β = 1: one read and one write of the T×out result, where a matmul and an add make four passes).
The backward keeps the T×r product only, as LoRA does.

peft's ``AdaLoraModel.forward`` computes the orthogonality regulariser whenever the output has a loss, even with
``orth_reg_weight = 0`` (the arena's setting: its callback adds the regulariser once per optimizer step), where it
adds ``0 · penalty``: here a zero weight skips it.

peft's ``RankAllocator`` (``update_and_allocate``, after every optimizer step):

* ``update_ipt`` runs ten elementwise ops per adapter tensor (3 tensors per adapted linear: 588 tensors, ~5,900
  kernels for a 7B model) every step: here the same ops, in the same order, run as ``torch._foreach_*`` ops over
  all tensors at once (bitwise the same scores);
* ``mask_to_budget`` (every ``deltaT`` steps) reads the threshold with ``.item()`` and each layer's mask with
  ``.tolist()``: one host-device synchronisation per adapted linear. Here the threshold stays on the device and
  all masks come back in one transfer;
* ``mask_using_rank_pattern`` (every step of the final ``tfinal`` phase) builds each layer's mask from a Python
  list and copies it to the device, a synchronising copy per adapted linear and step. Here the masks are built
  once per rank pattern and kept on the device.

Masks, rank patterns and the scores they come from are the same as peft's (tests compare them after several
reallocations). Quantised SVD layers and DeepSpeed's partitioned gradients keep peft's code.
"""

from __future__ import annotations

import torch

from peft_arena.training.lean import patching

_ORIGINAL: dict = {}


# ------------------------------------------------------------------------------------------------------ forward
def _lean_applies(result: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether the low-rank term can be added into ``result`` in ``result``'s dtype: under autocast (the adapter
    matmul's dtype is the autocast dtype, which the base layer's output already has) or with one dtype throughout.
    Otherwise (fp32 adapters on a bf16 base without autocast) peft's promoting in-place add is kept."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return result.dtype == torch.get_autocast_dtype(device)
    return result.dtype == x.dtype == lora_A.dtype == lora_B.dtype


def _scale(layer, adapter: str) -> torch.Tensor:
    """``scaling / (ranknum + 1e-5)`` as a 1-element tensor (no host sync), computed once while ranknum is constant."""
    ranknum, scaling = layer.ranknum[adapter], layer.scaling[adapter]
    if ranknum.requires_grad or torch.compiler.is_compiling():  # a trainable ranknum needs the graph; a compiled
        return scaling / (ranknum + 1e-5)  # layer folds the constant itself
    key = (ranknum.data_ptr(), ranknum._version, ranknum.device, scaling)
    cache = layer.__dict__.setdefault("_lean_scale", {})
    hit = cache.get(adapter)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[adapter] = (key, scaling / (ranknum + 1e-5))
    return hit[1]


def _svd_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``SVDLinear.forward`` with scaling/ranknum folded into the r×in factor and the low-rank term added
    into the base output by the GEMM itself (``addmm_``: one read and one write of the T×out result)."""
    active = [a for a in self.active_adapters if a in self.lora_A.keys()]
    if (self.disable_adapters or self.merged or not active or x.dim() < 2
            or not isinstance(self.base_layer, torch.nn.Linear)):
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # 2-D, so that the in-place add below is not on a view of the result
    result = self.base_layer(x, *args, **kwargs)
    for active_adapter in active:
        lora_A = self.lora_A[active_adapter]
        lora_B = self.lora_B[active_adapter]
        lora_E = self.lora_E[active_adapter]
        dropout = self.lora_dropout[active_adapter]
        x = self._cast_input_dtype(x, lora_A.dtype)
        if not _lean_applies(result, x, lora_A, lora_B):
            result += (dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * self.scaling[active_adapter] \
                / (self.ranknum[active_adapter] + 1e-5)  # peft's line
            continue
        factor = (lora_A * lora_E) * _scale(self, active_adapter)  # r×in: (A ⊙ E)·scaling/ranknum
        low = dropout(x) @ factor.T  # T×r, in result's dtype (autocast's matmul, or one dtype throughout)
        result.addmm_(low, lora_B.T.to(result.dtype))  # the cast autocast would make of the fp32 Q
    return result.view(*lead, result.shape[-1])


def _adalora_model_forward(self, *args, **kwargs):
    """peft's ``AdaLoraModel.forward`` without its regulariser when ``orth_reg_weight`` is 0: peft still builds all
    P/Q Gram matrices and norms then (a Python loop over every parameter and ~2,000 kernels per forward on a 7B
    model) to add ``0 · penalty`` to ``outputs.loss``. The arena always builds with weight 0: its callback owns the
    regulariser (``methods/adalora.py``)."""
    adapter = getattr(self, "trainable_adapter_name", None)
    if adapter is not None and self.peft_config[adapter].orth_reg_weight == 0:
        return self.model.forward(*args, **kwargs)
    return _ORIGINAL["model_forward"](self, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ rank allocator
def _deepspeed() -> bool:
    from peft.tuners.adalora.layer import deepspeed_config

    return deepspeed_config() is not None


@torch.no_grad()
def _update_ipt(self, model) -> None:
    """peft's ``RankAllocator.update_ipt`` as ``_foreach`` ops: the same elementwise operations in the same order."""
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and self.adapter_name in n]
    if not named or _deepspeed() or any(p.grad is None for _, p in named):
        return _ORIGINAL["update_ipt"](self, model)  # peft's loop (and its error for a missing gradient)
    for n, p in named:
        if n not in self.ipt:
            self.ipt[n] = torch.zeros_like(p)
            self.exp_avg_ipt[n] = torch.zeros_like(p)
            self.exp_avg_unc[n] = torch.zeros_like(p)
    params = [p.detach() for _, p in named]
    ipt = torch._foreach_mul(params, [p.grad for _, p in named])  # (p * p.grad).abs()
    torch._foreach_abs_(ipt)
    avg = [self.exp_avg_ipt[n] for n, _ in named]
    unc = [self.exp_avg_unc[n] for n, _ in named]
    # exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt   (in place: the dicts own these tensors)
    torch._foreach_mul_(avg, self.beta1)
    torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - self.beta1))
    # exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - exp_avg_ipt).abs()
    dev = torch._foreach_sub(ipt, avg)
    torch._foreach_abs_(dev)
    torch._foreach_mul_(dev, 1 - self.beta2)
    torch._foreach_mul_(unc, self.beta2)
    torch._foreach_add_(unc, dev)
    for (n, _), i in zip(named, ipt):
        self.ipt[n] = i


@torch.no_grad()
def _mask_to_budget(self, model, budget):
    """peft's ``RankAllocator.mask_to_budget`` (the same scores, threshold and masks) with one device-to-host
    transfer: the threshold stays a device tensor and all layers' masks come back together."""
    value_ipt, vector_ipt, triplet_ipt = {}, {}, {}
    e_params = []
    for n, p in model.named_parameters():  # peft's scores, op for op
        if f"lora_A.{self.adapter_name}" in n:
            comb_ipt = torch.mean(self._element_score(n), dim=1, keepdim=True)
            vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(comb_ipt)
        if f"lora_B.{self.adapter_name}" in n:
            comb_ipt = torch.mean(self._element_score(n), dim=0, keepdim=False).view(-1, 1)
            vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(comb_ipt)
        if f"lora_E.{self.adapter_name}" in n:
            value_ipt[n.replace("lora_E", "%s")] = self._element_score(n)
            e_params.append((n, p))
    all_score = []
    for name_m in vector_ipt:
        sum_ipt = self._combine_ipt(value_ipt[name_m], torch.cat(vector_ipt[name_m], dim=1))
        triplet_ipt[name_m % "lora_E"] = sum_ipt.view(-1, 1)
        all_score.append(sum_ipt.view(-1))
    # peft compares with ``kthvalue(...)[0].item()``: the same fp32 value, kept on the device
    mask_threshold = torch.kthvalue(torch.cat(all_score), k=self.init_bgt - budget)[0]
    pruned = [triplet_ipt[n] <= mask_threshold for n, _ in e_params]
    for (_, p), prune in zip(e_params, pruned):
        p.masked_fill_(prune, 0.0)
    if not pruned:
        return {}
    keep = torch.cat([(~prune).view(-1) for prune in pruned]).tolist()  # the one synchronisation
    rank_pattern, start = {}, 0
    for (n, _), prune in zip(e_params, pruned):
        rank_pattern[n] = keep[start:start + prune.numel()]
        start += prune.numel()
    return rank_pattern


def _pattern_key(rank_pattern: dict) -> dict:
    return {k: [bool(x) for x in (v.view(-1).tolist() if isinstance(v, torch.Tensor) else v)]
            for k, v in rank_pattern.items()}


@torch.no_grad()
def _mask_using_rank_pattern(self, model, rank_pattern):
    """peft's ``RankAllocator.mask_using_rank_pattern`` with the device masks built once per rank pattern."""
    key = _pattern_key(rank_pattern)
    cached = getattr(self, "_lean_masks", None)
    if cached is None or cached[0] != key:
        truncated = self.adapter_name not in next(iter(rank_pattern.keys()))
        masks = {}
        for n, p in model.named_parameters():
            if f"lora_E.{self.adapter_name}" in n:
                k = n if not truncated else n.replace(f".{self.adapter_name}", "")
                masks[n] = ~torch.tensor(key[k], dtype=torch.float32).unsqueeze(-1).bool().to(p.device)
        cached = self._lean_masks = (key, masks)
    masks = cached[1]
    for n, p in model.named_parameters():
        if f"lora_E.{self.adapter_name}" in n:
            p.masked_fill_(masks[n], 0.0)


def _replacements() -> dict:
    from peft.tuners.adalora.layer import RankAllocator, SVDLinear
    from peft.tuners.adalora.model import AdaLoraModel

    return {"forward": (SVDLinear, "forward", _svd_linear_forward),
            "model_forward": (AdaLoraModel, "forward", _adalora_model_forward),
            "update_ipt": (RankAllocator, "update_ipt", _update_ipt),
            "mask_to_budget": (RankAllocator, "mask_to_budget", _mask_to_budget),
            "mask_using_rank_pattern": (RankAllocator, "mask_using_rank_pattern", _mask_using_rank_pattern)}


def install() -> None:
    """Patch peft's AdaLoRA forward and rank allocator (``_ORIGINAL`` keeps peft's)."""
    patching.patch(_ORIGINAL, _replacements())


def uninstall() -> None:
    """peft's code back (tests)."""
    patching.restore(_replacements())
