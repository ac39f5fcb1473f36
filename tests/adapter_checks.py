"""Helpers for tests that compare adapter implementations (imported by name: tests/ is on sys.path under pytest)."""

from __future__ import annotations

import torch


def perturb_trainable(model, scale: float) -> None:
    """Move every trainable parameter off its init (seeded), so that every term of the adapter gets a gradient."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def sharp_model(source: str, std: float = 0.3):
    """The tiny model (fp32) with larger weights (std ``std``, seeded), so that attention is far from uniform and
    every adapter term shows in the loss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model
