"""Linear4bit: a frozen linear layer whose weight is stored as NF4 or INT4g.

State dicts use the formats other tools read: NF4 weights are saved in bitsandbytes' layout (the keys
transformers writes for ``*-bnb-4bit`` checkpoints), INT4g weights as AutoAWQ GEMM tensors
(``qweight``, ``qzeros``, ``scales``). On CUDA, the first inference call with at most 16 rows repacks the
weight for the streaming decode kernel once and keeps it as a non-persistent buffer (never saved).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._ops.matmul_4bit import decode_eligible
from ..errors import KindredFormatError, KindredValueError
from ..formats.bnb import has_bnb_state, nf4_from_bnb, nf4_to_bnb
from ..formats.checkpoint import read_prefix
from ..ops.matmul_4bit import has_decode_layout, matmul_4bit, repack_decode
from ..ops.quant import (
    INT4G_DEFAULT_GROUP,
    NF4_DEFAULT_BLOCKSIZE,
    int4g_from_awq,
    int4g_to_awq,
    quantize_int4g,
    quantize_nf4,
)
from ..weights import DecodeWeight, Int4gWeight, NF4Weight

QUANT_TYPES = ("nf4", "int4g")
_AWQ_KEYS = ("qweight", "qzeros", "scales")


class Linear4bit(nn.Module):
    """y = x · dequant(W)ᵀ + b with a frozen 4-bit W (kindred.ops.matmul_4bit; differentiable in x)."""

    def __init__(self, quantized: NF4Weight | Int4gWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(quantized, (NF4Weight, Int4gWeight)):
            raise KindredValueError(
                f"quantized must be an NF4Weight or Int4gWeight, got {type(quantized).__name__}"
            )
        if len(quantized.shape) != 2:
            raise KindredValueError(f"a linear weight must be 2-D, got shape {quantized.shape}")
        self.out_features, self.in_features = quantized.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise KindredValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self._set_weight(quantized)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant: str = "nf4",
        blocksize: int = NF4_DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        group_size: int = INT4G_DEFAULT_GROUP,
    ) -> Linear4bit:
        """Quantize ``linear``'s weight (on its device) to ``quant`` ("nf4" or "int4g")."""
        if not isinstance(linear, nn.Linear):
            raise KindredValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().contiguous()
        if quant == "nf4":
            q = quantize_nf4(w, blocksize, double_quant)
        elif quant == "int4g":
            q = quantize_int4g(w, group_size)
        else:
            raise KindredValueError(f"quant must be one of {QUANT_TYPES}, got {quant!r}")
        return cls(q, linear.bias)

    @property
    def quant_type(self) -> str:
        return "nf4" if isinstance(self.quantized, NF4Weight) else "int4g"

    @property
    def quantized(self) -> NF4Weight | Int4gWeight:
        """The weight's quantized tensors, on the module's current device."""
        meta = self._meta
        tensors = {k: getattr(self, f"_q_{k}") for k in meta["fields"]}
        if meta["type"] == "nf4":
            optional = {k: tensors.get(k) for k in ("nested_absmax", "nested_code", "offset")}
            return NF4Weight(
                tensors["packed"],
                tensors["absmax"],
                **optional,
                blocksize=meta["blocksize"],
                shape=meta["shape"],
                dtype=meta["dtype"],
            )
        return Int4gWeight(
            tensors["packed"], tensors["scales"], tensors["zeros"], meta["group_size"], meta["dtype"]
        )

    def _set_weight(self, q: NF4Weight | Int4gWeight) -> None:
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith(("_q_", "_decode"))]:
            delattr(self, name)
        self._decode_meta = None
        fields = tuple(q.tensors())
        for k, t in q.tensors().items():
            self.register_buffer(f"_q_{k}", t, persistent=False)
        if isinstance(q, NF4Weight):
            self._meta = {
                "type": "nf4",
                "fields": fields,
                "blocksize": q.blocksize,
                "shape": q.shape,
                "dtype": q.dtype,
            }
        else:
            self._meta = {"type": "int4g", "fields": fields, "group_size": q.group_size, "dtype": q.dtype}

    def decode_weight(self, build: bool = True) -> DecodeWeight | None:
        """The weight repacked for the CUDA decode kernel, built on first use when ``build`` (not while
        compiling or capturing a CUDA graph); None on the CPU or when in_features % 128 != 0."""
        if self._decode_meta is not None:
            return DecodeWeight(self._decode_data, **self._decode_meta)
        q = self.quantized
        if not (build and q.device.type == "cuda" and has_decode_layout(q)):
            return None
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return None
        d = repack_decode(q)
        self.register_buffer("_decode_data", d.data, persistent=False)
        self._decode_meta = {
            "fmt": d.fmt,
            "shape": d.shape,
            "period": d.period,
            "blocksize": d.blocksize,
            "dtype": d.dtype,
        }
        return d

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise KindredValueError(
                f"input must end in in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        if x.device != self._q_packed.device:
            raise KindredValueError(f"input is on {x.device} but the weight is on {self._q_packed.device}")
        rows = x.numel() // self.in_features
        decode = self.decode_weight() if decode_eligible(x, rows, self.in_features) else None
        return matmul_4bit(x, self.quantized, self.bias, decode=decode)

    def extra_repr(self) -> str:
        q = self.quantized
        detail = (
            f"blocksize={q.blocksize}, double_quant={q.double_quant}"
            if isinstance(q, NF4Weight)
            else (f"group_size={q.group_size}")
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"quant={self.quant_type}, {detail}, {q.bits_per_weight:.3f} bits/weight"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self.quantized
        if isinstance(q, NF4Weight):
            destination.update(nf4_to_bnb(q, prefix + "weight"))
        else:
            destination.update({prefix + k: v for k, v in int4g_to_awq(q).items()})

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        device = self._q_packed.device
        if has_bnb_state(mine, "weight"):
            q = nf4_from_bnb(mine, "weight", source=f"state dict '{prefix}'")
            consumed = [k for k in mine if k == "weight" or k.startswith("weight.")]
        elif all(k in mine for k in _AWQ_KEYS):
            k_rows, groups = mine["qweight"].shape[0], max(mine["qzeros"].shape[0], 1)
            q = int4g_from_awq(
                *(mine[k] for k in _AWQ_KEYS), group_size=k_rows // groups, dtype=self._meta["dtype"]
            )
            consumed = list(_AWQ_KEYS)
        else:
            missing_keys.append(prefix + "weight")
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: checkpoint shape {tuple(q.shape)} != module shape "
                f"{(self.out_features, self.in_features)}"
            )
            return
        self._set_weight(q.to(device))
        if "bias" in mine and self.bias is None:
            unexpected_keys.append(prefix + "bias")
        elif self.bias is not None:
            if "bias" not in mine:
                missing_keys.append(prefix + "bias")
            else:
                self.bias.data.copy_(mine["bias"])
        for k in mine:
            if k not in consumed and k != "bias":
                unexpected_keys.append(prefix + k)


def load_linear4bit(path: str | Path, prefix: str, device: str | torch.device = "cpu") -> Linear4bit:
    """The Linear4bit stored under ``prefix`` (e.g. "model.layers.0.mlp.up_proj") in a bitsandbytes 4-bit
    checkpoint written by transformers, loaded as stored (no re-quantization)."""
    tensors = read_prefix(path, prefix, device)
    if not tensors:
        raise KindredFormatError(f"{path}: no tensors under '{prefix}'")
    if not has_bnb_state(tensors, "weight"):
        raise KindredFormatError(
            f"{path}: '{prefix}.weight' has no bitsandbytes quant_state: not a 4-bit layer"
        )
    q = nf4_from_bnb(tensors, "weight", source=f"{path}")
    return Linear4bit(q, tensors.get("bias"))
