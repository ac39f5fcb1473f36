"""BOFT (Liu et al. 2024) without dense permutation matrices: the same math as peft's ``boft.layer.Linear``.

peft's BOFT forward, per adapted linear and per step, builds the rotation as dense in×in matrices: each butterfly
factor ``P_i·blockdiag(Q_i)·P_iᵀ`` by two bmm's with the layer's dense permutation stack ``boft_P`` (m×in×in,
≈3 GB in fp32 for a 7B ``down_proj``, copied to the activations' device and dtype on every call), the product of
the factors (in³ flops each: 18944³ for ``down_proj``), then ``x @ R`` (T·in² flops) and a T×out fp32 scaling.

Here the permutations are index vectors (peft's ``block_butterfly_perm``, computed in closed form and cached per
shape) and never a matrix:

* every factor mixes inputs only inside aligned chunks of ``block_size·2^i`` features, so the whole rotation
  R = B_m···B_1 is block-diagonal with blocks of L = block_size·2^(m−1) (16 at the defaults). Its D' = in/L blocks
  are computed exactly by pushing an in×L matrix holding one identity per chunk through the transposed factors
  (row gathers and b×b block products: L·in·b flops per factor; autograd back to the Cayley blocks, computed as
  peft's ``cayley_batch`` does, with peft's multiplicative dropout applied to them as peft does);
* the activations are rotated by one batched product with those blocks (``x_d·R_d`` per chunk d: T·in·L flops, one
  pass over T×in), by :class:`_BlockRotate`, whose backward gives dx and the blocks' gradient as two more batched
  products. Blocks are grouped into block-diagonal ``GROUP_WIDTH``-wide tiles (exact zeros elsewhere) so that each
  row segment the GEMM reads is at least 128 bytes in bf16; the extra flops are free in a memory-bound product;
* in training (:func:`prepare`, called by ``lean.prepare``) the Cayley transforms and factor chains of all layers
  of one shape run as one stack at the start of each forward of the model (two stacks for all-linear Qwen2.5-7B
  instead of ~45 tiny kernels per layer, forward and backward); layers called otherwise compute their own;
* the base matmul runs without its bias, and ``y = s ⊙ z + bias`` (peft: ``(base(x_rot) − bias)·s + bias``) is
  written in the activations' dtype by :class:`_ScaleShift` (s as s − 1 in that dtype, fp32 arithmetic inside
  the kernel), which keeps the T×out product ``z`` for the gradient of ``s``.

``merge`` / ``unmerge`` (promote, spectral, and TRL's weight sync to vLLM in GRPO, which merges and unmerges every
sync) rotate the weight by the same blocks: W·Rᵀ·diag(s) as out·in·L flops, where peft multiplies by a dense in×in
rotation (in²·out: ~100 TFLOP per merge of all-linear Qwen2.5-7B). ``get_delta_weight`` still returns peft's dense
in×in rotation (assembled from the blocks) for anyone who asks for it. In fp32 everything here computes what peft
computes (tests compare the loss, every gradient and the merged weights). Conv2d layers keep peft's forward.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_arena.training.lean import patching

GROUP_WIDTH = 64  # features per rotation tile of the activation GEMM (a multiple of the butterfly block L)

_ORIGINAL: dict = {}


@functools.lru_cache(maxsize=None)
def butterfly_perm(n: int, block_num: int, block_size: int, n_factors: int, i: int) -> torch.Tensor:
    """peft's ``block_butterfly_perm(n, block_num // 2**i, block_size // 2, n_factors − 1)`` in closed form.

    peft reorders, inside each chunk of ``n / (block_num / 2^i) = block_size·2^i`` features, the groups of
    ``block_size / 2`` features: even groups first, then odd ones; i.e. a chunk viewed as (2^i, 2, block_size/2)
    read in (2, 2^i, block_size/2) order. One factor (plain OFT) has the identity.
    """
    if n_factors == 1:
        return torch.arange(n)
    chunks, half = int(block_num / 2 ** i), int(block_size / 2)
    pairs = (n // chunks) // (2 * half)
    if chunks * pairs * 2 * half != n:
        raise ValueError(f"BOFT shape n={n}, block_num={block_num}, block_size={block_size}, factor {i} is not a "
                         "butterfly peft builds")
    return torch.arange(n).view(chunks, pairs, 2, half).permute(0, 2, 1, 3).reshape(n)


@functools.lru_cache(maxsize=None)
def _gathers(n: int, block_num: int, block_size: int, n_factors: int, device: torch.device) -> tuple:
    """Per factor (perm, inverse perm) on ``device``, or None where peft's permutation is the identity. Cached, so
    made as normal tensors also when first asked for under ``torch.inference_mode`` (autograd saves them later)."""
    with torch.inference_mode(False):
        return _make_gathers(n, block_num, block_size, n_factors, device)


def _make_gathers(n, block_num, block_size, n_factors, device) -> tuple:
    out = []
    for i in range(n_factors):
        perm = butterfly_perm(n, block_num, block_size, n_factors, i)
        if torch.equal(perm, torch.arange(n)):
            out.append(None)
        else:
            out.append((perm.to(device), torch.argsort(perm).to(device)))
    return tuple(out)


def cayley_batch(data: torch.Tensor) -> torch.Tensor:
    """peft's ``BOFTLayer.cayley_batch``, Q = (I − S)(I + S)⁻¹ with S = (R − Rᵀ)/2, through ``solve_ex``.

    ``torch.linalg.solve`` copies its error flag to the host to raise on a singular matrix: a device sync per layer
    and step. I + S is never singular for a real skew-symmetric S (its eigenvalues are 1 + iλ), so the check is
    skipped; the arithmetic is the same LU solve."""
    b, r, c = data.shape
    skew_mat = 0.5 * (data - data.transpose(1, 2))
    id_mat = torch.eye(r, device=data.device).unsqueeze(0).expand(b, r, c)
    q, _ = torch.linalg.solve_ex(id_mat + skew_mat, id_mat - skew_mat, left=False, check_errors=False)
    return q.to(data.dtype)


def rotation_blocks(module, adapter: str, dropout: bool = True) -> torch.Tensor:
    """R's diagonal blocks, (in / L, L, L), in the adapter's dtype: block d is R[dL:(d+1)L, dL:(d+1)L].

    R = M_{m−1}···M_0 with M_i = P_i·blockdiag(Q_i)·P_iᵀ as peft builds it (x_rot = x @ R), Q = peft's Cayley
    transform of ``boft_R`` (:func:`cayley_batch`; then ``boft_dropout`` when ``dropout``). Differentiable."""
    drop = module.boft_dropout[adapter] if dropout else None
    return stacked_rotation_blocks(module.boft_R[adapter].unsqueeze(0), drop)[0]


def stacked_rotation_blocks(boft_R: torch.Tensor, dropout=None) -> torch.Tensor:
    """:func:`rotation_blocks` of k same-shaped layers at once: ``boft_R`` (k, m, D, b, b) -> (k, in / L, L, L).

    Computed as Z = Rᵀ·Z0 with Z0 = one L×L identity per chunk stacked (in × L): M_iᵀ = P_i·blockdiag(Q_iᵀ)·P_iᵀ
    is a row gather, a batched b×b product on the rows' blocks, and a row gather; then R's block d is Z's d-th
    L×L block, transposed. Outside autocast (the tensors are small; peft's bf16 products of dense factors round
    more). ``dropout`` (peft's multiplicative dropout of one layer, k = 1) acts on the Cayley blocks as in peft."""
    with torch.autocast(boft_R.device.type, enabled=False):
        k, m, d, h, _ = boft_R.shape
        q = cayley_batch(boft_R.reshape(k * m * d, h, h)).view(k, m, d, h, h)
        if dropout is not None:
            if k != 1:
                raise ValueError("BOFT's multiplicative dropout draws per layer: stack one layer at a time")
            q = dropout(q[0]).unsqueeze(0)
        n, width = d * h, h * 2 ** (m - 1)
        gathers = _gathers(n, d, h, m, q.device)
        z = _identities(n, width, q.device, q.dtype).expand(k, n, width)
        factors = q.unbind(1)
        for i in reversed(range(m)):  # Rᵀ = M_0ᵀ···M_{m−1}ᵀ: M_{m−1}ᵀ acts first
            if gathers[i] is not None:
                z = _Gather.apply(z, gathers[i][1], gathers[i][0])  # P_iᵀ·z: row j takes row perm⁻¹[j]
            z = torch.bmm(factors[i].reshape(k * d, h, h).transpose(1, 2), z.reshape(k * d, h, width))
            z = z.view(k, n, width)
            if gathers[i] is not None:
                z = _Gather.apply(z, gathers[i][0], gathers[i][1])  # P_i·z: row j takes row perm[j]
        return z.view(k, n // width, width, width).transpose(-1, -2)


@functools.lru_cache(maxsize=None)
def _identities(n: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: a normal tensor even when first asked for in inference mode
        return torch.eye(width, device=device, dtype=dtype).repeat(n // width, 1)


class _Gather(torch.autograd.Function):
    """Rows (dim −2) of z in the order ``index``, a permutation; the gradient gathers by the inverse (no scatter)."""

    @staticmethod
    def forward(ctx, z, index, inverse):
        ctx.save_for_backward(inverse)
        return z.index_select(-2, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(-2, inverse) if ctx.needs_input_grad[0] else None, None, None


# ------------------------------------------------------------------------ all layers' blocks at once (training)
# Per layer, the Cayley transform and the factor chain are ~45 tiny kernels (forward and backward): ~9,000 per
# step at 7B, each a few µs of GPU time and more of CPU dispatch. :func:`prepare` computes them for all layers of a
# shape at the start of every forward of the model (two stacks for all-linear Qwen2.5-7B), before any checkpointed
# region, so recomputation under gradient checkpointing finds the same tensors. A layer uses its precomputed blocks
# only while they are current: same parameter object, version (an optimizer step bumps it) and storage, same grad
# mode. Blocks made without grad (generation, evaluation) are kept across forwards until the parameters change.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> {adapter: (blocks, param, ...)}
_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> hook handle
_REENTRANT = {"seen": False}
_IN_FORWARD = {"depth": 0}  # prepared models' forwards running


def _current(entry, param) -> bool:
    blocks, owner, version, ptr, grad = entry
    return owner is param and version == param._version and ptr == param.data_ptr() and grad == torch.is_grad_enabled()


def _cached_blocks(layer, adapter: str):
    entry = _CACHE.get(layer, {}).get(adapter)
    if entry is None or _REENTRANT["seen"]:
        return None
    param = layer.boft_R[adapter]
    if _current(entry, param):
        return entry[0]
    if (entry[4] and _IN_FORWARD["depth"] and not torch.is_grad_enabled() and layer.training
            and _current(entry[:4] + (False,), param)):
        # a training layer called without grad inside a prepared model's forward with grad: reentrant
        # checkpointing, whose recomputation would run the shared stack's backward once per layer. Per-layer
        # blocks from now on.
        _REENTRANT["seen"] = True
    return None


def _store(layer, adapter: str, blocks: torch.Tensor, param) -> None:
    _CACHE.setdefault(layer, {})[adapter] = (blocks, param, param._version, param.data_ptr(), torch.is_grad_enabled())


def _layer_blocks(layer, adapter: str) -> torch.Tensor:
    """The layer's blocks: precomputed ones while current, else computed here (and kept when no graph is recorded
    and no dropout draws: generation reuses them until the parameters change)."""
    blocks = _cached_blocks(layer, adapter)
    if blocks is None:
        blocks = rotation_blocks(layer, adapter)
        drop = layer.boft_dropout[adapter]
        if not torch.is_grad_enabled() and (isinstance(drop, nn.Identity) or not drop.training):
            _store(layer, adapter, blocks, layer.boft_R[adapter])
    return blocks


def _leave(model, args, output) -> None:
    _IN_FORWARD["depth"] -= 1


def _precompute(model, args, layers) -> None:
    _IN_FORWARD["depth"] += 1
    groups: dict = {}
    for layer in layers:
        if layer.merged or layer.disable_adapters:
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.boft_R.keys():
                continue
            drop = layer.boft_dropout[adapter]
            if not isinstance(drop, nn.Identity) and drop.training:
                continue  # random per layer: computed in the layer's forward
            param = layer.boft_R[adapter]
            entry = _CACHE.get(layer, {}).get(adapter)
            if entry is not None and not torch.is_grad_enabled() and _current(entry, param):
                continue  # no graph to renew and the same parameters: kept
            groups.setdefault((tuple(param.shape), param.dtype, param.device), []).append((layer, adapter, param))
    for members in groups.values():
        stacked = stacked_rotation_blocks(torch.stack([param for _, _, param in members]))
        for (layer, adapter, param), blocks in zip(members, stacked.unbind(0)):
            _store(layer, adapter, blocks, param)


def prepare(model) -> int:
    """Precompute every BOFT layer's rotation blocks, stacked by shape, at the start of each forward of ``model``
    (the trainers call this through ``lean.prepare``); returns the BOFT layers found. Layers called outside such a
    forward compute their own blocks (the same values)."""
    from peft.tuners.boft.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    if layers and model not in _HOOKS:
        _HOOKS[model] = (model.register_forward_pre_hook(functools.partial(_precompute, layers=layers)),
                         model.register_forward_hook(_leave, always_call=True))
    return len(layers)


def _tile(blocks: torch.Tensor, group: int) -> torch.Tensor:
    """(D, L, L) blocks -> (D / group, group·L, group·L) block-diagonal tiles (zeros off the diagonal blocks)."""
    d, size, _ = blocks.shape
    if group == 1:
        return blocks
    tiles = blocks.new_zeros(d // group, group, size, group, size)
    tiles.diagonal(dim1=1, dim2=3).copy_(blocks.view(d // group, group, size, size).permute(0, 2, 3, 1))
    return tiles.view(d // group, group * size, group * size)


def _group(n: int, size: int) -> int:
    group = 1
    while group * size < GROUP_WIDTH and n % (2 * group * size) == 0:
        group *= 2
    return group


class _BlockRotate(torch.autograd.Function):
    """x_rot[..., dL:(d+1)L] = x[..., dL:(d+1)L] @ blocks[d], in x's dtype (no copy of x in either direction)."""

    @staticmethod
    def forward(ctx, x, blocks):
        n = x.shape[-1]
        d, size, _ = blocks.shape
        group = _group(n, size)
        tiles = _tile(blocks.to(x.dtype), group)
        width = group * size
        x2 = x.reshape(-1, n)
        out = torch.empty_like(x2)
        t = x2.shape[0]
        torch.bmm(x2.view(t, n // width, width).transpose(0, 1), tiles,
                  out=out.view(t, n // width, width).transpose(0, 1))
        ctx.save_for_backward(x2, tiles)
        ctx.group, ctx.blocks_dtype, ctx.shape = group, blocks.dtype, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, tiles = ctx.saved_tensors
        t, n = x2.shape
        width = tiles.shape[-1]
        g2 = grad.reshape(t, n).to(x2.dtype)
        gv = g2.view(t, n // width, width).transpose(0, 1)
        dx = d_blocks = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(g2)
            torch.bmm(gv, tiles.transpose(1, 2), out=dx.view(t, n // width, width).transpose(0, 1))
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            d_tiles = torch.bmm(x2.view(t, n // width, width).permute(1, 2, 0), gv)  # Σ_t x_tᵀ·g_t per tile
            group, size = ctx.group, width // ctx.group
            d_blocks = d_tiles.view(-1, group, size, group, size).diagonal(dim1=1, dim2=3)  # (D/g, L, L, g)
            d_blocks = d_blocks.permute(0, 3, 1, 2).reshape(-1, size, size).to(ctx.blocks_dtype)
        return dx, d_blocks


class _ScaleShift(torch.autograd.Function):
    """y = z ⊙ s + bias in z's dtype; keeps z for the gradient of s.

    s stays near 1, so it enters as δ = s − 1 in z's dtype: ``addcmul(z, z, δ)`` is z·s in one vectorised kernel
    (fp32 arithmetic inside) and δ in bf16 keeps s's small updates; a mixed bf16 × fp32 elementwise op would run
    PyTorch's slow casting kernel instead (the lead measured 5× for DoRA's on an H200)."""

    @staticmethod
    def forward(ctx, z, s, bias):
        delta = (s.detach() - 1).to(z.dtype)
        out = torch.addcmul(z, z, delta)
        if bias is not None:
            out.add_(bias.detach().to(z.dtype))
        ctx.save_for_backward(z, delta)
        ctx.has_bias, ctx.s_dtype = bias is not None, s.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        z, delta = ctx.saved_tensors
        dims = tuple(range(dy.ndim - 1))
        dz = torch.addcmul(dy, dy, delta) if ctx.needs_input_grad[0] else None
        ds = torch.mul(dy, z).sum(dim=dims, dtype=torch.float32).to(ctx.s_dtype) if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=dims, dtype=torch.float32) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dz, ds, db


def _plain_linear(base) -> bool:
    weight = getattr(base, "weight", None)
    return (isinstance(base, nn.Linear) and weight is not None and weight.ndim == 2
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``boft.layer.Linear.forward`` with block rotations of the activations instead of dense matrices."""
    previous_dtype = x.dtype
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs).to(previous_dtype)
    if self.merged:
        return self.base_layer(x, *args, **kwargs).to(previous_dtype)
    active = [a for a in self.active_adapters if a in self.boft_R.keys()]
    scale = None
    # peft: rotation = M_ak···M_a1 (later adapters on the left), x @ rotation: the last adapter rotates x first
    for adapter in reversed(active):
        x = _BlockRotate.apply(x, _layer_blocks(self, adapter))
    for adapter in active:
        s = self.boft_s[adapter].view(-1)
        scale = s if scale is None else s * scale
    base = self.get_base_layer()
    bias = getattr(base, "bias", None)
    if _plain_linear(base):
        z = F.linear(x, base.weight)
    else:  # e.g. a quantised base: its own forward, then peft's bias handling
        z = self.base_layer(x, *args, **kwargs)
        if bias is not None:
            z = z - bias
    if scale is None:
        result = z if bias is None else z + bias
    else:
        result = _ScaleShift.apply(z, scale, bias)
    return result.to(previous_dtype)


def _get_delta_weight(self, adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's (dense rotation, scale), the rotation assembled from its diagonal blocks (no permutation matrices)."""
    blocks = rotation_blocks(self, adapter, dropout=False)
    count, size, _ = blocks.shape
    dense = blocks.new_zeros(count, size, count, size)
    dense.diagonal(dim1=0, dim2=2).copy_(blocks.permute(1, 2, 0))  # differentiable (autograd's CopySlices)
    return dense.view(count * size, count * size), self.boft_s[adapter]


def _rotated_weight(self, adapter: str, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
    """W·Rᵀ·diag(s) (peft's merge: ``(R·Wᵀ)ᵀ·s``) or W·R / s (peft's unmerge), by blocks, in the adapter's dtype."""
    blocks = rotation_blocks(self, adapter, dropout=False)
    count, size, _ = blocks.shape
    out = weight.shape[0]
    w = weight.to(blocks.dtype).reshape(out, count, size).transpose(0, 1)  # (D', out, L): W's column chunks
    rotated = torch.bmm(w, blocks if inverse else blocks.transpose(1, 2)).transpose(0, 1).reshape(out, -1)
    scale = self.boft_s[adapter]
    return rotated * (1 / scale) if inverse else rotated * scale


@torch.no_grad()
def _merge(self, safe_merge: bool = False, adapter_names=None) -> None:
    """peft's ``boft.layer.Linear.merge`` with the rotation applied by blocks (out·in·L flops, not in²·out)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    adapter_names = check_adapters_to_merge(self, adapter_names)
    for active_adapter in adapter_names or []:
        if active_adapter in self.boft_R.keys():
            orig_weight = self.get_base_weight()
            merged = _rotated_weight(self, active_adapter, orig_weight, inverse=False)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken"
                )
            self.set_base_weight(merged.contiguous().to(orig_weight.dtype))
            self.merged_adapters.append(active_adapter)


@torch.no_grad()
def _unmerge(self) -> None:
    """peft's ``boft.layer.Linear.unmerge`` (W·R / s: R is orthogonal) by blocks."""
    import warnings

    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    while len(self.merged_adapters) > 0:
        active_adapter = self.merged_adapters.pop()
        if active_adapter in self.boft_R.keys():
            orig_weight = self.get_base_weight()
            self.set_base_weight(_rotated_weight(self, active_adapter, orig_weight, inverse=True)
                                 .contiguous().to(orig_weight.dtype))


def _replacements() -> dict:
    from peft.tuners.boft.layer import Linear

    return {"forward": (Linear, "forward", _forward),
            "get_delta_weight": (Linear, "get_delta_weight", _get_delta_weight),
            "merge": (Linear, "merge", _merge), "unmerge": (Linear, "unmerge", _unmerge)}


def install() -> None:
    """Patch peft's BOFT Linear forward, ``get_delta_weight``, ``merge`` and ``unmerge`` (``_ORIGINAL`` keeps
    peft's)."""
    patching.patch(_ORIGINAL, _replacements())


def uninstall() -> None:
    """peft's methods back (tests). Layers built by the arena's builder hold no ``boft_P``: peft's forward fails
    loudly on them (AttributeError) until :func:`install` runs again."""
    patching.restore(_replacements())
