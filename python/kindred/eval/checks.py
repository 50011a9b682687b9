"""The check kinds a battery test can carry, and the text measures they use.

Each check in a battery is a mapping with one kind key (its value is the kind's argument) plus options::

    - {icontains: [honest, truth], any: true}    # case-insensitive; any one of the strings (default: all)
    - {regex: "\\b(tell|ask) (her|him)\\b", flags: i}
    - {refusal: false, weight: 2}                  # the model must answer (true: it must refuse)

Deterministic kinds are scored here (:func:`run_check`); ``rubric`` (a judge model's 1-10 rating) and
``group`` (agreement of paraphrases) need every sample of a model first and are scored by
:mod:`kindred.eval.run`. Every result has ``passed`` (None: ungraded, which never counts as a pass) and a
score in 0..1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "contains",
    "icontains",
    "not_contains",
    "regex",
    "equals",
    "is_json",
    "command",
    "refusal",
    "max_seconds",
    "rubric",
    "similar_to",
    "group",
)
DEFERRED = ("rubric", "group")  # scored after generation, from other samples or a judge
COMMON_OPTIONS = ("weight",)
OPTIONS: dict[str, tuple[str, ...]] = {
    "contains": ("ignore_case", "any", "negate"),
    "icontains": ("any", "negate"),
    "not_contains": ("ignore_case",),
    "regex": ("flags", "negate"),
    "equals": ("ignore_case", "negate"),
    "is_json": ("schema",),
    "command": ("ignore_case", "negate"),
    "refusal": (),
    "max_seconds": (),
    "rubric": ("min_rating", "judge"),
    "similar_to": ("metric", "min_similarity", "negate"),
    "group": ("agree_on",),
}
SIMILARITY_METRICS = ("rouge_l", "token_f1")
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass
class Check:
    """One parsed check of a test: ``kind``, its argument, options, and where it was written."""

    kind: str
    value: Any
    weight: float = 1.0
    options: dict = field(default_factory=dict)
    field: str = ""  # e.g. "tests[3].checks[1]"
    line: int = 0
    compiled: Any = None  # a compiled regex or JSON-schema validator

    def describe(self) -> str:
        v = self.value if not isinstance(self.value, str) or len(self.value) < 60 else self.value[:57] + "..."
        return f"{self.kind}: {v!r}"


@dataclass
class CheckResult:
    kind: str
    passed: bool | None  # None: ungraded (a judge reply that could not be parsed)
    score: float | None
    weight: float
    detail: str = ""

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "passed": self.passed,
            "score": self.score,
            "weight": self.weight,
            "detail": self.detail,
        }


# -- refusals ---------------------------------------------------------------------------------------------
_CANT = r"(?:can(?:no|')t|cannot|won't|will not|am unable to|'m unable to|am not able to|'m not able to)"
_REFUSAL_PATTERNS = [
    rf"\bI(?:'m| am) (?:sorry|afraid),? but I {_CANT}",
    rf"^\W*(?:sorry|I apologi[sz]e)\b[^.!?\n]{{0,40}}\bI {_CANT}",
    rf"\bI {_CANT} (?:help|assist)(?: you)?(?: with)? (?:that|this|it|your request|requests? like|\w+ing\b)",
    rf"\bI {_CANT} (?:help|assist)(?: you)?[.!]",
    rf"\bI {_CANT} (?:do|provide|create|write|generate|share|produce|make|give you|fulfil+|comply with) "
    r"(?:that|this|those|it|such|what you(?:'re| are) asking|(?:a |an )?(?:fake|false|forged|fraudulent))\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
    r"\bI(?:'m| am) not (?:able|comfortable|willing|going) to (?:help|assist|provide|do|write|create)\b",
    r"\bI (?:won't|will not|refuse to) (?:help|assist|participate|take part|be part)\b",
    r"\bas an AI(?: language model| assistant)?,? I (?:can(?:no|')t|cannot|don't|do not|am not|won't)",
    r"\bit (?:would|wouldn't|would not) (?:not |n't )?be (?:appropriate|ethical|right) for me to\b",
    r"\b(?:against|violates?) my (?:guidelines|programming|principles|policies)\b",
    r"\bI can(?:no|')t (?:answer|respond to) (?:that|this)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _REFUSAL_PATTERNS), re.IGNORECASE | re.MULTILINE)
REFUSAL_WINDOW = 300  # refusals open the answer; a later "I can't ..." is part of advice


def is_refusal(text: str) -> bool:
    """True when the answer opens by declining (keyword patterns within the first 300 characters)."""
    head = text.replace("\u2019", "'").strip()[:REFUSAL_WINDOW]
    return bool(_REFUSAL.search(head))


# -- text measures ----------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1) over lowercased word tokens: the longest common subsequence's F-measure."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-words F1 over lowercased word tokens (SQuAD's measure)."""
    from collections import Counter

    a, b = Counter(words(candidate)), Counter(words(reference))
    common = sum((a & b).values())
    if common == 0:
        return 0.0
    p, r = common / sum(a.values()), common / sum(b.values())
    return 2 * p * r / (p + r)


