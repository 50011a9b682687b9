"""Merged weights: a LoRA adapter folded into its base, written as a Hugging Face model folder that
transformers, vLLM and kindred load (sharded safetensors + index, config.json, tokenizer files, chat
template, generation_config.json whose ``eos_token_id`` lists every end-of-turn id).

The update s·B·A is added in float32 onto the **original 16-bit base** when one is available: the base
checkpoint is read tensor by tensor and written in its own layout (its key names, Gemma 3's vision tower
and projector carried through unchanged, Phi's fused ``qkv_proj`` / ``gate_up_proj`` with the parts'
updates stacked), so the peak memory is about one output shard. Merging onto the weights the adapter was
trained against — the base quantized as kindred loaded it (``onto="nf4"`` / ``"int4g"``), a bitsandbytes
4-bit checkpoint, a GGUF — is available but costs quality on ordinary models, so it is asked for
explicitly (``allow_quantized_base``) and warned about.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..data import load_tokenizer
from ..data.tokenizers import TOKENIZER_FILES, save_tokenizer_files
from ..errors import KindredFormatError, KindredValueError
from ..formats.bnb import nf4_from_bnb
from ..formats.checkpoint import canonical_name, fused_parts, shard_files
from ..formats.peft import pattern_value, read_adapter
from ..models import LINEAR_NAMES, DecoderConfig, load_config
from ..models.loading import fused_layout
from ..nn import Linear4bit, LoraLinear, lora_modules
from ..ops.lora import lora_scaling
from ..ops.quant import INT4G_DEFAULT_GROUP, NF4_DEFAULT_BLOCKSIZE, quantize_int4g, quantize_nf4
from .files import DEFAULT_SHARD_BYTES, ShardWriter, atomic_folder

QUANTIZED_BASE_WARNING = (
    "merging onto dequantized 4-bit weights: the merged model carries the base's quantization error "
    "(it regresses ordinary models; merge onto the original 16-bit base where you have it)"
)
# transformers' class of each model_type kindred exports (config.json's "architectures").
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
}
_BNB = ".quant_state.bitsandbytes__"
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
ONTO = (None, "nf4", "int4g")


@dataclass(frozen=True)
class Delta:
    """One module's LoRA update s·B·A [N, K], computed in float32 when asked for."""

    shape: tuple[int, int]
    compute: Callable[[], torch.Tensor]


def adapter_deltas(adapter: str | Path) -> dict[str, Delta]:
    """The update of every module of a PEFT adapter folder, keyed by the decoder's module name."""
    config, tensors = read_adapter(adapter)
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    out = {}
    for name, parts in tensors.items():
        r = pattern_value(config.get("rank_pattern") or {}, name, r0)
        s = lora_scaling(r, pattern_value(config.get("alpha_pattern") or {}, name, alpha0), rslora)
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != r or b.shape[1] != r or a.dim() != 2 or b.dim() != 2:
            raise KindredFormatError(
                f"{adapter}: {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} != r={r}"
            )
        out[canonical_name(name) or name] = Delta(
            (b.shape[0], a.shape[1]), lambda a=a, b=b, s=s: s * (b.float() @ a.float())
        )
    return out


def model_deltas(model: nn.Module) -> dict[str, Delta]:
    """The update of every LoRA layer of ``model`` (its active or merged adapter; none when disabled), as
    fp32 on the host, where the base tensors it is added to are read."""
    out = {}
    for name, m in lora_modules(model).items():
        if m.disabled and m.merged_adapter is None:
            continue
        adapter = m.merged_adapter or m.active_adapter
        out[name] = Delta(
            (m.out_features, m.in_features), lambda m=m, a=adapter: m.delta_weight(a).detach().float().cpu()
        )
    return out


