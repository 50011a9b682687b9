"""Test helpers shared across files."""

import torch


def randn(shape, dtype=torch.float32, device="cpu", seed=0, scale=0.02):
    """Random non-zero weights: normal, scaled like a trained layer, never exactly zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    w = torch.where(w == 0, torch.full_like(w, 1e-6), w)
    return w.to(dtype).to(device)
