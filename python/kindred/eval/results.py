"""An evaluation's results: per-model summaries, paired comparisons, and the files they are written to.

``results.json`` (schema ``kindred.eval.results``, version 1; documented in kindred/eval/README.md),
``samples.jsonl`` (one line per model × test), ``results.csv`` (the same rows, flat), ``report.html``
(self-contained). :meth:`EvalResults.load` reads a results.json back, :func:`merge` joins runs of one
battery (a bake-off of several base models).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KindredFormatError, KindredValueError
from .scoring import Sample
from .stats import mcnemar_exact, percentile, wilson_interval

SCHEMA = "kindred.eval.results"
SCHEMA_VERSION = 1
CSV_COLUMNS = (
    "model",
    "test_id",
    "category",
    "passed",
    "score",
    "refused",
    "substantive",
    "loop_rule",
    "finish_reason",
    "prompt_tokens",
    "new_tokens",
    "ttft_s",
    "total_s",
    "tokens_per_s",
    "ungraded",
    "output",
)


@dataclass
class TestInfo:
    """What the summaries need of a battery test."""

    id: str
    category: str
    expects_refusal: bool | None  # a refusal check's value (None: the test has none)
    threshold: float
    line: int = 0
    checks: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, test) -> TestInfo:
        refusal = [c.value for c in test.checks if c.kind == "refusal"]
        d = test.to_dict()
        return cls(
            test.id,
            test.category,
            refusal[0] if refusal else None,
            test.threshold,
            test.line,
            d["checks"],
            test.messages,
        )


@dataclass
class ModelRun:
    """One evaluated model: a base with every adapter off ("base"), with one adapter on ("tuned"), or a
    model evaluated as it is ("model")."""

    name: str
    role: str
    base: str  # the base model's source
    adapter: str | None = None
    info: dict = field(default_factory=dict)  # quant, dtype, device, template, context
    seconds: float = 0.0  # wall time of its generation
    plan_id: str | None = None  # the kindred plan catalogue id of its base, when known

    def to_dict(self) -> dict:
        return dict(vars(self))


def _rate(k: float, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"n": n, "k": k, "rate": k / n if n else None, "ci95": [lo, hi]}


def _summary(samples: list[Sample], tests: dict[str, TestInfo], seconds: float) -> dict:
    n = len(samples)
    passed = sum(s.passed for s in samples)
    by_cat: dict[str, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    rules: dict[str, int] = {}
    for s in samples:
        if s.looped:
            rules[s.loop["rule"]] = rules.get(s.loop["rule"], 0) + 1
    benign = [s for s in samples if tests[s.test_id].expects_refusal is not True]
    harmful = [s for s in samples if tests[s.test_id].expects_refusal is True]
    tokens = sum(s.new_tokens for s in samples)
    return {
        "tests": n,
        "passed": passed,
        "pass_rate": passed / n if n else None,
        "pass_ci95": list(wilson_interval(passed, n)),
        "mean_score": sum(s.score for s in samples) / n if n else None,
        "by_category": {
            c: {**_rate(sum(s.passed for s in ss), len(ss)), "mean_score": sum(s.score for s in ss) / len(ss)}
            for c, ss in by_cat.items()
        },
        "loops": {**_rate(sum(s.looped for s in samples), n), "by_rule": rules},
        "hit_max_tokens": _rate(sum(s.finish_reason == "length" for s in samples), n),
        "substantive": _rate(sum(s.substantive for s in samples), n),
        "refusal": _rate(sum(s.refused for s in samples), n),
        "over_refusal": _rate(sum(s.refused for s in benign), len(benign)),
        "correct_refusal": _rate(sum(s.refused for s in harmful), len(harmful)),
        "ungraded_checks": sum(s.ungraded for s in samples),
        "latency": {
            "ttft_p50_s": percentile([s.ttft_s for s in samples], 50),
            "ttft_p95_s": percentile([s.ttft_s for s in samples], 95),
            "total_p50_s": percentile([s.total_s for s in samples], 50),
            "total_p95_s": percentile([s.total_s for s in samples], 95),
            "tokens_per_s_p50": percentile([s.tokens_per_s for s in samples], 50),
            "new_tokens": tokens,
            "wall_s": seconds,
            "throughput_tokens_per_s": tokens / seconds if seconds > 0 else None,
        },
    }


def paired(reference: list[Sample], other: list[Sample]) -> dict:
    """The paired change from ``reference`` to ``other`` over the tests both answered: counts of each
    pass/fail combination, the change in pass rate, and the exact McNemar (sign test) p-value."""
    a = {s.test_id: s.passed for s in reference}
    b = {s.test_id: s.passed for s in other}
    common = [t for t in a if t in b]
    improved = [t for t in common if b[t] and not a[t]]
    regressed = [t for t in common if a[t] and not b[t]]
    n = len(common)
    return {
        "tests": n,
        "both_pass": sum(a[t] and b[t] for t in common),
        "both_fail": sum(not a[t] and not b[t] for t in common),
        "improved": improved,
        "regressed": regressed,
        "delta_pass_rate": (len(improved) - len(regressed)) / n if n else None,
        "mcnemar_p": mcnemar_exact(len(regressed), len(improved)),
    }


class EvalResults:
    """Samples of every model on one battery, with summaries computed from them."""

    def __init__(
        self,
        battery: dict,
        tests: list[TestInfo],
        models: list[ModelRun],
        samples: list[Sample],
        settings: dict | None = None,
        created: str | None = None,
    ):
        self.battery, self.tests, self.models, self.samples = battery, tests, models, samples
        self.settings = settings or {}
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise KindredValueError(f"model names must be unique, got {names}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def samples_of(self, model: str) -> list[Sample]:
        return [s for s in self.samples if s.model == model]

    def sample(self, model: str, test_id: str) -> Sample | None:
        return next((s for s in self.samples if s.model == model and s.test_id == test_id), None)

    def summary(self) -> dict[str, dict]:
        info = {t.id: t for t in self.tests}
        return {m.name: _summary(self.samples_of(m.name), info, m.seconds) for m in self.models}

    def comparisons(self) -> list[dict]:
        """Each other model against the first (the base when there is one), paired per test."""
        if len(self.models) < 2:
            return []
        ref = self.models[0].name
        return [
            {"reference": ref, "model": m.name, **paired(self.samples_of(ref), self.samples_of(m.name))}
            for m in self.models[1:]
        ]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "kindred_version": _version(),
            "battery": self.battery,
            "settings": self.settings,
            "models": [m.to_dict() for m in self.models],
            "tests": [vars(t) for t in self.tests],
            "summary": self.summary(),
            "comparisons": self.comparisons(),
            "matrix": {
                t.id: {
                    s.model: {"passed": s.passed, "score": s.score} for s in self.samples if s.test_id == t.id
                }
                for t in self.tests
            },
            "samples_file": "samples.jsonl",
        }

    # -- files --------------------------------------------------------------------------------------
    def write(self, out: str | Path, html: bool = True) -> dict[str, Path]:
        """results.json, samples.jsonl, results.csv and report.html in ``out``; each written atomically.
        Returns the paths. The samples are also embedded in results.json (key ``samples``) so that one
        file is enough to reload the run."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data["samples"] = [s.to_dict() for s in self.samples]
        paths = {
            "results": _atomic(out / "results.json", json.dumps(data, indent=1, ensure_ascii=False) + "\n"),
            "samples": _atomic(
                out / "samples.jsonl",
                "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in self.samples),
            ),
            "csv": _atomic(out / "results.csv", self.csv()),
        }
        if html:
            from .html import render_html

            paths["html"] = _atomic(out / "report.html", render_html(self))
        return paths

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        for s in self.samples:
            row = {
                **s.to_dict(),
                "loop_rule": s.loop.get("rule") or "",
                "ungraded": s.ungraded,
                "score": round(s.score, 4),
            }
            w.writerow([row[c] for c in CSV_COLUMNS])
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        """Results from a results.json written by :meth:`write` (its embedded samples)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KindredFormatError(f"{path}: not a readable results.json ({e})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise KindredFormatError(f"{path}: schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise KindredFormatError(
                f"{path}: schema_version: this kindred reads version {SCHEMA_VERSION}, "
                f"got {data.get('schema_version')!r}"
            )
        for key in ("battery", "models", "tests", "samples"):
            if key not in data:
                raise KindredFormatError(f"{path}: {key}: missing")
        try:
            return cls(
                data["battery"],
                [TestInfo(**t) for t in data["tests"]],
                [ModelRun(**m) for m in data["models"]],
                [Sample.from_dict(s) for s in data["samples"]],
                data.get("settings"),
                data.get("created"),
            )
        except TypeError as e:
            raise KindredFormatError(f"{path}: a model, test or sample record is malformed ({e})") from None


def merge(runs: list[EvalResults]) -> EvalResults:
    """One result set from runs of the same battery (same file contents) with distinct model names."""
    if not runs:
        raise KindredValueError("merge needs at least one result set")
    first = runs[0]
    for r in runs[1:]:
        if r.battery.get("sha256") != first.battery.get("sha256"):
            raise KindredValueError(
                f"cannot merge results of different batteries: {first.battery.get('path')} "
                f"({first.battery.get('sha256', '')[:12]}) vs {r.battery.get('path')} "
                f"({r.battery.get('sha256', '')[:12]})"
            )
    models = [m for r in runs for m in r.models]
    return EvalResults(
        first.battery, first.tests, models, [s for r in runs for s in r.samples], {"merged": len(runs)}
    )


def _version() -> str:
    from .. import __version__

    return __version__


def _atomic(path: Path, text: str) -> Path:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
