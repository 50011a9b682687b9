"""A check of a sentencepiece ``.model`` file before the C++ library parses it.

The file is a serialized ``ModelProto`` (sentencepiece_model.proto): repeated ``pieces`` (1: piece, 2:
score, 3: type), ``trainer_spec`` (2), ``normalizer_spec`` (3) and ``denormalizer_spec`` (5), each with a
``precompiled_charsmap`` (2): a uint32 trie size, a Darts double-array trie and the NUL-terminated
replacement strings the trie's values point into. The library trusts that trie (a unit's offset or value
outside the blob is read out of bounds), so the check walks the protobuf framing (every length inside its
message, known wire types, UTF-8 piece strings, piece types in range) and every trie unit.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import KindredFormatError

MAX_BYTES = 256 << 20
_PIECE_TYPES = range(1, 7)  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
_UNKNOWN = 2


class _Reader:
    def __init__(self, data: bytes, where: str, base: int = 0):
        self.data, self.where, self.base, self.pos = data, where, base, 0

    def fail(self, msg: str, at: int | None = None) -> KindredFormatError:
        at = self.base + (self.pos if at is None else at)
        return KindredFormatError(f"{self.where}: not a valid sentencepiece model: byte {at}: {msg}")

    def varint(self) -> int:
        if self.pos < len(self.data) and self.data[self.pos] < 0x80:  # one byte: most keys and lengths
            self.pos += 1
            return self.data[self.pos - 1]
        value = shift = 0
        start = self.pos
        while True:
            if self.pos >= len(self.data):
                raise self.fail("a varint runs past the end of its message", start)
            if shift >= 64:
                raise self.fail("a varint longer than 10 bytes", start)
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    def fields(self):
        """(field number, wire type, value, offset of the value): value is an int or the bytes of a
        length-delimited field."""
        while self.pos < len(self.data):
            start = self.pos
            key = self.varint()
            number, wire = key >> 3, key & 7
            if number == 0 or number >= 1 << 29:
                raise self.fail(f"field number {number} is invalid", start)
            at = self.pos
            if wire == 0:
                yield number, wire, self.varint(), at
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
                if self.pos + n > len(self.data):
                    raise self.fail(f"field {number} runs past the end of its message", start)
                self.pos += n
                yield number, wire, self.data[at : at + n], at
            elif wire == 2:
                n = self.varint()
                if n > len(self.data) - self.pos:
                    raise self.fail(
                        f"field {number} claims {n:,} bytes, {len(self.data) - self.pos:,} are left", start
                    )
                value_at = self.pos
                self.pos += n
                yield number, wire, self.data[value_at : value_at + n], value_at
            else:
                raise self.fail(
                    f"field {number} has wire type {wire} (groups and unknown types are refused)", start
                )


def _walk(data: bytes, where: str, base: int) -> None:
    """Check the framing of a message whose schema is not needed (every nested length must fit)."""
    for _ in _Reader(data, where, base).fields():
        pass


def _check_piece(data: bytes, where: str, base: int, index: int) -> int:
    """The type of piece ``index`` after checking its fields; its string must be non-empty UTF-8."""
    piece, kind = None, 1
    r = _Reader(data, where, base)
    for number, wire, value, at in r.fields():
        if number == 1:
            if wire != 2:
                raise r.fail(f"pieces[{index}].piece must be a string", at)
            try:
                piece = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise r.fail(f"pieces[{index}].piece is not valid UTF-8", at + e.start) from None
        elif number == 2 and wire != 5:
            raise r.fail(f"pieces[{index}].score must be a float", at)
        elif number == 3:
            if wire != 0 or value not in _PIECE_TYPES:
                raise r.fail(f"pieces[{index}].type {value!r:.20} is not a piece type (1 to 6)", at)
            kind = value
    if not piece:
        raise r.fail(f"pieces[{index}] has an empty piece string", 0)
    if "\x00" in piece:  # the library's trie takes pieces as C strings: "a\0b" is "a", "\0" is empty
        raise r.fail(f"pieces[{index}].piece {piece!r:.40} holds a NUL byte", 0)
    return kind


def _charsmap_error(where: str, msg: str) -> KindredFormatError:
    return KindredFormatError(f"{where}: not a valid sentencepiece model: {msg}")


def _check_charsmap(blob: bytes, where: str, base: int) -> None:
    """The trie of a precompiled_charsmap: every unit's child block and leaf value inside the blob."""
    if not blob:
        return
    if len(blob) < 4:
        raise _charsmap_error(where, f"byte {base}: precompiled_charsmap is shorter than its size field")
    (trie_size,) = struct.unpack_from("<I", blob)
    if trie_size % 4 or trie_size >= len(blob) - 4 + 1 or trie_size == 0:
        raise _charsmap_error(
            where,
            f"byte {base}: precompiled_charsmap trie size {trie_size} does not fit its {len(blob)}-byte blob",
        )
    strings = blob[4 + trie_size :]
    if strings and strings[-1] != 0:
        raise _charsmap_error(where, f"byte {base}: precompiled_charsmap strings are not NUL-terminated")
    n = trie_size // 4
    units = np.frombuffer(blob, dtype="<u4", count=n, offset=4).astype(np.int64)
    # value units (top bit) are only read through their parent's leaf flag; every other unit's child block
    # (Darts-clone's offset()) must lie inside the trie, and a leaf's value must name a string in the blob
    inner = (units >> 31) == 0
    child = np.arange(n) ^ ((units >> 10) << ((units & (1 << 9)) >> 6))
    outside = inner & ((child | 0xFF) >= n)
    value = units[np.where(outside | ~inner, 0, child)] & 0x7FFFFFFF
    past = inner & ~outside & (((units >> 8) & 1) == 1) & (value >= len(strings))
    if not (outside | past).any():
        return
    p = int(np.argmax(outside | past))  # the first bad unit, as a reader walking the trie meets them
    if outside[p]:
        raise _charsmap_error(
            where, f"byte {base + 4 + 4 * p}: precompiled_charsmap trie unit {p} points outside the trie"
        )
    raise _charsmap_error(
        where,
        f"byte {base + 4 + 4 * p}: precompiled_charsmap trie unit {p} names string "
        f"{int(value[p])}, past the {len(strings)} bytes of strings",
    )


