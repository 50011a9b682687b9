"""GGUF export for llama.cpp (and Ollama): the container through gguf-py's ``GGUFWriter``, the blocks through
kindred's C++ quantizers (byte-identical to llama.cpp's reference ones), each tensor's type by llama.cpp's
rules for the chosen file type (``kindred.plan.memory.gguf_tensor_type``, the one definition).

Architectures: llama (Llama 3.x, SmolLM2), mistral (written as llama, as llama.cpp's converter does), qwen3,
phi3 (Phi-3/Phi-4: fused ``attn_qkv`` and gate+up ``ffn_up``) and gemma3. LoRA adapters are merged (in
float32) and 4-bit weights dequantized first. llama.cpp's converter conventions kept here: q/k rows permuted
for the llama architecture (its rotary pairs adjacent features), Gemma's RMSNorm weights stored as 1 + w,
norms and biases in F32, Llama 3 rope scaling as a ``rope_freqs`` tensor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import refuse_symlink, write_error
from ..errors import KindredValueError
from ..models.config import SLIDING
from ..nn import Linear4bit, LoraLinear
from ..ops.gguf import quantize_gguf
from ..plan.memory import GGUF_MIXES, gguf_tensor_type
from .gguf_types import GGUF_QUANTS
from .gguf_vocab import vocab_metadata

_FILE_TYPE = {
    "F32": 0,
    "F16": 1,
    "Q8_0": 7,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}  # llama_ftype
_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen3": "QWEN3", "phi3": "PHI3", "gemma3_text": "GEMMA3"}
# general.name when none is given. llama.cpp keys tokenizer quirks on it (a name holding "phi3" makes it look
# up Phi-3's "</s>" and "<unk>", which Phi-4's vocabulary lacks), so the family alone is not used.
_DISPLAY = {"llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3", "phi3": "Phi", "gemma3_text": "Gemma 3"}
# Quantizable matrices by their GGUF name within a block (llama.cpp's tensor categories); others stay F32.
_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote: the file, its size, the type of every tensor and the time taken."""

    path: Path
    quant: str
    size_bytes: int
    tensor_types: dict[str, str]
    seconds: float
    add_bos: bool  # tokenizer.ggml.add_bos_token: llama.cpp puts BOS before every prompt


def check_output(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a Path, or KindredValueError when it exists (without ``overwrite``) or has no folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KindredValueError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise KindredValueError(f"{path.parent}: no such folder for {path.name}")
    return path


def check_quant(quant: str) -> str:
    key = str(quant).strip().upper().replace("-", "_")
    if key not in GGUF_QUANTS:
        raise KindredValueError(f"quant: unknown GGUF file type {quant!r}; known: {', '.join(GGUF_QUANTS)}")
    return key


def tensor_type(quant: str, name: str, shape: tuple[int, ...], n_layers: int, tied: bool) -> str:
    """The ggml type llama-quantize gives tensor ``name`` (GGUF name, torch ``shape``) in a ``quant`` file."""
    if len(shape) < 2 or not name.endswith(".weight") or "_norm" in name or name == "rope_freqs.weight":
        return "F32"
    k_in = shape[-1]
    if quant not in GGUF_MIXES:  # F32, F16, BF16: every matrix in that type
        return quant
    parts = name.split(".")
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        role, layer = "output", 0
    elif name == "token_embd.weight":
        role, layer = "token_embd", 0
    elif parts[0] == "blk" and parts[2] in _ROLES:
        role, layer = parts[2], int(parts[1])
    else:
        raise KindredValueError(f"{name}: no llama.cpp quantization rule for this tensor")
    return gguf_tensor_type(quant, role, layer, n_layers, k_in)


@dataclass(frozen=True)
class Pending:
    """A tensor made only when it is written (:func:`write_tensors`), so that an export holds a few dense
    tensors at a time rather than a float32 copy of the whole model."""

    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    def then(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Pending:
        """This tensor with ``f`` applied (``f`` keeps the shape)."""
        return Pending(self.shape, lambda: f(self.make()))


def _dense(module: nn.Module, merge: bool) -> torch.Tensor:
    """The weight llama.cpp should see: adapters merged in float32 (or left out), 4-bit bases dequantized,
    a plain weight as it is (its own dtype: GGUF blocks are quantized from float16 or bfloat16 as exactly)."""
    if isinstance(module, LoraLinear) and merge and module.merged_adapter is None:
        return module.merged_weight().float()
    if isinstance(module, LoraLinear):
        return _dense(module._quantized_base or module.base_layer, merge)
    if isinstance(module, Linear4bit):
        return module.dequantize().float()
    return module.weight.detach()


def _on_cpu(make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: make().detach().cpu().contiguous()


def hf_tensors(model: nn.Module, merge: bool = True) -> dict[str, Pending]:
    """The model's tensors in transformers' names, each made on the CPU when asked for (linear weights in
    their own dtype or float32, the rest as stored), adapters merged unless ``merge`` is False (then the base
    alone, for a GGUF LoRA beside it); the model is unchanged."""
    out: dict[str, Pending] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, Linear4bit))}
    linears = {n: m for n, m in linears.items() if not n.endswith(".base_layer")}
    for name, module in linears.items():
        shape = (module.out_features, module.in_features)
        out[f"{name}.weight"] = Pending(shape, _on_cpu(lambda m=module: _dense(m, merge)))
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if getattr(base, "bias", None) is not None:
            out[f"{name}.bias"] = Pending(tuple(base.bias.shape), _on_cpu(lambda b=base.bias: b))
    skip = tuple(f"{n}." for n in linears)
    for name, t in model.state_dict().items():
        if not name.startswith(skip) and name not in out and not name.endswith("inv_freq"):
            out[name] = Pending(tuple(t.shape), _on_cpu(lambda t=t: t))
    return out


