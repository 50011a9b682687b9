"""GGUF files (llama.cpp): container read with the ``gguf`` package, tensors dequantized by kindred's core.

- :func:`read_gguf` opens a file (memory-mapped) and :func:`gguf_metadata` gives its key/values.
- :func:`gguf_tensor` turns one tensor into torch (F32/F16/BF16 as stored; block formats Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, Q4_K, Q5_K, Q6_K through ``kindred.ops.dequantize_gguf``), in torch's dimension order.
- :func:`gguf_to_hf_config` maps ``llama`` (and ``qwen3``) architecture keys to a HF config dict.
- :func:`tokenizer_from_gguf` builds a ``tokenizers`` byte-level BPE tokenizer from the vocabulary, merges
  and token types stored in the metadata (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2, Llama 3, Qwen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import KindredFormatError
from ..ops.gguf import GGUF_BLOCK_TYPES, dequantize_gguf

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` values (llama-vocab.cpp), applied before the
# byte-level mapping. SmolLM splits digits one by one, then uses GPT-2's rule.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt-2", "smollm", "llama-bpe", "llama3", "qwen2")
PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}  # the split regex of each such name
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _need_gguf():
    try:
        import gguf
    except ImportError:
        raise KindredFormatError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped; tensors are read when converted)."""
    gguf = _need_gguf()
    path = Path(path)
    if not path.is_file():
        raise KindredFormatError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise KindredFormatError(f"{path}: not a readable GGUF file ({e})") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """Key/values of the file (strings, numbers, lists), without the GGUF.* header fields."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensor(t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reader tensor ``t`` as a torch tensor of torch shape (GGUF ne reversed) in ``dtype``."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return torch.from_numpy(np.array(t.data)).reshape(shape).to(dtype)
    if kind == "BF16":
        raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
        return raw.view(torch.bfloat16).reshape(shape).to(dtype)
    if kind not in GGUF_BLOCK_TYPES:
        raise KindredFormatError(
            f"tensor '{t.name}' has GGUF type {kind}; kindred reads F32, F16, BF16 and "
            f"{sorted(GGUF_BLOCK_TYPES)}"
        )
    raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
    return dequantize_gguf(raw, int(t.tensor_type), shape, dtype)


def _arch_key(meta: dict, arch: str, key: str, default: Any = None, source: str = "") -> Any:
    full = f"{arch}.{key}"
    if full in meta:
        return meta[full]
    if default is None:
        raise KindredFormatError(f"{source}: missing metadata key '{full}'")
    return default


def gguf_to_hf_config(meta: dict[str, Any], tensor_names: set[str], source: str = "GGUF") -> dict[str, Any]:
    """A HF config.json dict for the decoder stored in a GGUF file (architectures llama and qwen3)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen3"):
        raise KindredFormatError(f"{source}: general.architecture {arch!r} is not supported (llama, qwen3)")

    def key(k, default=None):
        return _arch_key(meta, arch, k, default, source)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise KindredFormatError(
            f"{source}: partial rotary ({arch}.rope.dimension_count ≠ head_dim) is not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg = {
        "model_type": arch,
        "vocab_size": int(key("vocab_size", len(tokens) if tokens else 0)) or None,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise KindredFormatError(
                f"{source}: {arch}.rope.scaling.type {scaling!r} is not supported (linear)"
            )
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return cfg


def tokenizer_from_gguf(source: str | Path | dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from a GGUF file's (or metadata dict's) byte-level BPE vocabulary.

    Control tokens (type 3, e.g. ``<|im_start|>``) become special tokens, user-defined ones (type 4) added
    tokens, so neither is split. The pre-tokenizer follows ``tokenizer.ggml.pre``; a full
    ``tokenizer.huggingface.json``, when the file carries one, is used as it is.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise KindredFormatError("building a tokenizer needs the 'tokenizers' package") from None
    meta = source if isinstance(source, dict) else gguf_metadata(read_gguf(source))
    where = "GGUF metadata" if isinstance(source, dict) else str(source)
    if "tokenizer.huggingface.json" in meta:
        return Tokenizer.from_str(meta["tokenizer.huggingface.json"])
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KindredFormatError(
            f"{where}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' only)"
        )
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise KindredFormatError(f"{where}: needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise KindredFormatError(
            f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: {PRE_TOKENIZERS}"
        )
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]
    )
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=pre in ("default", "gpt-2", "smollm")
    )
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        split = PRE_SPLITS["qwen2" if pre == "qwen2" else "llama-bpe"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise KindredFormatError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == TOKEN_CONTROL
    ]
    added = [
        AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=True) if k == TOKEN_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    return tok
