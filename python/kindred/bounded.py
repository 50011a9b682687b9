"""Reading untrusted files with limits: JSON and YAML of bounded size, nesting depth and alias expansion,
numbers checked for type and range, and file names confined to their folder.

Every failure is a :class:`~kindred.KindredFormatError` naming the file and where in it: the byte offset of
invalid UTF-8, the line of a syntax error, of too deep a nesting or of an out-of-range number literal.
The limits are checked before the parsed value is built (JSON's and YAML's own parsers recurse, a YAML
alias bomb shares nodes that any traversal expands), so a hostile file fails in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import KindredFormatError

MAX_BYTES = 64 << 20  # config-sized files; tokenizer.json callers pass their own limit
MAX_DEPTH = 64  # real configs nest 4 deep; tokenizer.json 6
MAX_YAML_NODES = 100_000  # after alias expansion
MAX_NUMBER_CHARS = 100  # an integer literal longer than this is refused (int() of 4300+ digits raises)

# A JSON string (no raw newline can be inside one) or a bracket: what the depth scan looks at.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\\n]|\\.)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def read_limited(path: str | os.PathLike, limit: int = MAX_BYTES, what: str = "file") -> bytes:
    """The bytes of ``path``, refused if it is not a regular file or holds more than ``limit`` bytes."""
    p = Path(path)
    if not p.is_file():  # a folder, a FIFO (which would block) or nothing
        raise KindredFormatError(f"{p}: no such {what}" if not p.exists() else f"{p}: not a regular file")
    try:
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise KindredFormatError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > limit:
        raise KindredFormatError(f"{p}: the {what} is larger than the {limit:,} bytes kindred reads")
    return data


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as text; invalid UTF-8 names the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KindredFormatError(f"{where}: invalid UTF-8 at byte {e.start}") from None


def _line_of(data: bytes | str, pos: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, pos) + 1


def check_json_depth(data: bytes, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON text nesting arrays/objects deeper than ``max_depth`` (strings are skipped)."""
    depth = 0
    for m in _JSON_TOKEN.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                at = f"line {_line_of(data, m.start())}: " if b"\n" in data.rstrip(b"\r\n") else ""
                raise KindredFormatError(f"{where}: {at}nested deeper than {max_depth} levels")
        elif c in (b"]", b"}"):
            depth -= 1


class _BadNumber(Exception):
    pass


