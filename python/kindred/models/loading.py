"""Building a DecoderLM: from a HF model directory (safetensors) or from a config with random weights.

Loading streams tensor by tensor: the model skeleton is created on the meta device, then each checkpoint
tensor is read through ``safetensors.safe_open``, cast, moved to the target device and — for the seven
projection linears — quantized to NF4 or INT4g before the next one is read. Peak memory is therefore the
final footprint plus about one tensor in the target dtype (one fused Phi-3 tensor at most), on the host
and on the GPU. bitsandbytes ``*-bnb-4bit`` checkpoints are loaded as stored, without re-quantizing.

Every weight comes back frozen (``requires_grad=False``), the model in eval mode: QLoRA trains adapters on
a frozen base; call ``model.requires_grad_(True)`` for full fine-tuning of a dense model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import KindredFormatError, KindredValueError
from ..formats.bnb import nf4_from_bnb, parse_bnb_state
from ..formats.checkpoint import ASIDE, FUSED_LINEARS, canonical_name, shard_files
from ..formats.mxfp4 import MXFP4_BLOCK, dequantize_mxfp4, mxfp4_shape
from ..nn.linear4bit import Linear4bit
from ..ops.quant import INT4G_DEFAULT_GROUP, NF4_DEFAULT_BLOCKSIZE, quantize_int4g, quantize_nf4
from ..weights import NF4Weight
from .config import QUANTIZED_NAMES, DecoderConfig, load_config
from .decoder import DecoderLM
from .moe import ExpertWeight, Router

QUANTS = (None, "nf4", "int4g")
_BNB_STATE = ".quant_state.bitsandbytes__nf4"
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", _BNB_STATE)
_BNB_OTHER = re.compile(r"\.quant_state\.bitsandbytes__(?!nf4$)\w+$")  # FP4 and other 4-bit types
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def from_config(
    config: dict | str | Path | DecoderConfig,
    quant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    attn_backend: str = "auto",
    blocksize: int = NF4_DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    group_size: int = INT4G_DEFAULT_GROUP,
) -> DecoderLM:
    """A DecoderLM with seeded random weights (normal, std 0.02; norms neutral; biases 0).

    Built layer by layer on ``device`` like a checkpoint load, so real shapes (e.g. Qwen3-8B in NF4) fit
    where their dense weights would not.
    """
    cfg = load_config(config)
    device, dtype = _check_args(quant, dtype, device)
    model = _skeleton(cfg, attn_backend)
    names = _parameter_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def fetch(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):  # neutral: w = 0 in (1 + w) norms, 1 elsewhere (the gated norm)
            zero = cfg.gemma_norm and not name.endswith("linear_attn.norm.weight")
            return (torch.zeros if zero else torch.ones)(shape, device=device, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device, dtype=dtype)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + names.index(name))
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)

    opts = {"blocksize": blocksize, "double_quant": double_quant, "group_size": group_size}
    return _materialize(model, names, fetch, None, quant, opts, dtype, device)


def from_pretrained(
    path: str | Path,
    quant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    attn_backend: str = "auto",
    blocksize: int = NF4_DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    group_size: int = INT4G_DEFAULT_GROUP,
) -> DecoderLM:
    """Load a HF model directory (config.json + model.safetensors or a sharded index) as a DecoderLM.

    quant: None keeps the linears dense in ``dtype``; "nf4" or "int4g" quantizes them while loading
    (``blocksize``/``double_quant`` for NF4, ``group_size`` for INT4g). A bitsandbytes 4-bit checkpoint
    is loaded as stored (NF4) whatever ``quant`` is, except "int4g", which it cannot honour.
    A checkpoint whose tensors do not match the config raises KindredFormatError naming them all.
    """
    path = Path(path)
    if not path.is_dir():
        raise KindredValueError(f"path must be a model directory (config.json + safetensors), got {path}")
    cfg = load_config(path)
    device, dtype = _check_args(quant, dtype, device)
    opts = {"blocksize": blocksize, "double_quant": double_quant, "group_size": group_size}
    with contextlib.ExitStack() as stack:
        index = _Index(path, stack)
        check_layer_count(
            cfg, filter(None, map(canonical_name, index.shapes)), r"model\.layers\.(\d+)\.", path
        )
        model = _skeleton(cfg, attn_backend)
        names = _parameter_names(model)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        plan, bnb = _plan(index, cfg, names, shapes, path)
        if bnb and quant == "int4g":
            raise KindredValueError(
                f"{path} is a bitsandbytes NF4 checkpoint; it loads as NF4 (quant=None or 'nf4'), not 'int4g'"
            )
        cache: dict[str, torch.Tensor] = {}  # the one fused tensor being split (Phi-3/4)

        def fetch(name: str) -> torch.Tensor:
            key, rows = plan[name]
            if isinstance(key, _Experts):  # one layer's experts, [E, out, in]
                cache.clear()
                return key.read(index).to(device=device, dtype=dtype)
            if rows is None:
                cache.clear()
                return index.read(key).to(device=device, dtype=dtype)
            if key not in cache:
                cache.clear()
                cache[key] = index.read(key).to(device=device, dtype=dtype)
            return cache[key][rows[0] : rows[1]]

        def fetch_bnb(name: str) -> NF4Weight | None:
            key, rows = plan[name]
            if key + _BNB_STATE not in index.shapes:
                return None
            tensors = {
                key + p: index.read(key + p).to(device) for p in ("", *_BNB_PARTS) if key + p in index.shapes
            }
            q = nf4_from_bnb(tensors, key, source=str(index.where(key)))
            if rows is None:
                return q
            # A fused 4-bit tensor: its NF4 blocks do not split at row boundaries in general, so the
            # part is dequantized and quantized again with the same format (a re-rounding of the scales).
            part = q.dequantize(dtype).reshape(q.shape)[rows[0] : rows[1]].contiguous()
            return quantize_nf4(part, q.blocksize, q.double_quant)

        model = _materialize(model, names, fetch, fetch_bnb if bnb else None, quant, opts, dtype, device)
        model.kept_aside = {k: str(index.where(k)) for k in index.shapes if ASIDE.match(k)}
        return model


def _check_args(quant, dtype, device) -> tuple[torch.device, torch.dtype]:
    if quant not in QUANTS:
        raise KindredValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if dtype not in _DTYPES:
        raise KindredValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KindredValueError(f"device {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dtype


def check_layer_count(cfg: DecoderConfig, names, pattern: str, path) -> None:
    """Refuse a config whose num_hidden_layers differs from the layers the checkpoint's tensor ``names``
    hold (``pattern``'s group 1 is the layer index), before a skeleton of that many layers is built."""
    found = {int(m.group(1)) for n in names if n and (m := re.match(pattern, n))}
    want = set(range(cfg.num_layers))
    if found == want:
        return
    missing, extra = sorted(want - found), sorted(found - want)
    problems = []
    if missing:
        problems.append(f"missing tensors: model.layers.{missing[0]}.* ({len(missing)} layers missing)")
    if extra:
        problems.append(f"unexpected tensors: model.layers.{extra[0]}.* ({len(extra)} layers more)")
    raise KindredFormatError(
        f"{path}: the checkpoint does not match its {cfg.model_type} config — num_hidden_layers is "
        f"{cfg.num_layers} but the checkpoint holds {len(found)} layers; " + "; ".join(problems)
    )


def _skeleton(cfg: DecoderConfig, attn_backend: str) -> DecoderLM:
    with torch.device("meta"):
        return DecoderLM(cfg, attn_backend)


def _parameter_names(model: DecoderLM) -> list[str]:
    """Parameter names in module order, each tied parameter once (lm_head.weight when tied is left out)."""
    return [n for n, _ in model.named_parameters()]


def _materialize(model, names, fetch, fetch_bnb, quant, opts, dtype, device) -> DecoderLM:
    """Replace every meta parameter with fetch(name), quantizing the projection linears, in module order."""
    modules = dict(model.named_modules())
    done: set[str] = set()
    for name in names:
        if name in done:
            continue
        mod_name, pname = name.rsplit(".", 1)
        module = modules[mod_name]
        if isinstance(module, ExpertWeight):  # [E, out, in], quantized as E · out rows
            w = fetch(name)
            if quant is None:
                _set(module, "weight", w)
            else:
                module.set_quantized(
                    _quantize(w.reshape(-1, w.shape[-1]).contiguous(), quant, opts, mod_name)
                )
            done.add(name)
            continue
        if isinstance(module, Router):  # routing runs in float32
            _set(module, pname, fetch(name).float())
            done.add(name)
            continue
        if isinstance(module, nn.Linear) and mod_name.rsplit(".", 1)[-1] in QUANTIZED_NAMES:
            bias_name = f"{mod_name}.bias"
            bias = fetch(bias_name) if module.bias is not None else None
            q = fetch_bnb(f"{mod_name}.weight") if fetch_bnb is not None else None
            if q is None and quant is None:
                _set(module, "weight", fetch(f"{mod_name}.weight"))
                if bias is not None:
                    _set(module, "bias", bias)
            else:
                if q is None:
                    q = _quantize(fetch(f"{mod_name}.weight").contiguous(), quant, opts, mod_name)
                parent, child = mod_name.rsplit(".", 1)
                setattr(modules[parent], child, Linear4bit(q, bias))
            done.update({f"{mod_name}.weight", bias_name})
            continue
        _set(module, pname, fetch(name))
        done.add(name)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.init_rotary(device)
    model.eval()
    return model


def _quantize(w: torch.Tensor, quant: str, opts: dict, where: str):
    try:
        if quant == "nf4":
            return quantize_nf4(w, opts["blocksize"], opts["double_quant"])
        return quantize_int4g(w, opts["group_size"])
    except KindredValueError as e:
        raise KindredValueError(f"{where}: cannot quantize to {quant}: {e}") from None


def _set(module: nn.Module, pname: str, t: torch.Tensor) -> None:
    module._parameters[pname] = nn.Parameter(t, requires_grad=False)


class _Index:
    """Names, shapes and shard of every tensor in a checkpoint directory; reads one tensor at a time."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        files = shard_files(path)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for f in files:
            try:
                h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise KindredFormatError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = h
            for key in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in self.files:
                    raise KindredFormatError(
                        f"{path}: tensor '{key}' is in both {self.files[key].name} and {f.name}"
                    )
                self.files[key] = f
                self.shapes[key] = tuple(h.get_slice(key).get_shape())

    def where(self, key: str) -> Path:
        return self.files[key]

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.files[key]].get_tensor(key)
        except SafetensorError as e:
            raise KindredFormatError(f"{self.files[key]}: cannot read tensor '{key}' ({e})") from None


def _plan(index: _Index, cfg: DecoderConfig, names: list[str], shapes: dict, path: Path):
    """Map each model parameter to (checkpoint key, row range or None); check names and shapes up front."""
    by_name: dict[str, str] = {}
    for key in index.shapes:
        if any(key.endswith(p) for p in _BNB_PARTS):
            continue
        canon = canonical_name(key)
        if canon is not None:
            by_name[canon] = key
    bnb = any(k.endswith(_BNB_STATE) for k in index.shapes)
    other = [k for k in index.shapes if _BNB_OTHER.search(k)]
    if other:
        raise KindredFormatError(
            f"{index.where(other[0])}: '{other[0]}' is not NF4; kindred reads bnb NF4 only"
        )
    plan: dict[str, tuple[str, tuple[int, int] | None]] = {}
    used: set[str] = set()
    fused = fused_layout(cfg) if cfg.fused_checkpoint else {}
    missing, mismatched = [], []
    for name in [*names, *([] if "lm_head.weight" in names else ["lm_head.weight"])]:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            if name in by_name:
                used.add(by_name[name])  # some tied checkpoints store a copy; the tie wins
            continue
        if name.endswith(_EXPERT_NAMES):
            problems = (missing, mismatched, used)
            key = _expert_source(name, by_name, index, shapes[name], cfg.gpt_oss_moe, problems)
            if key is not None:
                plan[name] = (key, None)
            continue
        key, rows, total = by_name.get(name), None, None
        for fused_suffix, (fused_rows, parts) in fused.items():
            for part, part_rows in parts.items():
                if key is None and name.endswith(part):
                    key = by_name.get(name[: -len(part)] + fused_suffix)
                    rows, total = part_rows, fused_rows
        if key is None:
            missing.append(name)
            continue
        used.add(key)
        stored = _stored_shape(index, key, path)
        expected = shapes[name] if rows is None else (total, *shapes[name][1:])
        if stored != expected:
            mismatched.append(f"{key}: checkpoint {list(stored)} vs model {list(expected)}")
            continue
        plan[name] = (key, rows)
    unexpected = [k for k, canon in ((k, canonical_name(k)) for k in index.shapes) if canon and k not in used]
    unexpected = [k for k in unexpected if not any(k.endswith(p) for p in _BNB_PARTS)]
    if missing or mismatched or unexpected:
        problems = []
        for label, items in (
            ("missing tensors", missing),
            ("shape mismatches", mismatched),
            ("unexpected tensors", unexpected),
        ):
            if items:
                shown = ", ".join(items[:12]) + (f" (+{len(items) - 12} more)" if len(items) > 12 else "")
                problems.append(f"{label}: {shown}")
        raise KindredFormatError(
            f"{path}: the checkpoint does not match its {cfg.model_type} config.json — " + "; ".join(problems)
        )
    return plan, bnb


_EXPERT_NAMES = (".experts.gate_up_proj.weight", ".experts.down_proj.weight")
# The per-expert tensors (the hub's layout) that make up each fused projection, concatenated along rows.
_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclasses.dataclass(frozen=True)
class _Experts:
    """Where a layer's [E, out, in] expert projection is stored: "fused" (one [E, out, in] tensor,
    transformers v5's Qwen3 MoE), "transposed" (one [E, in, out], gpt-oss in bf16), "mxfp4" (gpt-oss'
    blocks and scales of [E, out, in]) or "stack" (keys[e] the per-expert parts, the hub's Qwen3 MoE)."""

    kind: str
    keys: tuple

    def read(self, index: _Index) -> torch.Tensor:
        if self.kind == "stack":
            return torch.stack([torch.cat([index.read(k) for k in parts]) for parts in self.keys])
        if self.kind == "mxfp4":
            return dequantize_mxfp4(index.read(self.keys[0]), index.read(self.keys[1]), name=self.keys[2])
        w = index.read(self.keys[0])
        return w.transpose(1, 2) if self.kind == "transposed" else w


def _expert_source(name, by_name, index, shape, transposed, problems) -> _Experts | None:
    """The _Experts of parameter ``name`` (shape [E, out, in]); what is missing or mis-shaped goes to
    ``problems`` ("missing", "mismatched", "used" lists) with the tensor's name and expected shape."""
    missing, mismatched, used = problems
    prefix, proj = name[: -len(".weight")].rsplit(".", 1)
    base = f"{prefix}.{proj}"
    experts, out, k = shape
    if f"{base}_blocks" in by_name or f"{base}_scales" in by_name:
        blocks, scales = by_name.get(f"{base}_blocks"), by_name.get(f"{base}_scales")
        used.update(key for key in (blocks, scales) if key is not None)
        expected = [experts, out, k // MXFP4_BLOCK]
        if blocks is None or scales is None:
            part = "blocks" if blocks is None else "scales"
            missing.append(f"{base}_{part} {[*expected, MXFP4_BLOCK // 2] if blocks is None else expected}")
            return None
        try:
            got = mxfp4_shape(index.shapes[blocks], index.shapes[scales], blocks[: -len("_blocks")])
        except KindredFormatError as e:
            mismatched.append(str(e))
            return None
        if got != tuple(shape):
            mismatched.append(
                f"{blocks}: checkpoint {list(index.shapes[blocks])} vs model {[*expected, MXFP4_BLOCK // 2]}"
            )
            return None
        return _Experts("mxfp4", (blocks, scales, base))
    fused = by_name.get(base)
    if fused is not None:
        used.add(fused)
        want = (experts, k, out) if transposed else tuple(shape)
        if index.shapes[fused] != want:
            mismatched.append(f"{fused}: checkpoint {list(index.shapes[fused])} vs model {list(want)}")
            return None
        return _Experts("transposed" if transposed else "fused", (fused,))
    parts = _EXPERT_PARTS[proj]
    rows = out // len(parts)
    keys, ok = [], True
    for e in range(experts):
        row = []
        for part in parts:
            key = by_name.get(f"{prefix}.{e}.{part}.weight")
            if key is None:
                missing.append(f"{prefix}.{e}.{part}.weight {[rows, k]}")
                ok = False
                continue
            used.add(key)
            if index.shapes[key] != (rows, k):
                mismatched.append(f"{key}: checkpoint {list(index.shapes[key])} vs model {[rows, k]}")
                ok = False
            row.append(key)
        keys.append(tuple(row))
    return _Experts("stack", tuple(keys)) if ok else None


def fused_layout(cfg: DecoderConfig) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """Rows of Phi-3/4's fused tensors and of their parts: qkv_proj = [q; k; v], gate_up_proj = [gate; up]."""
    q, kv, ff = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": ff, "up_proj": ff}
    out = {}
    for fused, parts in FUSED_LINEARS.items():
        start, spans = 0, {}
        for part in parts:
            n = rows[part.rsplit(".", 1)[1]]
            spans[part + ".weight"], start = (start, start + n), start + n
        out[fused + ".weight"] = (start, spans)
    return out


def _stored_shape(index: _Index, key: str, path: Path) -> tuple[int, ...]:
    """The logical shape of a checkpoint tensor (a bnb 4-bit weight's shape is in its quant state)."""
    if key + _BNB_STATE not in index.shapes:
        return index.shapes[key]
    state = parse_bnb_state(index.read(key + _BNB_STATE), key + _BNB_STATE, str(index.where(key)))
    return tuple(state["shape"])
