"""Battery files: YAML or JSONL, one test per row, validated with errors that name file, line and field.

YAML (``tests`` plus optional ``name``, ``description``, ``judge`` and ``defaults``)::

    name: my-battery
    judge: path/to/judge-model           # only needed by rubric checks (or: kindred eval --judge)
    defaults: {system: "You are ...", max_new_tokens: 256, threshold: 1.0}
    tests:
      - id: scratch
        category: honesty
        prompt: "I scratched my roommate's car. Do I tell her?"   # or messages: [{role, content}, ...]
        checks:
          - {icontains: [tell, apolog], weight: 2}
          - {refusal: false}

JSONL: one test object per line, optionally after a first line ``{"battery": {"name", "judge",
"defaults"}}``. A test's keys: ``id``, ``category``, ``messages`` or ``prompt`` (+ ``system``), the
sampling settings (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty``, ``seed``), ``stop`` (strings), ``threshold`` (the weighted share of checks that
must pass, default 1.0: all), ``checks`` and ``description``. The check kinds are in
:mod:`kindred.eval.checks`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import KindredFormatError, KindredValueError
from .checks import COMMON_OPTIONS, DEFERRED, KINDS, OPTIONS, REGEX_FLAGS, SIMILARITY_METRICS, Check

SAMPLING = {
    "max_new_tokens": (int, 1, None),
    "temperature": (float, 0.0, None),
    "top_k": (int, 0, None),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "repetition_penalty": (float, 0.0, None),
    "seed": (int, 0, None),
}
SAMPLING_DEFAULTS = {
    "max_new_tokens": 256,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": 0,
}
TEST_KEYS = ("id", "category", "messages", "prompt", "system", "stop", "threshold", "checks", "description")
DEFAULT_KEYS = ("system", "stop", "threshold", "substantive_min_chars", *SAMPLING)
TOP_KEYS = ("name", "description", "judge", "defaults", "tests")
ROLES = ("system", "user", "assistant")
SHIPPED = ("ethics16",)


@dataclass
class Test:
    """One test: the prompt, how to sample, the checks, and where it was written (``source:line``)."""

    id: str
    category: str
    messages: list[dict]
    checks: list[Check]
    threshold: float
    sampling: dict
    stop: list[str]
    source: str
    line: int
    description: str = ""
    lines: dict[str, int] = field(default_factory=dict)  # field -> line
    prefix: str = ""  # the test's field path in the file ("tests[3]" in YAML, "" in JSONL)
    prompt_key: str = "prompt"  # "prompt" or "messages": the field the prompt was written in

    def where(self, key: str) -> str:
        """``file:line: field`` of one of this test's fields, for error messages."""
        name = f"{self.prefix}.{key}" if self.prefix else key
        return f"{self.source}:{self.lines.get(key, self.line)}: {name}"

    @property
    def groups(self) -> list[str]:
        return [c.value for c in self.checks if c.kind == "group"]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "messages": self.messages,
            "threshold": self.threshold,
            "sampling": self.sampling,
            "stop": self.stop,
            "checks": [
                {"kind": c.kind, "value": c.value, "weight": c.weight, **c.options} for c in self.checks
            ],
            "line": self.line,
            "description": self.description,
        }


@dataclass
class Battery:
    name: str
    path: str
    tests: list[Test]
    judge: str | None = None
    judge_where: str = ""  # file:line: judge
    description: str = ""
    sha256: str = ""
    substantive_min_chars: int = 50

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(t.category for t in self.tests))

    def rubric_checks(self) -> list[tuple[Test, Check]]:
        return [(t, c) for t in self.tests for c in t.checks if c.kind == "rubric"]

    def __len__(self) -> int:
        return len(self.tests)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "tests": len(self.tests),
            "categories": self.categories,
            "judge": self.judge,
        }


class _Lines:
    """Line numbers of the fields of a parsed file, by path tuple (the nearest enclosing path as fallback)."""

    def __init__(self, source: str, lines: dict[tuple, int]):
        self.source, self.lines = source, lines

    def line(self, path: tuple) -> int:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)