def _parse_int(s: str) -> int:
    if len(s) > MAX_NUMBER_CHARS:
        raise _BadNumber(s)
    return int(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _BadNumber(s)
    return v


def _refuse_constant(s: str):
    raise _BadNumber(s)


def loads_json(
    data: bytes | str,
    where: str,
    *,
    max_depth: int = MAX_DEPTH,
    limit: int = MAX_BYTES,
    allow_surrogates: bool = False,
) -> Any:
    """Parse JSON from untrusted bytes: UTF-8, at most ``limit`` bytes and ``max_depth`` levels, finite
    numbers (NaN, Infinity and 1e400 are refused), integer literals of at most 100 digits, no string with
    a lone surrogate escape (unless ``allow_surrogates``: the caller checks its strings field by field)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > limit:
        raise KindredFormatError(f"{where}: larger than the {limit:,} bytes kindred reads")
    text = decode_utf8(raw, where)
    check_json_depth(raw, where, max_depth)
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as e:
        if "\n" in text.rstrip("\r\n"):
            raise KindredFormatError(
                f"{where}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}"
            ) from None
        raise KindredFormatError(f"{where}: malformed JSON at byte {e.pos}: {e.msg}") from None
    except _BadNumber as e:
        literal = str(e)
        at = text.find(literal)
        line = f" line {_line_of(text, at)}:" if at >= 0 and "\n" in text.rstrip("\r\n") else ""
        raise KindredFormatError(
            f"{where}:{line} number {literal[:40]!r} is out of range (not a finite value kindred reads)"
        ) from None
    except RecursionError:  # cannot happen under the depth check; kept for a caller's tiny stack
        raise KindredFormatError(f"{where}: nested too deeply") from None
    if not allow_surrogates and _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(value, raw, where)
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` holding a lone UTF-16 surrogate (JSON's or YAML's
    escape \\ud800 alone): not Unicode, it fails the first time the string is encoded (a file name)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
    return None


def _check_surrogates(value: Any, raw: bytes, where: str) -> None:
    bad = _lone_surrogate(value)
    if bad is not None:
        m = _SURROGATE_ESCAPE.search(raw)
        line = f" line {_line_of(raw, m.start())}:" if b"\n" in raw.rstrip(b"\r\n") else ""
        raise KindredFormatError(
            f"{where}:{line} a string holds a lone UTF-16 surrogate escape ({_short(bad)})"
        )


def load_json(path: str | os.PathLike, *, limit: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """:func:`loads_json` of the file ``path`` (errors name it)."""
    return loads_json(read_limited(path, limit, "JSON file"), str(path), max_depth=max_depth, limit=limit)


def json_object(path: str | os.PathLike, **limits) -> dict:
    """:func:`load_json` of a file that must hold a JSON object."""
    obj = load_json(path, **limits)
    if not isinstance(obj, dict):
        raise KindredFormatError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def loads_yaml(
    data: bytes | str, where: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES
) -> Any:
    """Parse one YAML document (PyYAML's safe loader) from untrusted bytes.

    The event stream is checked first: nesting depth, and the size of the document with every alias
    expanded (a "billion laughs" bomb), and an alias inside the collection it names (a self-reference).
    """
    import yaml

    text = decode_utf8(data, where) if isinstance(data, bytes) else data

    def mark_error(e: yaml.YAMLError) -> KindredFormatError:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        return KindredFormatError(f"{where}: not valid YAML{at}: {problem}")

    sizes: dict[str, int] = {}  # anchor -> expanded node count
    stack: list[list] = [[None, 0]]  # [anchor of the open collection, nodes so far]
    open_anchors: set[str] = set()
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            line = ev.start_mark.line + 1
            if isinstance(ev, yaml.CollectionStartEvent):
                if len(stack) > max_depth:
                    raise KindredFormatError(f"{where}: line {line}: nested deeper than {max_depth} levels")
                stack.append([ev.anchor, 1])
                if ev.anchor:
                    open_anchors.add(ev.anchor)
            elif isinstance(ev, yaml.CollectionEndEvent):
                anchor, n = stack.pop()
                if anchor:
                    sizes[anchor] = n
                    open_anchors.discard(anchor)
                stack[-1][1] += n
            elif isinstance(ev, yaml.ScalarEvent):
                if ev.anchor:
                    sizes[ev.anchor] = 1
                stack[-1][1] += 1
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor in open_anchors:
                    raise KindredFormatError(
                        f"{where}: line {line}: alias *{ev.anchor} refers to a collection that contains it"
                    )
                if ev.anchor not in sizes:
                    raise KindredFormatError(f"{where}: line {line}: alias *{ev.anchor} names no anchor")
                stack[-1][1] += sizes[ev.anchor]
            else:
                continue
            if stack[0][1] + sum(s[1] for s in stack[1:]) > max_nodes:
                raise KindredFormatError(
                    f"{where}: line {line}: more than {max_nodes:,} values once aliases are expanded"
                )
        value = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise mark_error(e) from None
    except KindredFormatError:
        raise
    except (ValueError, OverflowError, TypeError) as e:  # constructors: a date like 2001-02-30, huge ints
        raise KindredFormatError(f"{where}: a value cannot be read ({e})") from None
    bad = _lone_surrogate(value)
    if bad is not None:
        raise KindredFormatError(f"{where}: a string holds a lone UTF-16 surrogate escape ({_short(bad)})")
    return value


def load_yaml(path: str | os.PathLike, *, limit: int = 256 << 10, **limits) -> Any:
    """:func:`loads_yaml` of the file ``path`` (errors name it)."""
    return loads_yaml(read_limited(path, limit, "YAML file"), str(path), **limits)


def confined(folder: str | os.PathLike, name: Any, what: str = "file name") -> Path:
    """``folder / name`` for a relative ``name`` read from a file, refused when it is not a plain relative
    path (absolute, with a ``..`` part, empty) or resolves, through symlinks, outside ``folder`` (except
    into the ``blobs`` folder of a Hugging Face cache snapshot, which is how the hub cache stores files)."""
    root = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        raise KindredFormatError(f"{root}: {what} {_short(name)} is not a file name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape such as \ud800
        raise KindredFormatError(f"{root}: {what} {_short(name)} is not valid UTF-8") from None
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", name):
        raise KindredFormatError(f"{root}: {what} {_short(name)} must be a relative path inside the folder")
    if any(len(part.encode("utf-8")) > 255 for part in rel.parts):
        raise KindredFormatError(f"{root}: {what} {_short(name)} has a part longer than 255 bytes")
    target = root / rel
    try:
        base = root.resolve()
        resolved = target.resolve()
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise KindredFormatError(f"{root}: {what} {_short(name)} cannot be resolved ({e})") from None
    # A Hugging Face cache snapshot (<repo>/snapshots/<rev>/) links its files to <repo>/blobs/.
    blobs = base.parent.parent / "blobs" if base.parent.name == "snapshots" else None
    inside = resolved == base or base in resolved.parents
    if not inside and not (blobs is not None and resolved.parent == blobs):
        raise KindredFormatError(f"{root}: {what} {_short(name)} resolves outside the folder (to {resolved})")
    return target


def check_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a bool) in [lo, hi]; ``what`` names file and key."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KindredFormatError(f"{what} must be an integer in [{lo}, {hi:,}], got {_short(value)}")
    return value


def check_float(value: Any, what: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``float(value)`` if it is a finite number (not a bool) in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value) if abs(value) < 1e308 else math.inf
        ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise KindredFormatError(f"{what} must be a number in {bracket}{lo:g}, {hi:g}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."
