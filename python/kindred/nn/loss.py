"""LinearCrossEntropyLoss: the lm_head projection and the cross-entropy in one module, without the logits."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KindredValueError
from ..ops.loss import linear_cross_entropy
from ..ops.tokens import IGNORE_INDEX


class LinearCrossEntropyLoss(nn.Module):
    """``loss = module(hidden, weight, targets, bias=None)``; options as kindred.ops.linear_cross_entropy.

    The weight is passed per call (it belongs to the model's lm_head, usually tied to the embeddings); a
    frozen weight (requires_grad False) gets no gradient and the faster single-pass path. ``valid_rows``
    (CPU indices of the tokens that may count) lets the GEMMs skip the ignored ones.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_stats: bool = False,
    ):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise KindredValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_stats = return_stats

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        valid_rows: torch.Tensor | None = None,
    ):
        return linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_stats=self.return_stats,
            valid_rows=valid_rows,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
        )