class _Plan:
    """Which base tensor gets which update; every update must land somewhere (else: another base)."""

    def __init__(self, deltas: dict[str, Delta], cfg: DecoderConfig, source: str):
        self.deltas, self.cfg, self.source = deltas, cfg, source
        self.used: set[str] = set()

    def delta(self, key: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor] | None:
        """The update of checkpoint tensor ``key`` (shape ``shape``), or None."""
        canon = canonical_name(key)
        if canon is None or not canon.endswith(".weight"):
            return None
        module = canon[: -len(".weight")]
        if module in self.deltas:
            d = self.deltas[module]
            self._check(module, d.shape, shape)
            self.used.add(module)
            return d.compute
        parts = fused_parts(module)
        if parts is None or not any(p in self.deltas for p in parts):
            return None
        suffix = module.split(".", 3)[-1] + ".weight"  # e.g. self_attn.qkv_proj.weight
        total, spans = fused_layout(self.cfg)[suffix]
        self._check(module, (total, shape[1]), shape)
        pieces = []
        for p in parts:
            lo, hi = spans[p.split(".", 3)[-1] + ".weight"]
            if p in self.deltas:
                self._check(p, self.deltas[p].shape, (hi - lo, shape[1]))
                self.used.add(p)
                pieces.append(self.deltas[p].compute)
            else:
                pieces.append(lambda n=hi - lo: torch.zeros(n, shape[1]))
        return lambda: torch.cat([f() for f in pieces])

    def _check(self, name: str, got: tuple, want: tuple) -> None:
        if tuple(got) != tuple(want):
            raise KindredFormatError(
                f"{self.source}: the adapter's {name} updates a {list(got)} weight, the base's is "
                f"{list(want)}: an adapter for another base?"
            )

    def check_all_used(self) -> None:
        unused = sorted(set(self.deltas) - self.used)
        if unused:
            raise KindredFormatError(
                f"{self.source}: no base tensor for the adapter's module '{unused[0]}' "
                f"({len(unused)} in all): an adapter for another base?"
            )


def _as_trained(w: torch.Tensor, onto: str, opts: dict) -> torch.Tensor:
    """What kindred's loader made of a 16-bit linear weight when it quantized it (dequantized, float32)."""
    w = w.contiguous()
    if onto == "nf4":
        return quantize_nf4(w, opts["blocksize"], opts["double_quant"]).dequantize(torch.float32)
    return quantize_int4g(w, opts["group_size"]).dequantize(torch.float32)


def _is_linear(canon: str | None) -> bool:
    if canon is None or not canon.endswith(".weight"):
        return False
    name = canon[: -len(".weight")]
    return name.rsplit(".", 1)[-1] in LINEAR_NAMES or fused_parts(name) is not None


