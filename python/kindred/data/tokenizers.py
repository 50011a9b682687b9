"""Tokenizers behind one small interface: encode / encode_batch / decode, tokens by name, vocabulary size.

* Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (its Rust batch encoder on all cores).
* SentencePiece ``.model`` through the sentencepiece C++ library compiled into ``kindred._core`` (batch encode
  on all cores with OpenMP) when the build found it (``kindred._core.sentencepiece_compiled()``); otherwise
  through the ``sentencepiece`` Python package, and ``Tokenizer.backend`` says so.

Texts are always encoded without adding special tokens: chat templates emit BOS and turn markers
themselves, and :mod:`kindred.data.templates` resolves those by name (:meth:`Tokenizer.token_id`).
"""

from __future__ import annotations

import abc
import json
import os
from itertools import chain
from pathlib import Path

import numpy as np

from .. import _core
from ..bounded import loads_json, read_limited
from ..errors import KindredFormatError, KindredValueError
from .spm_model import check_sentencepiece_model

TOKENIZER_JSON_BYTES = 512 << 20


class Tokenizer(abc.ABC):
    """The interface every tokenizer of kindred.data implements."""

    path: str
    kind: str  # "tokenizer.json" | "sentencepiece"
    backend: str  # which library encodes, in words

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (special-token spellings in it become their ids)."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts at once: (ids int32 [total], offsets int64 [len(texts) + 1])."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of ``ids``."""

    @abc.abstractmethod
    def lookup(self, name: str) -> int | None:
        """The id of the token spelled ``name`` (special or not), or None."""

    def token_id(self, name: str, needed_by: str = "") -> int:
        """The id of the token spelled ``name``; a KindredValueError naming the tokenizer when it has none."""
        tid = self.lookup(name)
        if tid is None:
            why = f" (needed by {needed_by})" if needed_by else ""
            raise KindredValueError(f"{self.path}: the tokenizer has no token {name!r}{why}")
        return tid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, backend={self.backend!r})"


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

    kind = "tokenizer.json"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        data = read_limited(path, TOKENIZER_JSON_BYTES, "tokenizer.json")
        self._tok = tokenizer_json_from_str(data, self.path)
        self._fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.backend = "tokenizers (Rust, all cores)"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        return _flatten([e.ids for e in self._fast(texts, add_special_tokens=False)])

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def lookup(self, name: str) -> int | None:
        return self._tok.token_to_id(name)

    @property
    def library(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``: the C++ library in kindred's core when compiled in, else PyPI's package."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, *, backend: str = "auto", threads: int = 0):
        self.path = str(path)
        self.threads = threads
        if backend not in ("auto", "core", "python"):
            raise KindredValueError(f"backend must be 'auto', 'core' or 'python', got {backend!r}")
        if backend == "core" and not _core.sentencepiece_compiled():
            raise KindredValueError(
                "kindred was built without the sentencepiece C++ library (Debian: libsentencepiece-dev); "
                "use backend='python'"
            )
        self._core = None
        self._py = None
        check_sentencepiece_model(read_limited(self.path, 256 << 20, "sentencepiece model"), self.path)
        if backend != "python" and _core.sentencepiece_compiled():
            try:
                self._core = _core.SentencePieceTokenizer(self.path)
            except ValueError as e:
                raise KindredFormatError(str(e)) from None
            except RuntimeError as e:  # the library's own exceptions (its trie builder's, e.g.)
                raise KindredFormatError(f"{self.path}: not a valid sentencepiece model ({e})") from None
            self.backend = "kindred core (sentencepiece C++, OpenMP on all cores)"
        else:
            import sentencepiece as spm

            self._py = spm.SentencePieceProcessor()
            try:
                self._py.Load(self.path)
            except (OSError, RuntimeError) as e:
                raise KindredFormatError(f"{self.path}: not a valid sentencepiece model ({e})") from None
            self.backend = (
                "sentencepiece Python package (kindred's core was built without the sentencepiece C++ "
                "library)"
                if backend == "auto"
                else "sentencepiece Python package"
            )

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size if self._core else self._py.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        if self._core:
            return self._core.encode(text).tolist()
        return self._py.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        if self._core:
            return self._core.encode_batch(texts, self.threads)
        return _flatten(self._py.Encode(list(texts), num_threads=self.threads or -1))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._core.decode(ids) if self._core else self._py.DecodeIds(ids)

    def lookup(self, name: str) -> int | None:
        if self._core:
            tid = self._core.piece_to_id(name)
            return None if tid < 0 else tid
        tid = self._py.PieceToId(name)
        return tid if self._py.IdToPiece(tid) == name else None


def _check_tokenizer_model(model, where: str) -> None:
    """The parts of a tokenizer.json ``model`` the ``tokenizers`` library trusts: a WordPiece / WordLevel
    unk_token that is in the vocabulary (else every unknown word fails on encode), and BPE merges whose two
    parts and merged result are tokens (a missing result makes the library panic)."""
    if not isinstance(model, dict):
        raise KindredFormatError(f"{where}: 'model' must be an object")
    kind, vocab = model.get("type"), model.get("vocab")
    if kind not in (None, "BPE", "WordPiece", "WordLevel", "Unigram"):
        raise KindredFormatError(f"{where}: model type {kind!r:.40} is not a tokenizers model")
    if kind == "Unigram":
        if not isinstance(vocab, list) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in vocab
        ):
            raise KindredFormatError(f"{where}: a Unigram 'vocab' must be a list of [piece, score] pairs")
        unk = model.get("unk_id")
        if unk is not None and not (isinstance(unk, int) and 0 <= unk < len(vocab)):
            raise KindredFormatError(f"{where}: Unigram unk_id {unk!r:.40} is not an index of the vocabulary")
        return
    if not isinstance(vocab, dict):
        raise KindredFormatError(f"{where}: model 'vocab' must be an object {{token: id}}")
    unk = model.get("unk_token")
    if kind in ("WordPiece", "WordLevel") and unk not in vocab:
        raise KindredFormatError(f"{where}: {kind} unk_token {unk!r:.40} is not in the vocabulary")
    merges = model.get("merges", [])
    if kind != "BPE" and "merges" not in model:
        return
    if not isinstance(merges, list):
        raise KindredFormatError(f"{where}: BPE 'merges' must be a list")
    prefix = model.get("continuing_subword_prefix") or ""
    cut = len(prefix.encode("utf-8")) if isinstance(prefix, str) else 0
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(x, str) for x in parts):
            raise KindredFormatError(f"{where}: merges[{i}] {m!r:.60} is not two tokens")
        tail = parts[1].encode("utf-8")[cut:]
        try:
            merged = parts[0] + tail.decode("utf-8")
        except UnicodeDecodeError:
            merged = None
        if len(parts[1].encode("utf-8")) < cut or merged is None:
            raise KindredFormatError(f"{where}: merges[{i}] {m!r:.60} is shorter than the subword prefix")
        for t in (*parts, merged):
            if t not in vocab:
                raise KindredFormatError(f"{where}: merges[{i}] {m!r:.60} names {t!r:.40}, not a token")


def tokenizer_json_from_str(text: bytes | str, where: str):
    """A ``tokenizers.Tokenizer`` from tokenizer.json text, checked first (bounded JSON, the model's
    vocabulary, unk token and merges); every failure is a KindredFormatError naming ``where``."""
    from tokenizers import Tokenizer as _Tok

    try:
        obj = loads_json(text, where, limit=TOKENIZER_JSON_BYTES)
        if not isinstance(obj, dict):
            raise KindredFormatError(f"{where}: not a JSON object")
        _check_tokenizer_model(obj.get("model"), where)
    except KindredFormatError as e:
        raise KindredFormatError(
            f"{where}: not a valid tokenizer.json ({str(e).removeprefix(f'{where}: ')})"
        ) from None
    raw = text if isinstance(text, str) else text.decode("utf-8")
    try:
        return _Tok.from_str(raw)
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise KindredFormatError(f"{where}: not a valid tokenizer.json ({e})") from None
    except BaseException as e:  # a Rust panic (pyo3's PanicException derives from BaseException)
        if type(e).__name__ != "PanicException":
            raise
        raise KindredFormatError(f"{where}: not a valid tokenizer.json (the library panicked: {e})") from None


def load_tokenizer(path: str | os.PathLike | Tokenizer, **kwargs) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json``, a sentencepiece ``.model``, or a folder holding either (a
    ``.gguf`` file is named in the error: its tokenizer is built one layer up, by kindred.models).

    Missing or corrupt files raise :class:`~kindred.KindredFormatError` naming the file.
    """
    if isinstance(path, Tokenizer):
        return path
    if path is None:
        raise KindredValueError(
            "a tokenizer path is needed (tokenizer.json, a sentencepiece .model or a folder)"
        )
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise KindredFormatError(f"{p}: no tokenizer.json or tokenizer.model in this folder")
    if not p.is_file():
        raise KindredFormatError(f"{p}: tokenizer file not found")
    with p.open("rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"GGUF"):
        raise KindredFormatError(
            f"{p}: a GGUF model file; its tokenizer loads with kindred.models.gguf_tokenizer(path) "
            "(the kindred commands take the .gguf itself)"
        )
    if p.suffix == ".json" or head.startswith(b"{"):
        if not head.startswith(b"{"):
            raise KindredFormatError(f"{p}: not a valid tokenizer.json (not a JSON object)")
        return HFTokenizer(p)
    return SentencePieceTokenizer(p, **kwargs)


def sentencepiece_backend() -> str:
    """Which sentencepiece implementation this build uses, in words."""
    if _core.sentencepiece_compiled():
        return "kindred core (sentencepiece C++ library)"
    return "sentencepiece Python package (kindred's core was built without the sentencepiece C++ library)"


def special_tokens_of(path: str | os.PathLike) -> dict[str, int]:
    """The added/special tokens of a tokenizer.json (name -> id), for reports."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    return {t["content"]: t["id"] for t in obj.get("added_tokens", [])}


# A Hugging Face tokenizer's files (and a processor's, for multimodal models) as they sit in a model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def save_tokenizer_files(tokenizer: Tokenizer, folder: str | os.PathLike) -> list[str]:
    """Copy ``tokenizer``'s file and the tokenizer files beside it (TOKENIZER_FILES) into ``folder``; a
    tokenizer whose file is gone (built from a GGUF) is written from memory. Returns the names written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer.path)
    written = []
    if src.is_file():
        siblings = [src.parent / n for n in TOKENIZER_FILES if (src.parent / n).is_file()]
        for f in dict.fromkeys([src, *siblings]):
            (folder / f.name).write_bytes(f.read_bytes())
            written.append(f.name)
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.library.save(str(folder / "tokenizer.json"))
        written.append("tokenizer.json")
    else:
        raise KindredFormatError(f"{src}: the tokenizer file is gone; cannot save the tokenizer")
    return written
