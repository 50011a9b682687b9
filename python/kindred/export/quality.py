"""How close an exported model stays to its 16-bit reference: KL divergence and top-1 agreement of the
next-token distributions over the same tokens (the quality gate's figures and results/export.csv's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KindredError


@dataclass(frozen=True)
class Agreement:
    """Mean KL(reference ‖ candidate) in nats per token and the share of tokens whose argmax agrees."""

    kl: float
    top1: float
    tokens: int


def agreement(
    reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None
) -> Agreement:
    """Compare logits ``[..., V]`` of the reference and the candidate at the same positions (``mask`` [...]
    selects the positions that count, e.g. user text without padding). Computed in float64."""
    if reference.shape != candidate.shape:
        raise KindredError(
            f"candidate: logits of shape {tuple(candidate.shape)} do not match the reference's "
            f"{tuple(reference.shape)}"
        )
    if reference.dim() < 1 or reference.shape[-1] < 2:
        raise KindredError(
            f"reference: logits need a vocabulary dimension, got shape {tuple(reference.shape)}"
        )
    ref = reference.reshape(-1, reference.shape[-1]).double()
    cand = candidate.reshape(-1, candidate.shape[-1]).double()
    if mask is not None:
        if mask.shape != reference.shape[:-1]:
            raise KindredError(f"mask: shape {tuple(mask.shape)}, expected {tuple(reference.shape[:-1])}")
        keep = mask.reshape(-1).bool().to(ref.device)
        ref, cand = ref[keep], cand[keep.to(cand.device)]
    if ref.shape[0] == 0:
        raise KindredError("mask: no position to compare")
    for name, t in (("reference", ref), ("candidate", cand)):
        if not torch.isfinite(t).all():
            raise KindredError(f"{name}: logits hold NaN or infinity")
    logp = torch.log_softmax(ref, -1)
    logq = torch.log_softmax(cand.to(ref.device), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()
    top1 = (ref.argmax(-1) == cand.to(ref.device).argmax(-1)).double().mean().item()
    return Agreement(kl=kl, top1=top1, tokens=int(ref.shape[0]))