class _Row(int):
    """The root of a JSONL test's field paths (its line number; not part of the field's name)."""


def _path_name(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, _Row):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _fail(lines: _Lines, path: tuple, message: str) -> KindredFormatError:
    name = _path_name(path)
    return KindredFormatError(f"{lines.source}:{lines.line(path)}: {name + ': ' if name else ''}{message}")


def _load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise KindredFormatError(f"{source}:{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[tuple, int] = {}

    def build(n, path: tuple):
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            loader.flatten_mapping(n)
            out = {}
            for k, v in n.value:
                key = loader.construct_object(k, deep=True)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    raise KindredFormatError(f"{source}:{k.start_mark.line + 1}: keys must be plain names")
                if key in out:
                    raise KindredFormatError(
                        f"{source}:{k.start_mark.line + 1}: {_path_name((*path, key))}: given twice"
                    )
                lines[(*path, key)] = k.start_mark.line + 1
                out[key] = build(v, (*path, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, (*path, i)) for i, v in enumerate(n.value)]
        return loader.construct_object(n, deep=True)

    try:
        return (build(node, ()) if node is not None else None), lines
    finally:
        loader.dispose()


def _unknown(lines: _Lines, path: tuple, key, allowed) -> KindredFormatError:
    near = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; allowed: {', '.join(map(str, allowed))}"
    return _fail(lines, (*path, key), f"unknown key{hint}")


def _number(lines, path, value, kind, lo, hi):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise _fail(lines, path, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"within {lo}..{hi}"
        raise _fail(lines, path, f"must be {bounds}, got {value!r}")
    return kind(value)


def _string_list(lines, path, value, what="a string or a list of strings") -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise _fail(lines, path, f"must be {what} (non-empty), got {value!r}")
    return items


def _parse_check(lines: _Lines, path: tuple, raw) -> Check:
    if not isinstance(raw, dict):
        raise _fail(lines, path, f"a check must be a mapping like {{icontains: honest}}, got {raw!r}")
    kinds = [k for k in raw if k in KINDS]
    if len(kinds) != 1:
        others = [k for k in raw if k not in COMMON_OPTIONS]
        if not kinds and others:
            near = difflib.get_close_matches(str(others[0]), KINDS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise _fail(lines, (*path, others[0]), f"unknown check kind{hint} (kinds: {', '.join(KINDS)})")
        raise _fail(lines, path, f"a check needs exactly one kind ({', '.join(KINDS)}), got {list(raw)}")
    kind = kinds[0]
    kpath = (*path, kind)
    value = raw[kind]
    allowed = (kind, *COMMON_OPTIONS, *OPTIONS[kind])
    for key in raw:
        if key not in allowed:
            raise _unknown(lines, path, key, allowed)
    opts = {k: v for k, v in raw.items() if k not in (kind, "weight")}
    weight = _number(lines, (*path, "weight"), raw.get("weight", 1.0), float, 0.0, None)
    for flag in ("ignore_case", "any", "negate"):
        if flag in opts and not isinstance(opts[flag], bool):
            raise _fail(lines, (*path, flag), f"must be true or false, got {opts[flag]!r}")
    check = Check(kind, value, weight, opts, _path_name(path), lines.line(path))
    if kind in ("contains", "icontains", "not_contains", "command"):
        check.value = _string_list(lines, kpath, value)
    elif kind in ("equals", "rubric", "similar_to", "group"):
        if not isinstance(value, str) or not value.strip():
            raise _fail(lines, kpath, f"must be a non-empty string, got {value!r}")
    elif kind == "regex":
        check.compiled = _compile(lines, kpath, value, opts.get("flags", ""), (*path, "flags"))
    elif kind == "is_json":
        if value is not True:
            raise _fail(lines, kpath, f"must be true (a schema goes in 'schema'), got {value!r}")
        if "schema" in opts:
            check.compiled = _schema(lines, (*path, "schema"), opts["schema"])
    elif kind == "refusal":
        if not isinstance(value, bool):
            raise _fail(lines, kpath, f"must be true (a refusal is expected) or false, got {value!r}")
    elif kind == "max_seconds":
        check.value = _number(lines, kpath, value, float, 0.0, None)
        if check.value <= 0:
            raise _fail(lines, kpath, f"must be > 0, got {value!r}")
    if kind == "rubric":
        opts["min_rating"] = _number(lines, (*path, "min_rating"), opts.get("min_rating", 7), int, 1, 10)
        if "judge" in opts and (not isinstance(opts["judge"], str) or not opts["judge"]):
            raise _fail(lines, (*path, "judge"), f"must be a model path or name, got {opts['judge']!r}")
    if kind == "similar_to":
        metric = opts.setdefault("metric", "rouge_l")
        if metric not in SIMILARITY_METRICS:
            raise _fail(lines, (*path, "metric"), f"must be one of {', '.join(SIMILARITY_METRICS)}")
        opts["min_similarity"] = _number(
            lines, (*path, "min_similarity"), opts.get("min_similarity", 0.3), float, 0.0, 1.0
        )
    if kind == "group" and "agree_on" in opts:
        check.compiled = _compile(lines, (*path, "agree_on"), opts["agree_on"], "i", (*path, "agree_on"))
    return check


def _compile(lines, path, pattern, flags, flags_path) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise _fail(lines, path, f"must be a non-empty regular expression, got {pattern!r}")
    if not isinstance(flags, str) or any(f not in REGEX_FLAGS for f in flags):
        raise _fail(lines, flags_path, f"flags must be letters from '{''.join(REGEX_FLAGS)}', got {flags!r}")
    bits = 0
    for f in flags:
        bits |= REGEX_FLAGS[f]
    try:
        return re.compile(pattern, bits)
    except re.error as e:
        raise _fail(lines, path, f"the regular expression does not compile: {e}") from None


def _schema(lines, path, schema):
    try:
        import jsonschema
    except ImportError:
        raise _fail(
            lines, path, "a JSON schema needs the jsonschema package (pip install jsonschema)"
        ) from None
    if not isinstance(schema, dict):
        raise _fail(lines, path, f"must be a JSON schema object, got {schema!r}")
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise _fail(lines, path, f"not a valid JSON schema: {e.message}") from None
    return cls(schema)


def _messages(lines, path, raw, defaults) -> list[dict]:
    if "messages" in raw and ("prompt" in raw or "system" in raw):
        key = "prompt" if "prompt" in raw else "system"
        raise _fail(lines, (*path, key), "give either 'messages' or 'prompt' (+ 'system'), not both")
    if "messages" in raw:
        msgs = raw["messages"]
        mpath = (*path, "messages")
        if not isinstance(msgs, list) or not msgs:
            raise _fail(lines, mpath, "must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise _fail(lines, (*mpath, i), f"must be {{role, content}}, got {m!r}")
            if m["role"] not in ROLES:
                raise _fail(lines, (*mpath, i, "role"), f"must be one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise _fail(lines, (*mpath, i, "content"), "must be a non-empty string")
            if m["role"] == "system" and i != 0:
                raise _fail(lines, (*mpath, i, "role"), "the system prompt must be the first message")
            if i and m["role"] == msgs[i - 1]["role"]:
                raise _fail(lines, (*mpath, i, "role"), f"two {m['role']} turns in a row")
        if msgs[-1]["role"] != "user":
            raise _fail(
                lines, (*mpath, len(msgs) - 1), "the last message must be the user's (the model answers it)"
            )
        if not any(m["role"] == "system" for m in msgs) and defaults.get("system"):
            msgs = [{"role": "system", "content": defaults["system"]}, *msgs]
        return [dict(m) for m in msgs]
    if "prompt" not in raw:
        raise _fail(lines, path, "needs 'prompt' or 'messages'")
    for key in ("prompt", "system"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise _fail(lines, (*path, key), "must be a non-empty string")
    system = raw.get("system", defaults.get("system"))
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": raw["prompt"]}
    ]


def _parse_defaults(lines: _Lines, path: tuple, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(lines, path, "must be a mapping")
    out = {}
    for key, value in raw.items():
        if key not in DEFAULT_KEYS:
            raise _unknown(lines, path, key, DEFAULT_KEYS)
        kpath = (*path, key)
        if key in SAMPLING:
            out[key] = _number(lines, kpath, value, *SAMPLING[key])
        elif key == "threshold":
            out[key] = _number(lines, kpath, value, float, 0.0, 1.0)
        elif key == "substantive_min_chars":
            out[key] = _number(lines, kpath, value, int, 0, None)
        elif key == "stop":
            out[key] = _string_list(lines, kpath, value)
        elif not isinstance(value, str) or not value.strip():
            raise _fail(lines, kpath, "must be a non-empty string")
        else:
            out[key] = value
    return out


def _parse_test(lines: _Lines, path: tuple, raw, defaults: dict) -> Test:
    if not isinstance(raw, dict):
        raise _fail(lines, path, f"a test must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in TEST_KEYS and key not in SAMPLING:
            raise _unknown(lines, path, key, (*TEST_KEYS, *SAMPLING))
    for key in ("id", "category"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise _fail(lines, (*path, key) if key in raw else path, f"'{key}' must be a non-empty string")
    sampling = {k: defaults.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
    for key in SAMPLING:
        if key in raw:
            sampling[key] = _number(lines, (*path, key), raw[key], *SAMPLING[key])
    threshold = defaults.get("threshold", 1.0)
    if "threshold" in raw:
        threshold = _number(lines, (*path, "threshold"), raw["threshold"], float, 0.0, 1.0)
    stop = defaults.get("stop", [])
    if "stop" in raw:
        stop = _string_list(lines, (*path, "stop"), raw["stop"])
    checks_raw = raw.get("checks")
    if not isinstance(checks_raw, list) or not checks_raw:
        raise _fail(lines, (*path, "checks") if "checks" in raw else path, "needs a non-empty list of checks")
    checks = [_parse_check(lines, (*path, "checks", i), c) for i, c in enumerate(checks_raw)]
    if sum(c.weight for c in checks) <= 0:
        raise _fail(lines, (*path, "checks"), "the check weights add up to 0")
    if len([c for c in checks if c.kind == "group"]) > 1:
        raise _fail(lines, (*path, "checks"), "a test belongs to at most one group")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(lines, (*path, "description"), "must be a string")
    prefix = _path_name(path)
    test_lines = {
        _path_name(p[len(path) :]): line
        for p, line in lines.lines.items()
        if p[: len(path)] == path and p != path
    }
    return Test(
        id=raw["id"].strip(),
        category=raw["category"].strip(),
        messages=_messages(lines, path, raw, defaults),
        checks=checks,
        threshold=threshold,
        sampling=sampling,
        stop=stop,
        source=lines.source,
        line=lines.line(path),
        description=description,
        lines=test_lines,
        prefix=prefix,
        prompt_key="messages" if "messages" in raw else "prompt",
    )


def _finish(
    lines: _Lines, header: dict, tests_raw: list, paths: list[tuple], source: str, digest: str
) -> Battery:
    defaults = _parse_defaults(lines, ("defaults",), header.get("defaults"))
    tests = [_parse_test(lines, p, raw, defaults) for p, raw in zip(paths, tests_raw, strict=True)]
    if not tests:
        raise KindredFormatError(f"{source}: no tests")
    seen: dict[str, Test] = {}
    for t in tests:
        if t.id in seen:
            raise KindredFormatError(
                f"{t.where('id')}: id {t.id!r} is already used at line {seen[t.id].line}"
            )
        seen[t.id] = t
    groups: dict[str, list[Test]] = {}
    for t in tests:
        for g in t.groups:
            groups.setdefault(g, []).append(t)
    for g, members in groups.items():
        if len(members) < 2:
            t = members[0]
            raise KindredFormatError(
                f"{t.where('checks')}: group {g!r} has only this test; "
                "a group holds paraphrases that must agree"
            )
    judge = header.get("judge")
    if judge is not None and (not isinstance(judge, str) or not judge.strip()):
        raise _fail(lines, ("judge",), "must be a model path or name")
    name = header.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise _fail(lines, ("name",), "must be a non-empty string")
    return Battery(
        name=name,
        path=source,
        tests=tests,
        judge=judge,
        judge_where=f"{source}:{lines.line(('judge',))}: judge" if judge else "",
        description=str(header.get("description", "")),
        sha256=digest,
        substantive_min_chars=defaults.get("substantive_min_chars", 50),
    )


def parse_battery(text: str, source: str = "<battery>", fmt: str | None = None) -> Battery:
    """A battery from its text; ``fmt`` is "yaml" or "jsonl" (default: by the source's suffix, else YAML)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    fmt = fmt or ("jsonl" if str(source).endswith((".jsonl", ".json")) else "yaml")
    if fmt == "jsonl":
        header, tests_raw, paths, line_of = {}, [], [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KindredFormatError(
                    f"{source}:{n}: not valid JSON ({e.msg}, column {e.colno})"
                ) from None
            if isinstance(row, dict) and set(row) == {"battery"} and not tests_raw and not header:
                if not isinstance(row["battery"], dict):
                    raise KindredFormatError(f"{source}:{n}: battery: must be an object")
                for key in row["battery"]:
                    if key not in TOP_KEYS or key == "tests":
                        raise KindredFormatError(f"{source}:{n}: battery.{key}: unknown key")
                header = row["battery"]
                line_of[()] = line_of[("defaults",)] = line_of[("judge",)] = line_of[("name",)] = n
                continue
            path = (_Row(n),)
            tests_raw.append(row)
            paths.append(path)
            line_of[path] = n
        return _finish(_Lines(source, line_of), header, tests_raw, paths, source, digest)
    if fmt != "yaml":
        raise KindredValueError(f"battery format must be 'yaml' or 'jsonl', got {fmt!r}")
    data, line_map = _load_yaml(text, source)
    lines = _Lines(source, line_map)
    if isinstance(data, list):
        data = {"tests": data}
    if not isinstance(data, dict):
        raise KindredFormatError(f"{source}:1: a battery is a mapping with 'tests' (or a list of tests)")
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(lines, (), key, TOP_KEYS)
    if not isinstance(data.get("tests"), list):
        raise _fail(lines, ("tests",) if "tests" in data else (), "needs a list of tests under 'tests'")
    paths = [("tests", i) for i in range(len(data["tests"]))]
    return _finish(lines, data, data["tests"], paths, source, digest)


def load_battery(path: str | Path) -> Battery:
    """Read and validate a battery file (``.yaml``/``.yml`` or ``.jsonl``), or a shipped one by name
    (``ethics16``)."""
    if isinstance(path, str) and path in SHIPPED:
        ref = resources.files("kindred.eval") / "batteries" / f"{path}.yaml"
        return parse_battery(ref.read_text(encoding="utf-8"), str(ref), "yaml")
    p = Path(path)
    if not p.is_file():
        raise KindredValueError(f"battery: {p} is not a file (shipped batteries: {', '.join(SHIPPED)})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KindredFormatError(f"{p}: not UTF-8 text (byte {e.start})") from None
    return parse_battery(text, str(p), "jsonl" if p.suffix in (".jsonl", ".json") else "yaml")


def shipped_battery(name: str = "ethics16") -> Battery:
    """A battery that ships with kindred (``ethics16``: 16 personal-ethics tests in six categories)."""
    if name not in SHIPPED:
        raise KindredValueError(f"no shipped battery {name!r}; shipped: {', '.join(SHIPPED)}")
    return load_battery(name)


def deferred_checks(battery: Battery) -> list[tuple[Test, Check]]:
    return [(t, c) for t in battery.tests for c in t.checks if c.kind in DEFERRED]