def _stream(base: Path, plan: _Plan, writer: ShardWriter, onto, opts, allow_quantized: bool) -> torch.dtype:
    """Every tensor of ``base`` into ``writer``, updates added; returns the dtype of the weights written."""
    files = shard_files(base)
    with contextlib.ExitStack() as stack:
        handles = []
        for f in files:
            try:
                handles.append((f, stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))))
            except (SafetensorError, OSError) as e:
                raise KindredFormatError(f"{f}: not a readable safetensors file ({e})") from None
        keys = {k: (f, h) for f, h in handles for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        bnb = {k.split(_BNB)[0] for k in keys if _BNB in k}
        if bnb and not allow_quantized:
            raise KindredValueError(
                f"{base}: a bitsandbytes 4-bit checkpoint has no 16-bit weights to merge onto; pass the "
                "original 16-bit base (--base), or merge onto its dequantized weights: --allow-quantized-base"
            )
        shapes = {}
        for k, (_, h) in keys.items():
            if k in bnb:
                shapes[k] = tuple(_bnb_state(h, k)["shape"])
            elif not _is_bnb_part(k, bnb):
                shapes[k] = tuple(h.get_slice(k).get_shape())
        updates = {k: plan.delta(k, s) for k, s in shapes.items()}  # checks every shape before any work
        plan.check_all_used()
        dtypes = set()
        for k in shapes:
            f, h = keys[k]
            if k in bnb:
                parts = {k + p: h.get_tensor(k + p) for p in ("", *_BNB_PARTS) if k + p in keys}
                parts.update({q: h.get_tensor(q) for q in keys if q.startswith(k + _BNB)})
                q = nf4_from_bnb(parts, k, source=str(f))
                w, dtype = q.dequantize(torch.float32).reshape(q.shape), q.dtype
            else:
                w = h.get_tensor(k)
                dtype = w.dtype
                if onto is not None and _is_linear(canonical_name(k)):
                    w = _onto_parts(k, w, plan.cfg, onto, opts)
            if updates[k] is not None:
                w = w.float() + updates[k]()
            if _is_linear(canonical_name(k)):
                dtypes.add(dtype)
            writer.add(k, w.to(dtype))
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _onto_parts(key: str, w: torch.Tensor, cfg: DecoderConfig, onto: str, opts: dict) -> torch.Tensor:
    """The loader quantizes a fused Phi tensor part by part: so does the merge onto it."""
    module = canonical_name(key)[: -len(".weight")]
    if fused_parts(module) is None:
        return _as_trained(w, onto, opts)
    _, spans = fused_layout(cfg)[module.split(".", 3)[-1] + ".weight"]
    return torch.cat([_as_trained(w[lo:hi], onto, opts) for lo, hi in spans.values()])


def _is_bnb_part(key: str, bnb: set[str]) -> bool:
    return any(key.startswith(b + p) for b in bnb for p in (*_BNB_PARTS, _BNB))


def _bnb_state(h, key: str) -> dict:
    state = next(k for k in h.keys() if k.startswith(key + _BNB))  # noqa: SIM118
    return json.loads(bytes(h.get_tensor(state).tolist()).decode("utf-8"))


def end_of_turn_ids(tokenizer, cfg: DecoderConfig, template: str | None = None) -> list[int]:
    """Every id generation must stop at: the template's end-of-turn token (every known template's when
    ``template`` is None) and the tokenizer's and config's end tokens."""
    from ..generate import stop_token_ids

    ids = stop_token_ids(tokenizer, template) if tokenizer is not None else []
    return ids + [i for i in cfg.eos_token_ids if i not in ids]


def write_side_files(
    out: Path,
    hf_config: dict,
    tokenizer=None,
    *,
    source: Path | None = None,
    chat_template: str | None = None,
    template: str | None = None,
    dtype: torch.dtype | None = None,
    quantization_config: dict | None = None,
) -> dict:
    """config.json (``quantization_config`` replacing the base's), the tokenizer files (``source``'s, else
    ``tokenizer``'s), a ``chat_template.jinja`` when none came with them, and generation_config.json;
    returns the config."""
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (out / name).write_bytes((source / name).read_bytes())
        if tokenizer is None and any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            tokenizer = load_tokenizer(source)
    elif tokenizer is not None:
        save_tokenizer_files(tokenizer, out)
    has_template = (out / "chat_template.jinja").is_file() or "chat_template" in _json(
        out / "tokenizer_config.json"
    )
    if chat_template and not has_template:
        (out / "chat_template.jinja").write_text(chat_template)
    cfg = load_config(config)
    gen = _json(source / "generation_config.json") if source is not None and source.is_dir() else {}
    gen.update(
        {
            k: v
            for k, v in (("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id))
            if v is not None
        }
    )
    previous = gen.get("eos_token_id")
    previous = [previous] if isinstance(previous, int) else list(previous or [])
    eos = end_of_turn_ids(tokenizer, cfg, template)
    gen["eos_token_id"] = previous + [i for i in eos if i not in previous]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return config


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _dense(module: nn.Module) -> torch.Tensor:
    """W + s·B·A (summed in float32) of a LoRA layer, dequant(W) of a 4-bit one, in the base's dtype."""
    if isinstance(module, LoraLinear):
        if module.merged_adapter is not None and isinstance(module.base_layer, nn.Linear):
            return module.base_layer.weight.detach()  # merged in place: already W + s·B·A
        if module.disabled:
            return _dense(module.base_layer)
        return module.merged_weight()
    if isinstance(module, Linear4bit):
        return module.dequantize()
    return module.weight.detach()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in transformers' names, adapters merged in float32, 4-bit weights dequantized (the
    model itself is not changed). Phi-3/4 get their fused ``qkv_proj`` / ``gate_up_proj`` back."""
    out: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, Linear4bit))}
    linears = {n: m for n, m in linears.items() if not n.endswith(".base_layer")}  # inside a LoraLinear
    for name, module in linears.items():
        base = module.base_layer if isinstance(module, LoraLinear) else module
        out[f"{name}.weight"] = _dense(module)
        if getattr(base, "bias", None) is not None:
            out[f"{name}.bias"] = base.bias.detach()
    skip = tuple(f"{n}." for n in linears)
    for name, t in model.state_dict(keep_vars=False).items():
        if not name.startswith(skip) and name not in out:
            out[name] = t.detach()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if model.config.fused_checkpoint:
        for layer in range(model.config.num_layers):
            p = f"model.layers.{layer}."
            for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
                parts = fused_parts(p + fused)
                out[f"{p}{fused}.weight"] = torch.cat([out.pop(f"{q}.weight") for q in parts])
    return {k: v.contiguous().cpu() for k, v in out.items() if not k.endswith("inv_freq")}


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())


def save_merged(
    model: nn.Module,
    hf_config: dict,
    path: str | Path,
    tokenizer=None,
    *,
    base: str | Path | None = None,
    onto: str | None = None,
    allow_quantized_base: bool = False,
    chat_template: str | None = None,
    template: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` with its LoRA updates merged to the folder ``path`` (see the module docstring).

    base: the model folder the model was loaded from; its 16-bit tensors are what the updates are added to
    (``onto`` "nf4" / "int4g": to their quantized-dequantized form, as the adapter was trained). Without a
    folder (a GGUF base, a model built in memory) the model's own weights are written, dequantized if 4-bit.
    """
    if onto not in ONTO:
        raise KindredValueError(f"onto must be one of {ONTO}, got {onto!r}")
    base = Path(base) if base is not None else None
    folder = base is not None and base.is_dir()
    if (onto is not None or (not folder and _quantized(model))) and not allow_quantized_base:
        raise KindredValueError(
            "the merge would be onto dequantized 4-bit weights: pass the 16-bit base folder, or allow it "
            "explicitly (allow_quantized_base=True, --allow-quantized-base)"
        )
    if model.config.multimodal and not folder:
        raise KindredValueError(
            "a Gemma 3 multimodal model is merged from its base folder (the vision tower is not in the "
            "decoder): pass base="
        )
    with atomic_folder(path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        if folder:
            plan = _Plan(model_deltas(model), model.config, str(base))
            dtype = _stream(base, plan, writer, onto, _QUANT_OPTS, allow_quantized_base)
        else:
            tensors = merged_state_dict(model)
            for k, t in tensors.items():
                writer.add(k, t)
            dtype = next(iter(tensors.values())).dtype
        if onto is not None or (_quantized(model) and not folder):
            warnings.warn(QUANTIZED_BASE_WARNING, stacklevel=2)
        writer.finish()
        write_side_files(
            tmp,
            hf_config,
            tokenizer,
            source=base if folder else None,
            chat_template=chat_template,
            template=template,
            dtype=dtype,
        )
    return Path(path)


_QUANT_OPTS = {"blocksize": NF4_DEFAULT_BLOCKSIZE, "double_quant": True, "group_size": INT4G_DEFAULT_GROUP}


def merge_adapter(
    adapter: str | Path,
    base: str | Path,
    path: str | Path,
    *,
    onto: str | None = None,
    allow_quantized_base: bool = False,
    template: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Merge a PEFT adapter folder into the base model folder ``base`` without loading the model: the base
    streamed tensor by tensor, the updates read from the adapter (peak memory: about one output shard)."""
    base = Path(base)
    if onto not in ONTO:
        raise KindredValueError(f"onto must be one of {ONTO}, got {onto!r}")
    if not (base / "config.json").is_file():
        raise KindredValueError(f"--base {base}: not a model folder (no config.json)")
    if onto is not None and not allow_quantized_base:
        raise KindredValueError(
            f"--onto {onto}: merging onto dequantized 4-bit weights costs quality; add "
            "--allow-quantized-base to do it anyway"
        )
    hf_config = json.loads((base / "config.json").read_text())
    cfg = load_config(hf_config)
    plan = _Plan(adapter_deltas(adapter), cfg, str(adapter))
    with atomic_folder(path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        dtype = _stream(base, plan, writer, onto, _QUANT_OPTS, allow_quantized_base)
        if onto is not None or "quantization_config" in hf_config:
            warnings.warn(QUANTIZED_BASE_WARNING, stacklevel=2)
        writer.finish()
        write_side_files(tmp, hf_config, source=base, template=template, dtype=dtype)
    return Path(path)
