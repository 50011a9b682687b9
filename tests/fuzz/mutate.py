"""Byte mutations of valid inputs: flips, interesting integers over length fields, insertions, deletions,
duplications, splices and per-format tokens (brackets, huge numbers, YAML anchors, invalid UTF-8).

Inputs made of several files (a model folder: config.json and model.safetensors) are packed with
:func:`pack`; a mutation changes one part and keeps the others, so the reader gets past the files it does
not test.
"""

from __future__ import annotations

import random
import struct

SEPARATOR = b"\x00--kindred-fuzz-part--\x00"
MAX_SIZE = 4 << 20

_INTS = [0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
_INTS += [1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_COMMON = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\n", b'"', b"\\", b"\\ud800", b"\xef\xbb\xbf"]
TOKENS = {
    "json": [
        b"[" * 200,
        b"{" * 200,
        b"1e400",
        b"-1e400",
        b"NaN",
        b"Infinity",
        b"9" * 5000,
        b"null",
        b"true",
        b"[]",
        b"{}",
        b'"x"',
        b"-1",
        b"0",
        b"1e30",
        b"-0.0",
        b"2.5",
        b",",
        b":",
        b"]",
        b"}",
        b'"../x"',
        b'"/etc/passwd"',
        b'"("',
    ],
    "yaml": [
        b"&a ",
        b"*a",
        b"<<: *a",
        b"[" * 200,
        b"{" * 200,
        b"!!python/object:os.system",
        b"!!binary",
        b"1e400",
        b"1.0e+400",
        b".inf",
        b".nan",
        b"2001-02-30",
        b"9" * 5000,
        b"~",
        b"---\n",
        b"? ",
        b"- ",
        b": ",
        b"\t",
        b"%YAML 1.1\n",
        b"'",
        b"|\n",
    ],
    "text": [b"<|im_start|>", b"<unk>", b"\xe2\x80\xae", b"##", b" ", b"\r\n"],
}


def pack(parts: list[bytes]) -> bytes:
    return SEPARATOR.join(parts)


def unpack(data: bytes, n: int, fallback: list[bytes]) -> list[bytes]:
    """The ``n`` parts of ``data``; a part lost to a mangled separator is taken from ``fallback``."""
    parts = data.split(SEPARATOR)
    return (parts + fallback[len(parts) :] + [b""] * n)[:n]


def _flip(rng: random.Random, d: bytearray) -> None:
    i = rng.randrange(len(d))
    d[i] ^= 1 << rng.randrange(8)


def _byte(rng: random.Random, d: bytearray) -> None:
    d[rng.randrange(len(d))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])


def _integer(rng: random.Random, d: bytearray) -> None:
    v = rng.choice(_INTS)
    fmt = rng.choice(["<Q", "<I", "<H", "<q", "<i"])
    size = struct.calcsize(fmt)
    if len(d) < size:
        return
    i = rng.randrange(len(d) - size + 1)
    lo, hi = (
        (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1)
        if fmt[1].islower()
        else (0, (1 << (8 * size)) - 1)
    )
    v = max(lo, min(hi, v if rng.random() < 0.8 else v + rng.choice([-1, 1])))
    struct.pack_into(fmt, d, i, v)


def _delete(rng: random.Random, d: bytearray) -> None:
    i = rng.randrange(len(d))
    del d[i : i + rng.choice([1, 2, 4, 8, rng.randrange(1, 256)])]


def _duplicate(rng: random.Random, d: bytearray) -> None:
    i = rng.randrange(len(d))
    chunk = d[i : i + rng.randrange(1, 64)]
    j = rng.randrange(len(d) + 1)
    d[j:j] = chunk * rng.choice([1, 2, 16])


def _truncate(rng: random.Random, d: bytearray) -> None:
    del d[rng.randrange(len(d)) :]


def _digits(rng: random.Random, d: bytearray) -> None:
    """Replace a run of ASCII digits (a number in a text format) with an extreme one."""
    starts = [i for i in range(len(d)) if 48 <= d[i] <= 57 and (i == 0 or not 48 <= d[i - 1] <= 57)]
    if not starts:
        return
    i = rng.choice(starts[:4096])
    j = i
    while j < len(d) and (48 <= d[j] <= 57 or d[j] in b".eE+-"):
        j += 1
    d[i:j] = rng.choice([b"0", b"-1", b"1e400", b"9" * rng.choice([19, 20, 400]), b"1e30", b"-1e30", b"0.0"])


_MUTATORS = [_flip, _byte, _integer, _integer, _delete, _duplicate, _truncate]


def mutate(rng: random.Random, data: bytes, others: list[bytes], kind: str) -> bytes:
    """One to four stacked mutations of ``data`` (``kind``: "binary", "json", "yaml" or "text")."""
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        if not d:
            d += rng.choice(others or [b"\x00"])[:64]
            continue
        r = rng.random()
        if kind != "binary" and r < 0.35:
            token = rng.choice(TOKENS.get(kind, []) + TOKENS["text"] + _COMMON)
            i = rng.randrange(len(d) + 1)
            if rng.random() < 0.5:
                d[i:i] = token
            else:
                d[i : i + len(token)] = token
        elif kind != "binary" and r < 0.5:
            _digits(rng, d)
        elif r < 0.55 and others:
            other = rng.choice(others)
            if other:
                i, j = rng.randrange(len(d)), rng.randrange(len(other))
                d[i:] = other[j : j + rng.randrange(1, 4096)] + d[i:]  # splice
        elif r < 0.6:
            d[rng.randrange(len(d) + 1) : 0] = rng.choice(_COMMON)
        else:
            rng.choice(_MUTATORS)(rng, d)
    return bytes(d[:MAX_SIZE])
