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
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import KindredFormatError, KindredValueError
from ..formats.bnb import nf4_from_bnb, parse_bnb_state
from ..formats.checkpoint import shard_files
from ..nn.linear4bit import Linear4bit
from ..ops.quant import INT4G_DEFAULT_GROUP, NF4_DEFAULT_BLOCKSIZE, quantize_int4g, quantize_nf4
from ..weights import NF4Weight
from .config import LINEAR_NAMES, DecoderConfig, load_config
from .decoder import DecoderLM

QUANTS = (None, "nf4", "int4g")
_BNB_STATE = ".quant_state.bitsandbytes__nf4"
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", _BNB_STATE)
_BNB_OTHER = re.compile(r"\.quant_state\.bitsandbytes__(?!nf4$)\w+$")  # FP4 and other 4-bit types
# Checkpoint name prefixes of Gemma 3's multimodal layout (transformers v4 and v5) -> kindred's names.
_RENAMES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_SKIPPED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.|\.rotary_emb\.inv_freq$")
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
        if name.endswith("norm.weight"):
            return (torch.zeros if cfg.gemma_norm else torch.ones)(shape, device=device, dtype=dtype)
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
        check_layer_count(cfg, (_canonical(k) for k in index.shapes), r"model\.layers\.(\d+)\.", path)
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

        return _materialize(model, names, fetch, fetch_bnb if bnb else None, quant, opts, dtype, device)


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
        if isinstance(module, nn.Linear) and mod_name.rsplit(".", 1)[-1] in LINEAR_NAMES:
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


def _canonical(key: str) -> str | None:
    """kindred's name for a checkpoint key, or None for tensors the decoder does not use."""
    if _SKIPPED.search(key):
        return None
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _plan(index: _Index, cfg: DecoderConfig, names: list[str], shapes: dict, path: Path):
    """Map each model parameter to (checkpoint key, row range or None); check names and shapes up front."""
    by_name: dict[str, str] = {}
    for key in index.shapes:
        if any(key.endswith(p) for p in _BNB_PARTS):
            continue
        canon = _canonical(key)
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
    fused = _fused_parts(cfg) if cfg.fused_checkpoint else {}
    missing, mismatched = [], []
    for name in [*names, *([] if "lm_head.weight" in names else ["lm_head.weight"])]:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            if name in by_name:
                used.add(by_name[name])  # some tied checkpoints store a copy; the tie wins
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
    unexpected = [k for k, canon in ((k, _canonical(k)) for k in index.shapes) if canon and k not in used]
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


def _fused_parts(cfg: DecoderConfig) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """Rows of Phi-3/4's fused tensors and of their parts: qkv_proj = [q; k; v], gate_up_proj = [gate; up]."""
    q, kv, ff = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    qkv = {"self_attn.q_proj.weight": (0, q), "self_attn.k_proj.weight": (q, q + kv)}
    qkv["self_attn.v_proj.weight"] = (q + kv, q + 2 * kv)
    gate_up = {"mlp.gate_proj.weight": (0, ff), "mlp.up_proj.weight": (ff, 2 * ff)}
    return {"self_attn.qkv_proj.weight": (q + 2 * kv, qkv), "mlp.gate_up_proj.weight": (2 * ff, gate_up)}


def _stored_shape(index: _Index, key: str, path: Path) -> tuple[int, ...]:
    """The logical shape of a checkpoint tensor (a bnb 4-bit weight's shape is in its quant state)."""
    if key + _BNB_STATE not in index.shapes:
        return index.shapes[key]
    state = parse_bnb_state(index.read(key + _BNB_STATE), key + _BNB_STATE, str(index.where(key)))
    return tuple(state["shape"])
