"""The ``tokenizer.*`` keys of an exported GGUF: copied from a GGUF file, or built from a Hugging Face
byte-level BPE ``tokenizer.json`` (llama.cpp's ``gpt2`` model) or a sentencepiece ``.model`` (its ``llama``
model), with the special-token ids and the Jinja chat template.

The BPE pre-tokenizer name (``tokenizer.ggml.pre``) is read from the tokenizer's structure, the inverse of
kindred.formats.gguf.tokenizer_from_gguf: SmolLM's digit split, Llama 3's and Qwen 2's split regexes, GPT-2's
byte-level rule. Others need ``pre=`` named explicitly (llama.cpp's names, llama-vocab.cpp).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from ..errors import KindredValueError
from ..formats.gguf import PRE_SPLITS, TOKEN_CONTROL, TOKEN_USER_DEFINED, read_gguf

_NORMAL, _UNKNOWN, _UNUSED, _BYTE = 1, 2, 5, 6  # llama.cpp's token types (llama-vocab.h)


def _types():
    import gguf

    return gguf.GGUFValueType


def from_gguf_file(path: Path) -> dict[str, tuple[Any, Any]]:
    """Every ``tokenizer.*`` key of a GGUF file, with its value type."""
    vt = _types()
    out = {}
    for key, field in read_gguf(path).fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            out[key] = (
                (kind, field.contents())
                if kind != vt.ARRAY
                else ((vt.ARRAY, field.types[1]), field.contents())
            )
    return out


def bpe_pre(library) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizers.Tokenizer``."""
    pre = json.loads(library.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds[:1] == ["Split"] and kinds[1:] == ["ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in PRE_SPLITS.items():
            if pattern == split:
                return name
    raise KindredValueError(
        f"tokenizer: its pre-tokenizer ({' + '.join(map(str, kinds))}) is not one kindred names for "
        "llama.cpp; pass pre= with llama.cpp's name for it (tokenizer.ggml.pre: 'llama-bpe', 'tekken', ...)"
    )


def from_bpe(library, pre: str | None) -> dict[str, tuple[Any, Any]]:
    vt = _types()
    spec = json.loads(library.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in [
        d.get("type") for d in [decoder, *decoder.get("decoders", [])]
    ]:
        raise KindredValueError(
            "tokenizer: not a byte-level BPE tokenizer.json; for a sentencepiece model pass its "
            "tokenizer.model"
        )
    n = library.get_vocab_size(with_added_tokens=True)
    tokens = [library.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise KindredValueError(f"tokenizer: ids are not contiguous (token {tokens.index(None)} is missing)")
    types = [_NORMAL] * n
    for i, added in library.get_added_tokens_decoder().items():
        types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses a gpt2 vocabulary without the key; GGUF has no empty arrays
        raise KindredValueError(
            "tokenizer: a byte-level BPE tokenizer.json with no merges cannot be loaded by llama.cpp"
        )
    return {
        "tokenizer.ggml.model": (vt.STRING, "gpt2"),
        "tokenizer.ggml.pre": (vt.STRING, pre or bpe_pre(library)),
        "tokenizer.ggml.tokens": ((vt.ARRAY, vt.STRING), tokens),
        "tokenizer.ggml.token_type": ((vt.ARRAY, vt.INT32), types),
        "tokenizer.ggml.merges": ((vt.ARRAY, vt.STRING), merges),
    }


def from_sentencepiece(path: str) -> dict[str, tuple[Any, Any]]:
    import sentencepiece as spm

    vt = _types()
    sp = spm.SentencePieceProcessor()
    sp.Load(path)
    n = sp.GetPieceSize()
    types = []
    for i in range(n):
        kind = _NORMAL
        if sp.IsUnknown(i):
            kind = _UNKNOWN
        elif sp.IsControl(i):
            kind = TOKEN_CONTROL
        elif sp.IsUnused(i):
            kind = _UNUSED
        elif sp.IsByte(i):
            kind = _BYTE
        types.append(kind)
    return {
        "tokenizer.ggml.model": (vt.STRING, "llama"),
        "tokenizer.ggml.tokens": ((vt.ARRAY, vt.STRING), [sp.IdToPiece(i) for i in range(n)]),
        "tokenizer.ggml.scores": ((vt.ARRAY, vt.FLOAT32), [sp.GetScore(i) for i in range(n)]),
        "tokenizer.ggml.token_type": ((vt.ARRAY, vt.INT32), types),
        "tokenizer.ggml.add_space_prefix": (vt.BOOL, False),
    }


def _folder_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def vocab_metadata(source, config, chat_template: str | None = None, pre: str | None = None) -> dict:
    """``tokenizer.*`` key -> (GGUF value type, value) for a model of DecoderConfig ``config``.

    ``source``: a GGUF file (its keys copied), a kindred tokenizer, a ``tokenizers.Tokenizer``, or a
    tokenizer file or folder (a folder's ``tokenizer_config.json`` / ``chat_template.jinja`` gives the chat
    template).
    """
    vt = _types()
    folder_template = None
    if isinstance(source, (str, Path)) and Path(source).suffix == ".gguf":
        out = from_gguf_file(Path(source))
    else:
        if isinstance(source, (str, Path)):
            folder = Path(source) if Path(source).is_dir() else Path(source).parent
            folder_template = _folder_template(folder)
            source = load_tokenizer(source)
        if isinstance(source, SentencePieceTokenizer):
            out = from_sentencepiece(source.path)
        else:
            out = from_bpe(source.library if isinstance(source, HFTokenizer) else source, pre)
        n = len(out["tokenizer.ggml.tokens"][1])
        if n < config.vocab_size:  # llama.cpp needs a token per embedding row
            out["tokenizer.ggml.tokens"][1].extend(f"[PAD{i}]" for i in range(n, config.vocab_size))
            out["tokenizer.ggml.token_type"][1].extend([_UNUSED] * (config.vocab_size - n))
            if "tokenizer.ggml.scores" in out:
                out["tokenizer.ggml.scores"][1].extend([0.0] * (config.vocab_size - n))
        ids = {
            "bos": config.bos_token_id,
            "eos": (config.eos_token_ids or (None,))[0],
            "padding": config.pad_token_id,
        }
        for name, tid in ids.items():
            if tid is not None:
                out[f"tokenizer.ggml.{name}_token_id"] = (vt.UINT32, int(tid))
        out["tokenizer.ggml.add_bos_token"] = (vt.BOOL, config.bos_token_id is not None and _adds_bos(source))
    n = len(out["tokenizer.ggml.tokens"][1])
    if n != config.vocab_size:
        raise KindredValueError(f"tokenizer: {n} tokens for a model of {config.vocab_size} embedding rows")
    template = chat_template or folder_template
    if template:
        out["tokenizer.chat_template"] = (vt.STRING, template)
    return out


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding puts BOS first (llama.cpp then adds it to every prompt)."""
    library = tokenizer.library if isinstance(tokenizer, HFTokenizer) else tokenizer
    if isinstance(tokenizer, SentencePieceTokenizer):
        return True
    ids = library.encode("a", add_special_tokens=True).ids
    return len(ids) > len(library.encode("a", add_special_tokens=False).ids)