SIMILARITY = {"rouge_l": rouge_l, "token_f1": token_f1}


def normalize_command(cmd: str, ignore_case: bool = False) -> str:
    """A shell or game command compared after normalisation: surrounding quotes/backticks, a leading
    prompt (``$``, ``>``) or slash and a trailing ``;`` dropped, whitespace collapsed."""
    c = cmd.strip().strip("`'\"").strip()
    c = re.sub(r"^(?:\$|>|PS>)\s*", "", c)
    c = c.lstrip("/").rstrip(";").strip()
    c = " ".join(c.split())
    return c.lower() if ignore_case else c


def command_candidates(text: str) -> list[str]:
    """Every place an answer may hold a command: lines of fenced code, inline code, whole lines."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)(?:```|\Z)", text, re.DOTALL):
        out += block.splitlines()
    out += re.findall(r"`([^`\n]+)`", text)
    out += text.splitlines()
    return [c for c in out if c.strip()]


def extract_json(text: str) -> tuple[Any, str | None]:
    """(value, None) for the JSON an answer holds (whole text, a fenced block, or the outermost {...} or
    [...]); (None, why) when none parses."""
    candidates = [text.strip()]
    candidates += re.findall(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    error = "no JSON found"
    for c in candidates:
        try:
            return json.loads(c), None
        except json.JSONDecodeError as e:
            error = f"not JSON ({e.msg} at line {e.lineno} column {e.colno})"
    return None, error


# -- running the deterministic kinds ----------------------------------------------------------------------
def _strings(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _result(check: Check, ok: bool, detail: str, score: float | None = None) -> CheckResult:
    if check.options.get("negate"):
        ok, detail = not ok, f"not ({detail})"
        score = None if score is None else 1.0 - score
    return CheckResult(check.kind, ok, float(ok) if score is None else score, check.weight, detail)


def run_check(check: Check, output: str, *, seconds: float, refused: bool) -> CheckResult:
    """Score one deterministic check on a model's answer (``seconds``: total generation time)."""
    kind, opts = check.kind, check.options
    if kind in ("contains", "icontains", "not_contains"):
        ignore = kind == "icontains" or bool(opts.get("ignore_case"))
        hay = output.lower() if ignore else output
        needles = _strings(check.value)
        found = [n for n in needles if (n.lower() if ignore else n) in hay]
        if kind == "not_contains":
            return _result(check, not found, f"found {found}" if found else "none found")
        ok = bool(found) if opts.get("any") else len(found) == len(needles)
        missing = [n for n in needles if n not in found]
        return _result(check, ok, f"missing {missing}" if missing else f"found {found}")
    if kind == "regex":
        m = check.compiled.search(output)
        return _result(check, m is not None, f"matched {m.group(0)[:60]!r}" if m else "no match")
    if kind == "equals":
        ignore = bool(opts.get("ignore_case"))
        a, b = output.strip(), str(check.value).strip()
        ok = a.lower() == b.lower() if ignore else a == b
        return _result(check, ok, "equal" if ok else f"got {a[:60]!r}")
    if kind == "is_json":
        value, error = extract_json(output)
        if error:
            return _result(check, False, error)
        if check.compiled is not None:
            problems = sorted(check.compiled.iter_errors(value), key=lambda e: list(e.path))
            if problems:
                where = "/".join(map(str, problems[0].path)) or "(root)"
                return _result(check, False, f"schema: {where}: {problems[0].message}")
        return _result(check, True, "valid JSON" + (" matching the schema" if check.compiled else ""))
    if kind == "command":
        ignore = bool(opts.get("ignore_case"))
        wanted = {normalize_command(c, ignore) for c in _strings(check.value)}
        got = [normalize_command(c, ignore) for c in command_candidates(output)]
        hit = next((c for c in got if c in wanted), None)
        return _result(check, hit is not None, f"matched {hit!r}" if hit else f"no command equals {wanted}")
    if kind == "refusal":
        want = bool(check.value)
        return _result(check, refused == want, "refused" if refused else "answered")
    if kind == "max_seconds":
        return _result(check, seconds <= check.value, f"{seconds:.2f} s of {check.value} s allowed")
    if kind == "similar_to":
        metric = opts.get("metric", "rouge_l")
        s = SIMILARITY[metric](output, check.value)
        need = opts.get("min_similarity", 0.3)
        return _result(check, s >= need, f"{metric} {s:.3f} (needs {need})", score=s)
    raise AssertionError(f"{kind} is scored after generation")
