"""Chat data in JSONL: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`` per line
(the TRL / OpenAI chat format), optionally gzip'd; reading, validation and atomic writing.

Validation rules (each failure names file, line and field, e.g. ``data.jsonl:12: messages[3].role: ...``):
one JSON object per line with a ``messages`` list; every message an object with a known ``role`` and a string
``content`` in valid UTF-8; the system prompt, if any, first and only there; then user and assistant turns
alternating, starting with a user turn and ending with an assistant turn; no empty assistant content.
Assistant messages may carry a string ``reasoning_content`` (Qwen3's thinking); other keys are ignored.
Blank lines are skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..bounded import loads_json
from ..errors import KindredFormatError, KindredValueError

ROLES = ("system", "user", "assistant")
Message = dict
Conversation = list  # list[Message]


@dataclass(frozen=True)
class Skipped:
    """One invalid line left out under ``skip_invalid``."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return (
            f"line {self.line}: {self.field}: {self.reason}"
            if self.field
            else f"line {self.line}: {self.reason}"
        )


@dataclass
class ChatData:
    """Conversations read from a file, with where each came from and what was skipped."""

    conversations: list[Conversation]
    lines: list[int]  # 1-based line of each conversation
    path: str = "<memory>"
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)

    def where(self, i: int) -> str:
        """``file:line`` of conversation ``i``."""
        return f"{self.path}:{self.lines[i]}"


class _LineError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def validate_conversation(obj) -> Conversation:
    """The messages of one parsed JSONL record, or a _LineError naming the field."""
    if not isinstance(obj, dict):
        raise _LineError("", f"expected a JSON object with a 'messages' list, got {type(obj).__name__}")
    if "messages" not in obj:
        raise _LineError("messages", "missing (expected a list of {'role', 'content'} objects)")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _LineError("messages", f"must be a list, got {type(messages).__name__}")
    if not messages:
        raise _LineError("messages", "is empty")
    previous = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _LineError(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise _LineError(f"{where}.role", "missing")
        role = m["role"]
        if role not in ROLES:
            raise _LineError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m:
            raise _LineError(f"{where}.content", "missing")
        content = m["content"]
        if not isinstance(content, str):
            raise _LineError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        _check_text(content, f"{where}.content")
        if "reasoning_content" in m and m["reasoning_content"] is not None:
            if role != "assistant" or not isinstance(m["reasoning_content"], str):
                raise _LineError(f"{where}.reasoning_content", "must be a string on an assistant message")
            _check_text(m["reasoning_content"], f"{where}.reasoning_content")
        if role == "system":
            if i != 0:
                raise _LineError(f"{where}.role", "the system prompt must be the first message")
        elif role == "user":
            if previous == "user":
                raise _LineError(f"{where}.role", f"two user turns in a row (messages[{i - 1}] is also user)")
        else:  # assistant
            if previous == "assistant":
                raise _LineError(
                    f"{where}.role", f"two assistant turns in a row (messages[{i - 1}] is also assistant)"
                )
            if previous in (None, "system"):
                raise _LineError(
                    f"{where}.role", "the first turn after the system prompt must be a user turn"
                )
            if not content.strip():
                raise _LineError(f"{where}.content", "empty assistant content (nothing to train)")
        previous = role
    if previous != "assistant":
        raise _LineError(
            f"messages[{len(messages) - 1}].role",
            "the last message must be an assistant turn (nothing after it is trained)"
            if previous == "user"
            else "no user or assistant turn",
        )
    return messages


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _LineError(where, f"invalid UTF-8 / unpaired surrogate escape at character {e.start}") from None


def _open_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    if gz:
        with gzip.open(path, "rb") as f:
            yield from f
    else:
        with path.open("rb") as f:
            yield from f


def read_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False) -> ChatData:
    """Read and validate a chat JSONL file (``.gz`` or gzip magic: decompressed on the fly).

    Raises :class:`~kindred.KindredFormatError` naming ``file:line: field`` at the first invalid line, or,
    with ``skip_invalid``, leaves such lines out and lists them in ``ChatData.skipped``.
    """
    p = Path(path)
    if not p.is_file():
        raise KindredFormatError(f"{p}: data file not found" if not p.exists() else f"{p}: not a file")
    data = ChatData([], [], str(p))
    lineno = 0
    try:
        for lineno, raw in enumerate(_open_lines(p), start=1):
            try:
                if not raw.strip():
                    continue
                where = f"{p}:{lineno}"
                try:  # invalid UTF-8, malformed JSON, deep nesting or an out-of-range number
                    obj = loads_json(raw, where, allow_surrogates=True)  # named by field below
                except KindredFormatError as e:
                    raise _LineError("", str(e).removeprefix(f"{where}: ")) from None
                messages = validate_conversation(obj)
            except _LineError as e:
                if not skip_invalid:
                    where = f"{p}:{lineno}: {e.field}: " if e.field else f"{p}:{lineno}: "
                    raise KindredFormatError(where + e.reason) from None
                data.skipped.append(Skipped(lineno, e.field, e.reason))
                continue
            data.conversations.append(messages)
            data.lines.append(lineno)
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream, unreadable file
        raise KindredFormatError(f"{p}:{lineno + 1}: cannot read the file ({e})") from None
    return data


def from_conversations(
    conversations: Iterable, *, skip_invalid: bool = False, name: str = "<memory>"
) -> ChatData:
    """Validate in-memory conversations (lists of messages or ``{"messages": [...]}`` records)."""
    data = ChatData([], [], name)
    for i, conv in enumerate(conversations, start=1):
        try:
            messages = validate_conversation(conv if isinstance(conv, dict) else {"messages": conv})
        except _LineError as e:
            if not skip_invalid:
                raise KindredValueError(
                    f"{name}[{i - 1}]: {e.field}: {e.reason}" if e.field else e.reason
                ) from None
            data.skipped.append(Skipped(i, e.field, e.reason))
            continue
        data.conversations.append(messages)
        data.lines.append(i)
    return data


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write ``path`` through a temporary file in the same folder, renamed into place only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, conversations: Iterable) -> None:
    """Write conversations as chat JSONL (gzip'd when the name ends in .gz), atomically."""
    gz = str(path).endswith(".gz")
    with atomic_write(path) as f:
        out = gzip.GzipFile(fileobj=f, mode="wb", mtime=0) if gz else f
        for conv in conversations:
            record = conv if isinstance(conv, dict) else {"messages": conv}
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        if gz:
            out.close()
