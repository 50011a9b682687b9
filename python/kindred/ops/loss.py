"""Functional API of the loss family: fused linear cross-entropy without the [tokens × vocab] logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(softcap(hidden @ weight.T + bias).float(), targets, ...) + z_loss · mean(lse²)`` and never
holds more than a chunk of logits (see kindred/_loss.py for the algorithm and its memory budget).

Rules:
- reduction "mean" averages over the non-ignored tokens, counted on the device; with none (an all-ignored
  batch) the loss is 0.0 and every gradient 0 — never NaN.
- z-loss adds λ·lse² per non-ignored token (averaged like the loss); label smoothing follows
  torch.nn.functional.cross_entropy; softcap c gives logits c·tanh(x / c).
- Targets outside [0, V) other than ignore_index raise KindredValueError on the CPU; on CUDA, checking them
  would need a host sync, so such a token's loss (and the mean) is NaN instead.
- Gradients: hidden always (when it requires grad), weight and bias only when they require grad. A frozen
  weight (the QLoRA default) takes one pass over the vocabulary that computes the loss and dH together.
- ``valid_rows`` (optional): a CPU integer tensor of increasing indices into the flattened tokens, listing
  every token whose target is not ignore_index, computed by the caller from host-side labels (a trainer's
  packed batch). Tokens not listed count as ignored. On CUDA the GEMMs then run on the listed rows only:
  ignored tokens cost no FLOP, without the host sync that counting them on the device would take.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._ops import loss as _loss
from ..errors import KindredValueError
from .tokens import IGNORE_INDEX

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class LinearCrossEntropyStats(NamedTuple):
    """Per-token results (detached), shaped like ``targets``; ignored tokens have loss 0 and hit False."""

    token_loss: torch.Tensor  # float32 (float64 for float64 inputs)
    hit: torch.Tensor  # bool: the argmax of the logits is the target
    count: torch.Tensor  # int64 scalar on the device: non-ignored tokens


def _check(hidden, weight, targets, bias, reduction, label_smoothing, z_loss, softcap) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise KindredValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise KindredValueError("hidden must have a last dimension hidden_size, got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise KindredValueError(
            f"weight must be 2-D [vocab, {hidden.shape[-1]}] (hidden's last dimension), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise KindredValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise KindredValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise KindredValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if targets.dtype not in _INT_DTYPES:
        raise KindredValueError(f"targets must be an integer tensor (class indices), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise KindredValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise KindredValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    cpu64 = targets.dtype == torch.int64 and targets.device.type == "cpu"
    if cpu64 and targets.numel() and not torch.compiler.is_compiling():
        # Named here with its real value: the core takes int32 targets (see _ops/loss._targets32; traced
        # code gets that path's out-of-range target instead, which the core rejects too).
        flat = targets.reshape(-1)
        wide = (flat < -(2**31)) | (flat >= 2**31)
        if bool(wide.any()):
            i = int(torch.nonzero(wide)[0])
            raise KindredValueError(f"targets[{i}] = {int(flat[i])} is outside [0, {weight.shape[0]})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise KindredValueError(
                f"bias must be a tensor of shape ({weight.shape[0]},), got {getattr(bias, 'shape', bias)}"
            )
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise KindredValueError(
                f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                f"got {bias.dtype} on {bias.device}"
            )
    if reduction not in _loss.REDUCTIONS:
        raise KindredValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise KindredValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0 or float(z_loss) == float("inf"):
        raise KindredValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if softcap is not None and not 0.0 < float(softcap) < float("inf"):
        raise KindredValueError(f"softcap must be None or a finite value > 0, got {softcap}")


def _device_rows(valid_rows, n: int, device: torch.device) -> torch.Tensor:
    """valid_rows checked on the host, copied to ``device`` as int64 (asynchronously, from pinned memory)."""
    if not isinstance(valid_rows, torch.Tensor) or valid_rows.device.type != "cpu":
        where = getattr(valid_rows, "device", type(valid_rows).__name__)
        raise KindredValueError(f"valid_rows must be a CPU tensor (host-side indices), got {where}")
    if valid_rows.dim() != 1 or valid_rows.dtype not in _INT_DTYPES:
        raise KindredValueError(
            f"valid_rows must be a 1-D integer tensor, got {valid_rows.dtype} "
            f"of shape {tuple(valid_rows.shape)}"
        )
    rows = valid_rows.to(torch.int64)
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= n or not bool((rows[1:] > rows[:-1]).all())):
        raise KindredValueError(f"valid_rows must be increasing indices in [0, {n}) (the flattened tokens)")
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool = False,
    valid_rows: torch.Tensor | None = None,
    impl: str = "auto",
    block_rows: int = 0,
    chunk_cols: int = 0,
):
    """linear_cross_entropy with the implementation and chunking exposed (tests and benchmarks)."""
    _check(hidden, weight, targets, bias, reduction, label_smoothing, z_loss, softcap)
    lead = tuple(targets.shape)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = targets.reshape(-1)
    listed = None
    if valid_rows is not None:
        listed = _device_rows(valid_rows, y.shape[0], y.device)
        y = torch.full_like(y, ignore_index).index_copy_(0, listed, y.index_select(0, listed))
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    cap = 0.0 if softcap is None else float(softcap)
    frozen = not weight.requires_grad and (b is None or not b.requires_grad)
    # The single pass needs the reduction's scale in the forward; it takes smoothing only without softcap.
    single = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and frozen
        and reduction != "none"
        and not (label_smoothing > 0 and cap > 0)
    )
    loss, token_loss, _, hit, _ = _loss.linear_cross_entropy(
        h2,
        w,
        b,
        y,
        listed,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        cap,
        reduction,
        single,
        impl,
        int(block_rows),
        int(chunk_cols),
    )
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    count = (y != ignore_index).sum()  # y: the targets as used (rows not in valid_rows ignored)
    return loss, LinearCrossEntropyStats(token_loss.detach().reshape(lead), hit.reshape(lead), count)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool = False,
    valid_rows: torch.Tensor | None = None,
):
    """Cross-entropy of the logits ``hidden @ weight.T (+ bias)`` against ``targets``, never materialized.

    hidden [..., D] and weight [V, D] (float32, float16, bfloat16; float64 on the CPU), targets [...] int64
    class indices or ``ignore_index``. Returns the loss (a scalar, or per token for reduction="none"); with
    ``return_stats``, ``(loss, LinearCrossEntropyStats(token_loss, hit, count))``. ``valid_rows``: the
    tokens (flattened indices, on the CPU) that may have a target other than ignore_index; see the module
    docstring.
    """
    return _linear_cross_entropy(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_stats=return_stats,
        valid_rows=valid_rows,
    )
