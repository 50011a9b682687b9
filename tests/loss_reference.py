"""Float64 torch reference of the fused linear cross-entropy (materialized logits), with every option."""

from __future__ import annotations

import torch


def linear_cross_entropy_ref(
    hidden,
    weight,
    targets,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """(loss, per-token loss, logits) in float64, differentiable wrt float64 leaves passed in.

    Mean over zero valid tokens is 0.0 (kindred's rule; torch gives NaN).
    """
    h, w = hidden.double(), weight.double()
    r = h @ w.T
    if bias is not None:
        r = r + bias.double()
    z = softcap * torch.tanh(r / softcap) if softcap else r
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(z, dim=-1)
    zy = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    eps = label_smoothing
    rows = lse - (1 - eps) * zy - eps * z.mean(-1) + z_loss * lse * lse
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows, rows, r
    total = rows.sum()
    if reduction == "sum":
        return total, rows, r
    return total / valid.sum().clamp(min=1), rows, r
