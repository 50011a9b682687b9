"""bitsandbytes 4-bit serialization, as transformers writes ``*-bnb-4bit`` checkpoints.

For a quantized linear ``<p>``: ``<p>.weight`` (packed u8 [(n+1)//2, 1]), ``<p>.weight.absmax``,
``<p>.weight.quant_map`` (the 16-entry codebook), with double quantization ``<p>.weight.nested_absmax`` and
``<p>.weight.nested_quant_map``, and ``<p>.weight.quant_state.bitsandbytes__nf4``: a u8 tensor holding the
UTF-8 JSON of quant_type, blocksize, dtype, shape and the nested_* scalars (bitsandbytes
``QuantState.as_dict(packed=True)``).
"""

from __future__ import annotations

import json
import math

import torch

from .. import _core
from ..bounded import check_float, check_int, loads_json
from ..errors import KindredFormatError
from ..weights import NF4Weight

_STATE_KEY = "quant_state.bitsandbytes__"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MAX_STATE_BYTES = 1 << 16  # the JSON is ~200 bytes
_MAX_ELEMENTS = 1 << 40


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def nf4_to_bnb(q: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The bitsandbytes state-dict entries of ``q`` under ``prefix`` (e.g. "model.layers.0.q_proj.weight")."""
    state = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    out = {
        prefix: q.packed.reshape(-1, 1),
        f"{prefix}.absmax": q.absmax,
        f"{prefix}.quant_map": torch.tensor(_core.NF4_CODEBOOK, dtype=torch.float32, device=q.device),
    }
    if q.double_quant:
        state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(q.offset.cpu()[0]))
        out[f"{prefix}.nested_absmax"] = q.nested_absmax
        out[f"{prefix}.nested_quant_map"] = q.nested_code
    blob = json.dumps(state).encode("utf-8")
    out[f"{prefix}.{_STATE_KEY}nf4"] = torch.tensor(list(blob), dtype=torch.uint8, device=q.device)
    return out


def has_bnb_state(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> bool:
    return any(k.startswith(f"{prefix}.{_STATE_KEY}") for k in tensors)


def nf4_from_bnb(
    tensors: dict[str, torch.Tensor], prefix: str = "weight", source: str = "state dict"
) -> NF4Weight:
    """The NF4Weight stored under ``prefix`` in bitsandbytes' layout, without re-quantizing.

    ``source`` (a file name) goes into every error, which names the offending key.
    """

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise KindredFormatError(
                f"{source}: missing tensor '{key}' of the bitsandbytes 4-bit weight '{prefix}'"
            )
        return tensors[key]

    state_keys = [k for k in tensors if k.startswith(f"{prefix}.{_STATE_KEY}")]
    if not state_keys:
        raise KindredFormatError(
            f"{source}: no '{prefix}.{_STATE_KEY}nf4' tensor: '{prefix}' is not a bnb 4-bit weight"
        )
    key = state_keys[0]
    quant_type = key.rsplit("__", 1)[1]
    if quant_type != "nf4":
        raise KindredFormatError(f"{source}: '{key}' is bitsandbytes {quant_type!r}; kindred reads NF4 only")
    state = parse_bnb_state(need(key), key, source)
    packed = need(prefix)
    if packed.dtype != torch.uint8:
        if packed.dtype.is_floating_point and packed.element_size() > 1:  # quant_storage=bfloat16 etc. (FSDP)
            packed = packed.contiguous().view(torch.uint8)
        else:
            raise KindredFormatError(f"{source}: '{prefix}' must hold packed uint8 codes, got {packed.dtype}")
    shape = tuple(state["shape"])
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise KindredFormatError(
            f"{source}: '{prefix}' has {packed.numel()} bytes, expected {(n + 1) // 2} "
            f"for shape {list(shape)}"
            " (truncated?)"
        )
    quant_map = need(f"{prefix}.quant_map").float().cpu()
    if quant_map.shape != (16,) or not torch.equal(quant_map, torch.tensor(_core.NF4_CODEBOOK)):
        raise KindredFormatError(f"{source}: '{prefix}.quant_map' is not the NF4 codebook")
    nested = "nested_offset" in state
    nested_absmax = need(f"{prefix}.nested_absmax").float() if nested else None
    nested_code = need(f"{prefix}.nested_quant_map").float() if nested else None
    if nested and nested_code.numel() != 256:
        raise KindredFormatError(
            f"{source}: '{prefix}.nested_quant_map' has {nested_code.numel()} entries, not 256"
        )
    if nested and state.get("nested_blocksize", 256) != 256:
        raise KindredFormatError(
            f"{source}: '{key}' has nested_blocksize {state['nested_blocksize']}, kindred reads 256"
        )
    absmax = need(f"{prefix}.absmax")
    expected_absmax = torch.uint8 if nested else torch.float32
    if absmax.dtype != expected_absmax:
        raise KindredFormatError(f"{source}: '{prefix}.absmax' must be {expected_absmax}, got {absmax.dtype}")
    blocks = -(-n // state["blocksize"])
    if absmax.numel() != blocks:
        raise KindredFormatError(
            f"{source}: '{prefix}.absmax' has {absmax.numel()} entries, expected {blocks} "
            f"({n} elements in blocks of {state['blocksize']})"
        )
    if nested and nested_absmax.numel() != -(-blocks // 256):
        raise KindredFormatError(
            f"{source}: '{prefix}.nested_absmax' has {nested_absmax.numel()} entries, expected "
            f"{-(-blocks // 256)} ({blocks} blocks in groups of 256)"
        )
    offset = None
    if nested:
        offset = torch.tensor([state["nested_offset"]], dtype=torch.float32, device=packed.device)
    return NF4Weight(
        packed.reshape(-1).contiguous(),
        absmax.reshape(-1).contiguous(),
        None if nested_absmax is None else nested_absmax.reshape(-1).contiguous(),
        None if nested_code is None else nested_code.reshape(-1).contiguous(),
        offset,
        int(state["blocksize"]),
        shape,
        _DTYPES[state["dtype"]],
    )


def parse_bnb_state(blob: torch.Tensor, key: str, source: str) -> dict:
    """The quant-state JSON held by the u8 tensor ``key``, checked: shape, blocksize, dtype, offset."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() > _MAX_STATE_BYTES:
        raise KindredFormatError(
            f"{source}: '{key}' must be a 1-D uint8 tensor of at most {_MAX_STATE_BYTES} bytes (JSON), "
            f"got {blob.dtype} {list(blob.shape)}"
        )
    state = loads_json(blob.cpu().numpy().tobytes(), f"{source}: '{key}'", max_depth=4)
    if not isinstance(state, dict):
        raise KindredFormatError(f"{source}: '{key}' must hold a JSON object")
    for field, kind in (("blocksize", int), ("shape", list), ("dtype", str), ("quant_type", str)):
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            raise KindredFormatError(
                f"{source}: '{key}' lacks a valid '{field}' ({kind.__name__}): {state.get(field)!r}"
            )
    b = state["blocksize"]
    if not 32 <= b <= 4096 or b & (b - 1):
        raise KindredFormatError(
            f"{source}: '{key}' has blocksize {b}; NF4 blocksizes are powers of two in [32, 4096]"
        )
    if state["dtype"] not in _DTYPES:
        raise KindredFormatError(
            f"{source}: '{key}' has dtype {state['dtype']!r}; expected one of {sorted(_DTYPES)}"
        )
    shape = state["shape"]
    if not 1 <= len(shape) <= 4 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise KindredFormatError(f"{source}: '{key}' has an invalid shape {shape!r} (1 to 4 positive sizes)")
    if math.prod(shape) > _MAX_ELEMENTS:
        raise KindredFormatError(f"{source}: '{key}' has shape {shape}: more than 2^40 elements")
    if "nested_offset" in state:
        check_float(state["nested_offset"], f"{source}: '{key}': 'nested_offset'", -1e6, 1e6)
    if "nested_blocksize" in state:
        check_int(state["nested_blocksize"], f"{source}: '{key}': 'nested_blocksize'", 1, 1 << 20)
    return state
