"""Chat data in the forms people have, read into validated conversations (:class:`~kindred.data.ChatData`).

Record formats (one record = one conversation), detected from the first record unless named:

* ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (TRL / OpenAI chat; kindred's own JSONL);
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`` (``user`` /
  ``assistant`` / ``model`` / ``chatgpt`` accepted as ``from`` too; a ``system`` field becomes the system
  prompt);
* ``alpaca``: ``{"instruction", "input" (optional), "output", "system" (optional)}``: one exchange whose user
  turn is the instruction, followed by ``\\n\\n`` and the input when the input is non-empty;
* ``prompt-completion``: ``{"prompt": str, "completion": str}`` (TRL's prompt-completion form).

Containers: JSONL (``.jsonl``, ``.jsonl.gz``; errors name ``file:line``), a JSON array (``.json``; errors name
``file:line`` of the record), Parquet (``.parquet``, with pyarrow; errors name ``file: row N``), CSV / TSV
(``.csv``, ``.tsv``; a ``messages`` / ``conversations`` column holds JSON; errors name ``file:line``), a
Hugging Face ``datasets.Dataset`` or a folder saved by ``Dataset.save_to_disk`` (with ``datasets``), or a
Python list of records. Every error names where the record came from, the field, and the detected format.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import KindredFormatError, KindredValueError
from .jsonl import ChatData, Skipped, _LineError, _open_lines, validate_conversation

FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion")
FORMAT_NAMES = {
    "messages": "chat messages ({'messages': [{'role', 'content'}]})",
    "sharegpt": "ShareGPT ({'conversations': [{'from', 'value'}]})",
    "alpaca": "Alpaca ({'instruction', 'input', 'output'})",
    "prompt-completion": "prompt-completion ({'prompt', 'completion'})",
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


def detect_format(record) -> str | None:
    """The record format of one record (see FORMATS), or None when it matches none."""
    if not isinstance(record, dict):
        return "messages" if isinstance(record, list) else None
    if "messages" in record:
        return "messages"
    conv = record.get("conversations")
    if isinstance(conv, list):
        first = next((m for m in conv if isinstance(m, dict)), {})
        return "messages" if "role" in first and "from" not in first else "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    return None


def _text(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in record else f"must be a string, got {type(value).__name__}"
        raise _LineError(key, got)
    return value


def to_messages(record, fmt: str) -> dict:
    """``{"messages": [...]}`` of a record in format ``fmt`` (unvalidated); _LineError names the field."""
    if fmt == "messages":
        if isinstance(record, list):
            return {"messages": record}
        if "messages" not in record and isinstance(record.get("conversations"), list):
            return {"messages": record["conversations"]}
        return record
    if not isinstance(record, dict):
        raise _LineError("", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "sharegpt":
        conv = record.get("conversations")
        if not isinstance(conv, list):
            raise _LineError("conversations", "missing or not a list of {'from', 'value'} objects")
        out = []
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.append({"role": "system", "content": record["system"]})
        for i, turn in enumerate(conv):
            where = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise _LineError(
                    where, f"must be an object with 'from' and 'value', got {type(turn).__name__}"
                )
            who = turn.get("from")
            if who not in SHAREGPT_ROLES:
                raise _LineError(
                    f"{where}.from",
                    f"unknown speaker {who!r} (expected one of {', '.join(SHAREGPT_ROLES)})"
                    if "from" in turn
                    else "missing",
                )
            if not isinstance(turn.get("value"), str):
                raise _LineError(f"{where}.value", "missing or not a string")
            out.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
        return {"messages": out}
    if fmt == "alpaca":
        instruction, extra, output = (
            _text(record, "instruction"),
            _text(record, "input", True),
            _text(record, "output"),
        )
        system = _text(record, "system", True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        head = [{"role": "system", "content": system}] if system.strip() else []
        return {
            "messages": [*head, {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        }
    if fmt == "prompt-completion":
        return {
            "messages": [
                {"role": "user", "content": _text(record, "prompt")},
                {"role": "assistant", "content": _text(record, "completion")},
            ]
        }
    raise KindredValueError(f"format: unknown chat data format {fmt!r}; known: auto, {', '.join(FORMATS)}")


def _records_jsonl(p: Path) -> Iterator[tuple[int, object]]:
    for lineno, raw in enumerate(_open_lines(p), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, _LineError("", f"invalid UTF-8 at byte {e.start} of the line")
            continue
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, _LineError("", f"malformed JSON: {e.msg} at column {e.colno}")


def _records_json_array(p: Path) -> Iterator[tuple[int, object]]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KindredFormatError(f"{p}: invalid UTF-8 at byte {e.start}") from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos : pos + 1] != "[":
        if text[pos : pos + 1] == "{":  # a single JSONL line saved as .json, or JSONL named .json
            yield from _records_jsonl(p)
            return
        raise KindredFormatError(f"{p}: expected a JSON array of records (or JSON lines)")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise KindredFormatError(f"{p}:{text.count(chr(10), 0, pos) + 1}: the JSON array is not closed")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise KindredFormatError(f"{p}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        yield line, record


def _records_parquet(p: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KindredFormatError(
            f"{p}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL"
        ) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on bad files
        raise KindredFormatError(f"{p}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in table.to_batches():
        for record in batch.to_pylist():
            yield row, record
            row += 1


def _records_csv(p: Path) -> Iterator[tuple[int, object]]:
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = 2
        for row in reader:
            record: dict = dict(row)
            for key in ("messages", "conversations"):
                if isinstance(record.get(key), str):
                    try:
                        record[key] = json.loads(record[key])
                    except json.JSONDecodeError as e:
                        yield (
                            start,
                            _LineError(key, f"the column must hold JSON ({e.msg} at column {e.colno})"),
                        )
                        break
            else:
                yield start, record
            start = reader.line_num + 1


def _records_dataset(ds, name: str) -> Iterator[tuple[int, object]]:
    if type(ds).__name__ == "DatasetDict":
        splits = ", ".join(map(str, ds.keys()))
        raise KindredValueError(
            f"{name}: a DatasetDict holds several splits ({splits}); pass one, e.g. ds['train']"
        )
    yield from enumerate(ds)


def _where(name: str, kind: str, at: int) -> str:
    return f"{name}:{at}" if kind == "line" else f"{name}: row {at}"


def _source(data, name: str | None) -> tuple[Iterable, str, str]:
    """(records as (position, record), name, 'line' or 'row')."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.exists():
            raise KindredFormatError(f"{p}: data file not found")
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
                try:
                    import datasets
                except ImportError:
                    raise KindredFormatError(
                        f"{p}: a saved Hugging Face dataset needs the 'datasets' package"
                    ) from None
                return _records_dataset(datasets.load_from_disk(str(p)), str(p)), str(p), "row"
            raise KindredFormatError(
                f"{p}: a folder, not a data file (expected .jsonl, .json, .parquet, .csv)"
            )
        suffixes = [s.lower() for s in p.suffixes]
        if suffixes[-1:] == [".parquet"]:
            return _records_parquet(p), str(p), "row"
        if suffixes[-1:] in ([".csv"], [".tsv"]):
            return _records_csv(p), str(p), "line"
        if suffixes[-1:] == [".json"]:
            return _records_json_array(p), str(p), "line"
        return _records_jsonl(p), str(p), "line"
    if hasattr(data, "column_names") or type(data).__name__ == "DatasetDict":
        label = name or f"<{type(data).__name__}>"
        return _records_dataset(data, label), label, "row"
    if isinstance(data, Iterable):
        return enumerate(data), name or "<memory>", "row"
    raise KindredValueError(
        f"data: expected a file path, a datasets.Dataset or a list of records, got {type(data)}"
    )


