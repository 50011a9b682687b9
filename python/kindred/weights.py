"""The quantized weights the ops take and return: NF4Weight, Int4gWeight and DecodeWeight.

Each keeps a quantized tensor's pieces together and hands them to the custom ops as one argument
(``op_args()``: the base list, format and parameter of ``kindred._ops.quant``). The formats themselves are
defined once in ``csrc/include/kindred/formats.h`` (the decode layout in ``matmul_4bit.h``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._ops import matmul_4bit as _matmul
from ._ops import quant as _quant
from .errors import KindredValueError

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _out_dtype(dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    dtype = default if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise KindredValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _check_out(out: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise KindredValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) and not (out.is_contiguous() and out.numel() == math.prod(shape)):
        raise KindredValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise KindredValueError(f"out is on {out.device} but the quantized weight is on {device}")


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """An NF4-quantized tensor in bitsandbytes' layout (see formats.h).

    ``absmax`` is f32 [blocks] or, with double quantization, u8 codes into ``nested_code`` scaled by
    ``nested_absmax`` per 256 blocks plus ``offset``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        fields = ("packed", "absmax", "nested_absmax", "nested_code", "offset")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    def op_args(self) -> tuple[list[torch.Tensor], str, int]:
        """(base, "nf4", blocksize): the weight as the custom ops take it (absent parts as empty tensors)."""
        empty = self.absmax.new_empty(0, dtype=torch.float32)
        nested = [empty if t is None else t for t in (self.nested_absmax, self.nested_code, self.offset)]
        return [self.packed, self.absmax, *nested], "nf4", self.blocksize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def to(self, device: torch.device | str) -> NF4Weight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor this stands for, in ``dtype`` (default: the dtype it was quantized from).

        With ``out`` (contiguous, or [N, K] with strided rows, e.g. ``workspace[:, :K]``) it is written there.
        """
        base, _, blocksize = self.op_args()
        if out is not None:
            _check_out(out, self.shape, self.device)
            _quant.dequantize_nf4_out(out, base, blocksize)
            return out
        return _quant.dequantize_nf4(base, blocksize, list(self.shape), _out_dtype(dtype, self.dtype))


@dataclasses.dataclass(frozen=True)
class Int4gWeight:
    """An INT4g-quantized [N, K] weight in kindred's layout: w ≈ (q − zero) · scale per group of K."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    def op_args(self) -> tuple[list[torch.Tensor], str, int]:
        """(base, "int4g", group_size): the weight as the custom ops take it."""
        return [self.packed, self.scales, self.zeros], "int4g", self.group_size

    @property
    def nbytes(self) -> int:
        # The zero point is a 4-bit value stored in a byte here; count it as 4 bits, as AWQ packs it.
        return self.packed.numel() + 2 * self.scales.numel() + self.zeros.numel() // 2

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def to(self, device: torch.device | str) -> Int4gWeight:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense [N, K] weight this stands for, in ``dtype`` (default: the dtype it was quantized from).

        With ``out`` (contiguous, or [N, K] with strided rows) it is written there.
        """
        if self.packed.dim() != 2:
            raise KindredValueError(f"packed must be 2-D [N, K/2], got shape {tuple(self.packed.shape)}")
        base, _, group_size = self.op_args()
        if out is not None:
            _check_out(out, self.shape, self.device)
            _quant.dequantize_int4g_out(out, base, group_size)
            return out
        return _quant.dequantize_int4g(base, group_size, _out_dtype(dtype, self.dtype))


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A 4-bit [N, K] weight repacked for the CUDA decode kernel (layout: kindred/matmul_4bit.h), lossless.

    ``period`` is the K span of one scale (min(blocksize, 128) for NF4, the group size for INT4g);
    ``blocksize`` that of the source, which ``unpack_decode`` restores.
    """

    data: torch.Tensor
    fmt: str
    shape: tuple[int, int]
    period: int
    blocksize: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def op_args(self) -> tuple[torch.Tensor, int, int, int, int]:
        """(data, format code, N, K, period): the layout as ``kindred::matmul_4bit_decode`` takes it."""
        return self.data, _matmul.DECODE_FORMATS[self.fmt], *self.shape, self.period

    def to(self, device: torch.device | str) -> DecodeWeight:
        return dataclasses.replace(self, data=self.data.to(device))