def _check_normalizer(data: bytes, where: str, base: int) -> None:
    r = _Reader(data, where, base)
    for number, wire, value, at in r.fields():
        if number == 2:
            if wire != 2:
                raise r.fail("precompiled_charsmap must be bytes", at)
            _check_charsmap(value, where, base + at)
        elif number in (1, 6) and wire == 2:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise r.fail("a normalizer string is not valid UTF-8", at + e.start) from None


def check_sentencepiece_model(data: bytes, where: str) -> None:
    """Refuse bytes that are not a sound sentencepiece ModelProto (see the module docstring)."""
    if len(data) > MAX_BYTES:
        raise KindredFormatError(f"{where}: not a valid sentencepiece model: larger than {MAX_BYTES:,} bytes")
    r = _Reader(data, where)
    pieces = unknown = 0
    for number, wire, value, at in r.fields():
        if number in (1, 2, 3, 4, 5) and wire != 2:
            raise r.fail(f"field {number} of ModelProto must be a message", at)
        if number == 1:
            unknown += _check_piece(value, where, at, pieces) == _UNKNOWN
            pieces += 1
        elif number in (3, 5):
            _check_normalizer(value, where, at)
        elif number in (2, 4):  # trainer_spec, self_test_data: messages the check needs no field of
            _walk(value, where, at)
    if not pieces:
        raise KindredFormatError(f"{where}: not a valid sentencepiece model: no pieces")
    if unknown != 1:
        raise KindredFormatError(
            f"{where}: not a valid sentencepiece model: {unknown} unknown-token pieces (one is needed)"
        )