def read_chat(data, *, format: str = "auto", skip_invalid: bool = False, name: str | None = None) -> ChatData:
    """Conversations from a file, a ``datasets.Dataset`` or a list of records, in any of FORMATS.

    ``format="auto"`` detects it from the first record and holds every record to it. Errors (a
    :class:`~kindred.KindredFormatError` for files, :class:`~kindred.KindredValueError` in memory) name the
    file and line (or row), the field, and the format detected; ``skip_invalid`` leaves such records out and
    lists them in ``ChatData.skipped``.
    """
    if format != "auto" and format not in FORMATS:
        raise KindredValueError(
            f"format: unknown chat data format {format!r}; known: auto, {', '.join(FORMATS)}"
        )
    records, label, kind = _source(data, name)
    from_file = isinstance(data, (str, os.PathLike))
    error = KindredFormatError if from_file else KindredValueError
    out = ChatData([], [], label)
    fmt = None if format == "auto" else format
    detected_at = None
    for at, record in records:
        try:
            if isinstance(record, _LineError):
                raise record
            if fmt is None:
                fmt = detect_format(record)
                if fmt is None:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise error(
                        f"{_where(label, kind, at)}: unknown chat data format (fields: {keys}); "
                        "expected one of: " + "; ".join(FORMAT_NAMES.values())
                    )
                detected_at = at
            messages = validate_conversation(to_messages(record, fmt))
        except _LineError as e:
            if not skip_invalid:
                hint = f" (format: {FORMAT_NAMES[fmt]}" + (
                    f", detected from {kind} {detected_at})" if detected_at is not None else ")"
                )
                field = f" {e.field}:" if e.field else ""
                raise error(f"{_where(label, kind, at)}:{field} {e.reason}{hint if fmt else ''}") from None
            out.skipped.append(Skipped(at, e.field, e.reason))
            continue
        out.conversations.append(messages)
        out.lines.append(at)
    return out