def _cat(parts: list[Pending]) -> Pending:
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return Pending(shape, lambda: torch.cat([p.make() for p in parts]))


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture: (head, half, pair) -> (head, pair, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_names(cfg):
    """gguf-py's map from transformers' module names to GGUF tensor names for the family of ``cfg``."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[_ARCH[cfg.model_type]], cfg.num_layers)


def permutes_qk(cfg) -> bool:
    return _ARCH[cfg.model_type] == "LLAMA"


def gguf_tensors(model: nn.Module, merge: bool = True) -> dict[str, Pending]:
    """GGUF name -> tensor to make (torch shape) in llama.cpp's layout, in the order llama.cpp expects."""
    cfg = model.config
    names = tensor_names(cfg)
    hf = hf_tensors(model, merge)
    if cfg.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    if cfg.model_type == "phi3":  # llama.cpp's phi3 reads the fused tensors of the checkpoint
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            qkv = [hf.pop(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"]
            hf[f"{p}.self_attn.qkv_proj.weight"] = _cat(qkv)
            gate_up = [hf.pop(f"{p}.mlp.{x}_proj.weight") for x in ("gate", "up")]
            hf[f"{p}.mlp.gate_up_proj.weight"] = _cat(gate_up)
    out: dict[str, Pending] = {}
    for key, t in hf.items():
        stem, _, suffix = key.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise KindredValueError(f"{key}: no GGUF tensor name for this parameter ({cfg.model_type})")
        if cfg.gemma_norm and stem.endswith("norm"):
            t = t.then(lambda v: v.float() + 1)  # llama.cpp's gemma norms multiply by w, kindred's by 1 + w
        if permutes_qk(cfg) and stem.endswith(("q_proj", "k_proj")):
            heads = cfg.num_heads if stem.endswith("q_proj") else cfg.num_kv_heads
            t = t.then(lambda v, h=heads: permute_qk(v, h))
        out[f"{name}.{suffix}"] = t
    factors = _rope_factors(model)
    if factors is not None:
        out["rope_freqs.weight"] = Pending(tuple(factors.shape), lambda: factors)

    def order(name: str) -> tuple:
        parts = name.split(".")
        return (
            (1, int(parts[1]), name) if parts[0] == "blk" else (0 if name.startswith("token") else 2, 0, name)
        )

    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


def _rope_factors(model: nn.Module) -> torch.Tensor | None:
    """Llama 3's rope scaling as llama.cpp stores it: per frequency, the divisor of the unscaled one."""
    rope = model.config.rope
    if rope.rope_type == "default":
        return None
    if rope.rope_type != "llama3":
        raise KindredValueError(
            f"rope_type {rope.rope_type!r}: GGUF export writes default and llama3 rope scaling only"
        )
    dim = model.config.rotary_dim
    base = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (base / model.model.rotary.inv_freq.double().cpu()).float()


def _metadata(w, model: nn.Module, arch: str) -> None:
    """The architecture's hyperparameters, as llama.cpp's converter writes them."""
    cfg = model.config
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window and arch in ("gemma3", "phi3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3" and cfg.sliding_window:  # which layers are windowed, and their rope base
        w.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
        w.add_rope_freq_base_swa(cfg.rope_local.theta)
    if arch == "gemma3" and cfg.rope.rope_type == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope.factor)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def check_model(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _ARCH:
        raise KindredValueError(
            f"model: a kindred DecoderLM of a supported family is needed ({', '.join(_ARCH)}), "
            f"got {type(model).__name__}"
        )
    if cfg.model_type == "phi3" and cfg.rope.rope_type != "default":
        raise KindredValueError(
            f"phi3: rope_type {cfg.rope.rope_type!r} (Phi-3 long context) is not written by the GGUF export "
            "yet; models with default rope (Phi-4, Phi-3 4k) are"
        )
    if cfg.model_type == "gemma3_text" and cfg.attn_scale != cfg.head_dim**-0.5 and cfg.num_layers != 62:
        raise KindredValueError(
            f"gemma3: query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from head_dim "
            f"{cfg.head_dim}; llama.cpp scales attention by head_dim (by hidden/heads for the 27B only)"
        )
    if cfg.rope.rope_type not in ("default", "llama3") and cfg.model_type != "gemma3_text":
        raise KindredValueError(
            f"{cfg.model_type}: rope_type {cfg.rope.rope_type!r} is not written by the GGUF export"
        )


def export_gguf(
    model,
    path: str | Path,
    quant: str = "Q4_K_M",
    *,
    tokenizer=None,
    chat_template: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    merge_adapters: bool = True,
) -> GGUFExport:
    """Write ``model`` (a DecoderLM, LoRA adapters merged; or a .gguf / Hugging Face folder to load) to
    ``path`` as a llama.cpp GGUF file of file type ``quant`` (GGUF_QUANTS).

    ``tokenizer``: a kindred tokenizer, a ``tokenizers.Tokenizer``, a tokenizer file or folder, or a GGUF file
    whose ``tokenizer.*`` keys are copied; by default the source's own. ``chat_template``: the Jinja template
    stored as ``tokenizer.chat_template`` (default: the tokenizer source's). ``merge_adapters=False`` writes
    the base alone (for :func:`kindred.export.gguf_lora.export_gguf_lora` beside it). Errors before any work.
    """
    import gguf

    quant = check_quant(quant)
    path = check_output(path, overwrite)
    source = None
    if isinstance(model, (str, Path)):
        source = Path(model)
        model = _load(source)
    check_model(model)
    tok_source = tokenizer if tokenizer is not None else source
    if tok_source is None:
        raise KindredValueError(
            "tokenizer: needed for a model given in memory (a tokenizer, file or GGUF file)"
        )
    start = time.perf_counter()
    cfg = model.config
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[_ARCH[cfg.model_type]]]
    vocab = vocab_metadata(tok_source, cfg, chat_template)
    with torch.no_grad():
        tensors = gguf_tensors(model, merge_adapters)
    types = {
        n: tensor_type(quant, n, tuple(t.shape), cfg.num_layers, "output.weight" not in tensors)
        for n, t in tensors.items()
    }
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or f"{_DISPLAY[cfg.model_type]} fine-tune (kindred)")
    _metadata(w, model, arch)
    w.add_file_type(_FILE_TYPE[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (kind, value) in vocab.items():  # kind: a value type, or (ARRAY, element type)
        w.add_key_value(key, value, *(kind if isinstance(kind, tuple) else (kind,)))
    write_tensors(w, tensors, types, tmp, path)
    add_bos = bool(vocab.get("tokenizer.ggml.add_bos_token", (None, False))[1])
    return GGUFExport(path, quant, path.stat().st_size, types, time.perf_counter() - start, add_bos)


def _load(source: Path):
    from .. import models

    if source.suffix == ".gguf":
        return models.from_gguf(source, dtype=torch.float32)
    if not source.is_dir():
        raise KindredValueError(f"{source}: not a GGUF file or a model folder")
    return models.from_pretrained(source, dtype=torch.float32)


__all__ = ["GGUF_QUANTS", "GGUFExport", "export_gguf", "tensor_type"]


def write_tensors(w, tensors: dict, types: dict[str, str], tmp: Path, path: Path) -> None:
    """Write the GGUFWriter ``w``'s file ``tmp`` (its keys already added) with ``tensors`` (torch tensors or
    :class:`Pending`) in their GGUF ``types``, blocks by kindred's quantizers, then move it to ``path``.

    The tensor infos go first (their sizes follow from shape and type), then each tensor is made and
    quantized while the one before it is written, so one or two are in memory at a time."""
    import gguf

    for n, t in tensors.items():
        qtype = gguf.GGMLQuantizationType[types[n]]
        shape, numel = tuple(t.shape), math.prod(t.shape)
        if types[n] == "F32":
            w.add_tensor_info(n, shape, np.dtype(np.float32), numel * 4)
        else:
            elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(n, shape, np.dtype(np.float32), numel // elems * nbytes, raw_dtype=qtype)

    def block_bytes(n: str) -> np.ndarray:
        with torch.no_grad():  # grad mode is per thread
            t = tensors[n].make() if isinstance(tensors[n], Pending) else tensors[n]
            if types[n] == "F32":
                return t.float().numpy()
            return quantize_gguf(t, int(gguf.GGMLQuantizationType[types[n]])).numpy()

    refuse_symlink(tmp)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        names = list(tensors)
        with ThreadPoolExecutor(1) as pool:  # the next tensor is quantized (no GIL) while this one is written
            ahead = pool.submit(block_bytes, names[0]) if names else None
            for i in range(len(names)):
                data = ahead.result()
                ahead = pool.submit(block_bytes, names[i + 1]) if i + 1 < len(names) else None
                w.write_tensor_data(data)
                del data
        w.close()
    except BaseException as e:  # no half-written file is left behind
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path.parent, path.name, e) from e
        raise
    tmp.replace(path)
