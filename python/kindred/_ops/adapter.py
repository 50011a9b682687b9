"""The adapter between torch / numpy and ``kindred._core``: TensorViews (no copy) and the current stream."""

from __future__ import annotations

import numpy as np
import torch

from .. import _core
from ..errors import KindredValueError

_DTYPE_NAMES = {
    torch.uint8: "uint8",
    torch.int32: "int32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int64: "int64",
}
_NP_NAMES = {
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
}


def view(t: torch.Tensor, name: str = "tensor") -> _core.TensorView:
    """A TensorView of ``t`` (no copy); ``name`` goes into the error for an unsupported dtype."""
    if not isinstance(t, torch.Tensor):
        raise KindredValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise KindredValueError(f"{name} has unsupported dtype {t.dtype}")
    device = t.device  # read once: each call builds a new torch.device (views are made per kernel call)
    return _core.TensorView(t.data_ptr(), dtype, t.shape, t.stride(), device.type, device.index or 0)


def opt_view(t: torch.Tensor | None, name: str) -> _core.TensorView | None:
    return None if t is None else view(t, name)


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., D] as rows [M, D] with unit column stride: a view where t's strides allow it, else a copy."""
    r = t.reshape(-1, t.shape[-1])
    if (r.shape[1] > 1 and r.stride(1) != 1) or (r.shape[0] > 1 and r.stride(0) < r.shape[1]):
        r = r.contiguous()
    return r


def np_view(a: np.ndarray, name: str = "array") -> _core.TensorView:
    """A TensorView of a numpy array (no copy); the array must outlive the call."""
    if not isinstance(a, np.ndarray):
        raise KindredValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in _NP_NAMES:
        raise KindredValueError(f"{name} has unsupported dtype {a.dtype}")
    if a.size == 0:  # numpy gives empty arrays arbitrary strides
        strides = [int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim)]
    else:
        strides = [s // a.itemsize for s in a.strides]
    return _core.TensorView(a.ctypes.data, _NP_NAMES[a.dtype], list(a.shape), strides, "cpu", 0)
