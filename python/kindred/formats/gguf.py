"""GGUF files (llama.cpp): container read with the ``gguf`` package, tensors dequantized by kindred's core.

- :func:`read_gguf` opens a file (memory-mapped) and :func:`gguf_metadata` gives its key/values.
- :func:`gguf_tensor` turns one tensor into torch (F32/F16/BF16 as stored; block formats Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, Q4_K, Q5_K, Q6_K through ``kindred.ops.dequantize_gguf``), in torch's dimension order.
- :func:`gguf_to_hf_config` maps ``llama`` (and ``qwen3``) architecture keys to a HF config dict.
- :func:`tokenizer_from_gguf` builds a ``tokenizers`` byte-level BPE tokenizer from the vocabulary, merges
  and token types stored in the metadata (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2, Llama 3, Qwen).
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bounded import check_float, check_int
from ..data.tokenizers import tokenizer_json_from_str
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


# Sizes of GGUF value types (gguf.GGUFValueType): scalars by code; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Scan:
    """A bounds-checked cursor over the header of a GGUF file (every read checks the bytes remain)."""

    def __init__(self, buf, path: Path, order: str):
        self.buf, self.path, self.order, self.pos = buf, path, order, 0

    def fail(self, msg: str, at: int | None = None) -> KindredFormatError:
        at = self.pos if at is None else at
        return KindredFormatError(f"{self.path}: not a readable GGUF file: byte {at}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} needs {n:,} bytes but the file has {len(self.buf) - self.pos:,} left")

    def scalar(self, fmt: str, what: str) -> int | float:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        start = self.pos
        n = self.scalar("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n:,} bytes long (at most {limit:,})", start)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8", self.pos + e.start) from None
        self.pos += n
        return text

    def value(self, kind: int, what: str, in_array: bool = False) -> None:
        if kind in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[kind], what)
            self.pos += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY and not in_array:
            start = self.pos
            item = self.scalar("I", f"the item type of {what}")
            count_at = self.pos
            count = self.scalar("Q", f"the length of {what}")
            least = _SCALAR_SIZES.get(item, 8)  # a string item takes at least its 8-byte length
            if item not in _SCALAR_SIZES and item != _STRING:
                raise self.fail(f"{what} has an unknown item type {item}", start)
            if count * least > len(self.buf) - self.pos:
                raise self.fail(
                    f"{what} claims {count:,} items, more than the {len(self.buf) - self.pos:,} bytes "
                    "left can hold",
                    count_at,
                )
            if item == _STRING:
                for i in range(count):
                    self.string(f"{what}[{i}]")
            else:
                self.pos += count * least
        else:
            raise self.fail(
                f"{what} has an unknown value type {kind}" + (" (nested array)" if kind == _ARRAY else "")
            )


def check_gguf_header(path: Path) -> None:
    """Walk the GGUF header of ``path`` with every length checked against the bytes left, before the gguf
    package reads it (which trusts them: a 2^62-item array, a truncated file or invalid UTF-8 make it hang,
    exhaust memory or raise foreign errors): keys and strings UTF-8, counts, tensor dimensions and types,
    alignment, and every tensor's data inside the file."""
    size = path.stat().st_size
    if size < 24:
        raise KindredFormatError(f"{path}: not a readable GGUF file: {size} bytes, too short for a header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise KindredFormatError(f"{path}: not a readable GGUF file (magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<" if version & 0xFFFF else ">"  # the gguf package reads both byte orders
        s = _Scan(buf, path, order)
        s.pos = 4
        version = s.scalar("I", "the version")
        if version not in (2, 3):
            raise s.fail(f"GGUF version {version} is not supported (2, 3)", 4)
        n_tensors = s.scalar("Q", "the tensor count")
        n_kv = s.scalar("Q", "the key/value count")
        if n_kv * 13 > size or n_tensors * 24 > size:  # the smallest key/value and tensor entries
            raise s.fail(f"{n_kv:,} key/values and {n_tensors:,} tensors cannot fit in {size:,} bytes", 8)
        alignment = 32
        keys: set[str] = set()
        for i in range(n_kv):
            start = s.pos
            key = s.string(f"key {i}", limit=1 << 16)
            if key in keys:
                raise s.fail(f"key '{key}' appears twice", start)
            keys.add(key)
            kind = s.scalar("I", f"the type of '{key}'")
            at = s.pos
            if key == "general.alignment":
                if kind != 4:
                    raise s.fail("general.alignment must be a uint32", at)
                alignment = s.scalar("I", "general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise s.fail(f"general.alignment {alignment} is not a power of two", at)
            else:
                s.value(kind, f"'{key}'")
        tensors = []
        names: set[str] = set()
        for i in range(n_tensors):
            start = s.pos
            name = s.string(f"the name of tensor {i}", limit=1 << 16)
            if name in names:
                raise s.fail(f"tensor '{name}' appears twice", start)
            names.add(name)
            n_dims = s.scalar("I", f"the dimension count of '{name}'")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise s.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS})", start)
            dims = [s.scalar("Q", f"a dimension of '{name}'") for _ in range(n_dims)]
            kind = s.scalar("I", f"the type of '{name}'")
            offset = s.scalar("Q", f"the data offset of '{name}'")
            tensors.append((start, name, dims, kind, offset))
        data_start = -(-s.pos // alignment) * alignment
        for start, name, dims, kind, offset in tensors:
            _check_tensor_extent(path, start, name, dims, kind, offset, alignment, data_start, size)


def _check_tensor_extent(path, start, name, dims, kind, offset, alignment, data_start, size) -> None:
    gguf = _need_gguf()
    where = f"{path}: not a readable GGUF file: byte {start}: tensor '{name}'"
    try:
        qtype = gguf.GGMLQuantizationType(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise KindredFormatError(f"{where} has an unknown GGML type {kind}") from None
    if any(d > 1 << 40 for d in dims):
        raise KindredFormatError(f"{where} has a dimension above 2^40: {dims}")
    if dims[0] % block:
        raise KindredFormatError(
            f"{where}: first dimension {dims[0]} is not a multiple of {qtype.name}'s block {block}"
        )
    n = math.prod(dims)
    nbytes = n // block * type_size
    if offset % alignment:
        raise KindredFormatError(
            f"{where}: data offset {offset} is not a multiple of the alignment {alignment}"
        )
    if data_start + offset + nbytes > size:
        raise KindredFormatError(
            f"{where} ({qtype.name} {dims}) needs bytes {data_start + offset:,} to "
            f"{data_start + offset + nbytes:,} "
            f"but the file has {size:,} (truncated?)"
        )


_LAST_READ: list = []  # [(file identity, reader)]: the last file read, while it is unchanged


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped; tensors are read when converted), once
    :func:`check_gguf_header` has found the header sound. Parsing the metadata takes seconds for a large
    vocabulary, so the reader of the last file read is handed out again while the file is unchanged (same
    inode, size and times): loading a model reads its config, tokenizer and tensors from one parse."""
    gguf = _need_gguf()
    path = Path(path)
    if not path.is_file():
        raise KindredFormatError(f"{path}: no such GGUF file")
    try:
        check_gguf_header(path)
        key = _identity(path)
    except OSError as e:
        raise KindredFormatError(f"{path}: cannot read the GGUF file ({e})") from None
    if _LAST_READ and _LAST_READ[0][0] == key:
        return _LAST_READ[0][1]
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise KindredFormatError(f"{path}: not a readable GGUF file ({e})") from None
    _LAST_READ[:] = [(key, reader)]
    return reader


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
    """A HF config.json dict for the decoder stored in a GGUF file (architectures llama and qwen3).

    Every number is checked for its type and a coarse range here (the decoder's config checks the tight
    bounds); an error names the file and the metadata key."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen3"):
        raise KindredFormatError(
            f"{source}: general.architecture {arch!r:.80} is not supported (llama, qwen3)"
        )

    def integer(k: str, default: int | None = None, lo: int = 1) -> int:
        return check_int(_arch_key(meta, arch, k, default, source), f"{source}: '{arch}.{k}'", lo, 1 << 40)

    def number(k: str, default: float | None = None) -> float:
        v = _arch_key(meta, arch, k, default, source)
        return check_float(v, f"{source}: '{arch}.{k}'", 0.0, 1e30, lo_open=True)

    def token_id(k: str) -> int | None:
        v = meta.get(k)
        return None if v is None else check_int(v, f"{source}: '{k}'", 0, 1 << 32)

    hidden, heads = integer("embedding_length"), integer("attention.head_count")
    head_dim = integer("attention.key_length", max(hidden // heads, 1))
    if integer("rope.dimension_count", head_dim) != head_dim:
        raise KindredFormatError(
            f"{source}: partial rotary ({arch}.rope.dimension_count ≠ head_dim) is not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg = {
        "model_type": arch,
        "vocab_size": integer("vocab_size", len(tokens) if isinstance(tokens, list) and tokens else 0, 0)
        or None,
        "hidden_size": hidden,
        "intermediate_size": integer("feed_forward_length"),
        "num_hidden_layers": integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": integer("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon"),
        "rope_theta": number("rope.freq_base", 10000.0),
        "max_position_embeddings": integer("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise KindredFormatError(
                f"{source}: {arch}.rope.scaling.type {scaling!r:.80} is not supported (linear)"
            )
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": number("rope.scaling.factor")}
    return cfg


def _check_vocabulary(tokens, merges, types, where: str) -> None:
    """Tokens a list of strings, merges "a b" strings whose parts and result are tokens, types integers:
    what the ``tokenizers`` BPE builder needs (it raises or panics on anything else)."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise KindredFormatError(f"{where}: tokenizer.ggml.tokens must be a list of strings")
    if not isinstance(merges, list):
        raise KindredFormatError(f"{where}: tokenizer.ggml.merges must be a list of strings")
    vocab = set(tokens)
    for i, m in enumerate(merges):
        parts = m.split(" ", 1) if isinstance(m, str) else []
        if len(parts) != 2:
            raise KindredFormatError(f"{where}: tokenizer.ggml.merges[{i}] {m!r:.80} is not two tokens 'a b'")
        for t in (*parts, parts[0] + parts[1]):
            if t not in vocab:
                raise KindredFormatError(
                    f"{where}: tokenizer.ggml.merges[{i}] {m!r:.80} names {t!r:.40}, which is not a token"
                )
    if types is not None and (
        not isinstance(types, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in types)
    ):
        raise KindredFormatError(f"{where}: tokenizer.ggml.token_type must be a list of integers")


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
        text = meta["tokenizer.huggingface.json"]
        if not isinstance(text, str):
            raise KindredFormatError(f"{where}: tokenizer.huggingface.json must be a string")
        return tokenizer_json_from_str(text, f"{where}: tokenizer.huggingface.json")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise KindredFormatError(
            f"{where}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' only)"
        )
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise KindredFormatError(f"{where}: needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    _check_vocabulary(tokens, merges, meta.get("tokenizer.ggml.token_type"), where)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
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
