"""A small evaluator of the Go text/template subset that kindred's Ollama TEMPLATEs use, written from Go's
documentation (pkg.go.dev/text/template): text, trim markers ``{{-`` / ``-}}``, ``{{ .Field }}``,
variables (``$x := ...`` declares in the current block, ``$x = ...`` assigns the nearest), ``if`` /
``else if`` / ``else``, ``range`` over a list (with ``$i, $m :=``), parentheses and the functions ``eq``,
``ne``, ``and``, ``not``. Anything else raises, so a template outside the subset cannot pass silently."""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _chunks(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _parse(chunks, i=0, stop=("end",)):
    """Nodes until an action whose first word is in ``stop``; returns (nodes, index, stopping action)."""
    nodes = []
    while i < len(chunks):
        kind, body = chunks[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i, body
        if word == "if":
            branches, cond = [], body[3:]
            while True:
                inner, i, ended = _parse(chunks, i, ("end", "else"))
                branches.append((cond, inner))
                if ended == "end":
                    break
                cond = ended[len("else if ") :] if ended.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif word == "range":
            inner, i, ended = _parse(chunks, i, ("end",))
            nodes.append(("range", body[6:], inner))
        else:
            nodes.append(("action", body))
    return nodes, i, None


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise KeyError(f"undefined variable {name}")

    def set(self, name, value):
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise KeyError(f"assignment to undeclared variable {name}")


def _truth(v) -> bool:
    return bool(v)


def _field(v, path: list[str]):
    for p in path:
        v = v[p] if isinstance(v, dict) else getattr(v, p)
    return v


_WORD = re.compile(r'\((?:[^()]|\([^()]*\))*\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def _words(expr: str) -> list[str]:
    """The words of a pipeline: parenthesised sub-expressions, string literals, operands and names."""
    return _WORD.findall(expr)


def _value(word: str, dot, scope):
    if word.startswith("("):
        return _eval(word[1:-1], dot, scope)
    if word.startswith('"'):
        return word[1:-1].encode().decode("unicode_escape")
    if word in ("true", "false"):
        return word == "true"
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word == ".":
        return dot
    if word.startswith("."):
        return _field(dot, word[1:].split("."))
    if word.startswith("$"):
        name, *path = word.split(".")
        return _field(scope.get(name), path)
    raise ValueError(f"outside the subset: {word!r}")


_FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "not": lambda a: not _truth(a),
}


def _eval(expr: str, dot, scope):
    words = _words(expr.strip())
    if words[0] in _FUNCS:
        return _FUNCS[words[0]](*(_value(w, dot, scope) for w in words[1:]))
    if len(words) != 1:
        raise ValueError(f"outside the subset: {expr!r}")
    return _value(words[0], dot, scope)


def _run(nodes, dot, scope, out: list[str]):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            body = node[1]
            m = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", body, re.S)
            if m:
                value = _eval(m.group(3), dot, scope)
                if m.group(2) == ":=":
                    scope.frames[-1][m.group(1)] = value
                else:
                    scope.set(m.group(1), value)
            else:
                v = _eval(body, dot, scope)
                out.append(v if isinstance(v, str) else str(v))
        elif node[0] == "if":
            for cond, inner in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    scope.frames.append({})
                    _run(inner, dot, scope, out)
                    scope.frames.pop()
                    break
        elif node[0] == "range":
            head, inner = node[1], node[2]
            m = re.fullmatch(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", head)
            items = _eval(m.group(3) if m else head, dot, scope)
            for i, item in enumerate(items):
                scope.frames.append({m.group(1): i, m.group(2): item} if m else {})
                _run(inner, item, scope, out)
                scope.frames.pop()


def render(template: str, data: dict) -> str:
    """The text of ``template`` executed on ``data`` (dicts for Go structs)."""
    nodes, _, ended = _parse(_chunks(template), 0, ())
    if ended is not None:
        raise ValueError(f"unbalanced template: stray {{{{ {ended} }}}}")
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)
