"""Truncated SVD of a weight-sized matrix through the eigendecomposition of its smaller Gram matrix (GPU path).

Not a registry member: it registers nothing. ``torch.linalg.svd`` of a 18944×3584 matrix takes seconds on a GPU
(cuSOLVER's dense SVD), so SVD-initialised methods spent minutes per 7B model there. The Gram matrix of the smaller
side (3584² for every Qwen2.5-7B projection) has the squared singular values as eigenvalues and one set of
singular vectors as eigenvectors; the other set follows by one matmul. Done in float64, the squared spectrum keeps
the small singular values (down to ~1e-7 of the largest) that MiLoRA needs.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def truncated_svd(matrix: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, S_k, Vh_k) of the k largest (or smallest) singular triplets, in descending order of S, float32.

    Exact up to float64 rounding, like ``torch.linalg.svd(matrix)`` sliced to k (singular vectors up to a joint
    sign, and any basis of a repeated singular value's subspace).
    """
    m = matrix.double()
    out_dim, in_dim = m.shape
    tall = out_dim >= in_dim
    gram = m.T @ m if tall else m @ m.T  # min(out, in) squared
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    k = min(k, evals.numel())
    idx = torch.arange(evals.numel() - 1, evals.numel() - 1 - k, -1) if largest else torch.arange(k - 1, -1, -1)
    idx = idx.to(evals.device)
    s = evals[idx].clamp(min=0).sqrt()
    vecs = evecs[:, idx]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if tall:  # vecs = V_k (in × k); U_k = W·V_k / S
        v = vecs
        u = (m @ v) / safe
    else:  # vecs = U_k (out × k); V_k = Wᵀ·U_k / S
        u = vecs
        v = (m.T @ u) / safe
    return u.float(), s.float(), v.T.float()


def use_gram_svd(tensor: torch.Tensor) -> bool:
    """The GPU takes the Gram path; the CPU keeps LAPACK's SVD (fast there at these sizes, and the reference)."""
    return tensor.device.type == "cuda"
