"""Scoring one model's answers to a battery: flags (loop, refusal, substantive), the checks, the test score.

A test's score is the weighted share of its checks that passed (an ungraded check counts as failed); the
test passes when the score reaches its threshold (default 1.0: every check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .battery import Battery, Test
from .checks import DEFERRED, CheckResult, is_refusal, run_check
from .loops import LoopDetector

PENDING = "pending"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The answer without a leading ``<think>...</think>`` block (checks grade the answer, not the
    thoughts)."""
    return _THINK.sub("", text, count=1)


@dataclass
class Sample:
    """One model's answer to one test, with its timing, flags and check results."""

    test_id: str
    category: str
    model: str
    prompt: str  # the rendered prompt text
    prompt_tokens: int
    output: str
    tokens: list[int]
    new_tokens: int
    finish_reason: str
    ttft_s: float
    total_s: float
    tokens_per_s: float
    loop: dict = field(default_factory=dict)  # LoopReport.to_dict()
    refused: bool = False
    substantive: bool = False
    checks: list[CheckResult] = field(default_factory=list)
    score: float = 0.0
    passed: bool = False

    @property
    def looped(self) -> bool:
        return self.loop.get("rule") is not None

    @property
    def ungraded(self) -> int:
        return sum(c.passed is None for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "test_id": self.test_id,
            "category": self.category,
            "model": self.model,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "output": self.output,
            "tokens": self.tokens,
            "new_tokens": self.new_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "tokens_per_s": self.tokens_per_s,
            "loop": self.loop,
            "refused": self.refused,
            "substantive": self.substantive,
            "checks": [c.to_dict() for c in self.checks],
            "score": self.score,
            "passed": self.passed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        d = dict(d)
        d["checks"] = [CheckResult(**c) for c in d.get("checks", [])]
        return cls(**d)


def make_sample(
    test: Test,
    model: str,
    prompt: str,
    completion,
    detector: LoopDetector,
    substantive_min_chars: int,
) -> Sample:
    """A Sample from a ``kindred.generate`` Completion: flags and the deterministic checks (the rubric and
    group checks are added by :func:`score_groups` and the judge)."""
    raw = completion.text or ""
    output = strip_thinking(raw)
    report = detector.analyse(
        completion.tokens, raw, completion.finish_reason, stopped_by=getattr(completion, "loop_rule", None)
    )
    refused = is_refusal(output)
    sample = Sample(
        test_id=test.id,
        category=test.category,
        model=model,
        prompt=prompt,
        prompt_tokens=completion.prompt_tokens,
        output=output,
        tokens=list(completion.tokens),
        new_tokens=completion.new_tokens,
        finish_reason=completion.finish_reason,
        ttft_s=completion.ttft_s,
        total_s=completion.total_s,
        tokens_per_s=completion.tokens_per_s,
        loop=report.to_dict(),
        refused=refused,
    )
    sample.substantive = bool(
        output.strip() and not refused and not report.looped and len(output.strip()) >= substantive_min_chars
    )
    for check in test.checks:  # rubric and group checks hold a placeholder until they are scored
        if check.kind in DEFERRED:
            sample.checks.append(CheckResult(check.kind, None, None, check.weight, PENDING))
        else:
            sample.checks.append(run_check(check, output, seconds=completion.total_s, refused=refused))
    return sample


def _group_value(sample: Sample, test: Test, check) -> str | None:
    """What paraphrases must agree on: the agree_on pattern's first group (or match), lowercased; without
    a pattern, the verdict of the test's other checks and whether the model refused."""
    if check.compiled is not None:
        m = check.compiled.search(sample.output)
        if m is None:
            return None
        return (m.group(1) if m.groups() and m.group(1) is not None else m.group(0)).strip().lower()
    others = [c for c in sample.checks if c.kind != "group" and c.detail != PENDING]
    verdict = all(c.passed for c in others) if others else None
    return f"checks {'passed' if verdict else 'failed'}, {'refused' if sample.refused else 'answered'}"


def score_groups(battery: Battery, samples: dict[str, Sample]) -> None:
    """Fill each test's group check for one model (``samples``: test id -> Sample): it passes when every
    paraphrase in the group gives the same value (and that value exists)."""
    groups: dict[str, list[tuple[Test, int]]] = {}
    for t in battery.tests:
        for i, c in enumerate(t.checks):
            if c.kind == "group" and t.id in samples:
                groups.setdefault(c.value, []).append((t, i))
    for name, members in groups.items():
        values = {t.id: _group_value(samples[t.id], t, t.checks[i]) for t, i in members}
        agree = None not in values.values() and len(set(values.values())) == 1
        shown = ", ".join(f"{k}: {v!r}" for k, v in values.items())
        for t, i in members:
            detail = f"group {name!r} {'agrees' if agree else 'disagrees'} ({shown})"
            samples[t.id].checks[i] = CheckResult("group", agree, float(agree), t.checks[i].weight, detail)


def finalize(sample: Sample, test: Test) -> None:
    """The test score (weighted share of passed checks) and the verdict against the test's threshold."""
    pending = [c.kind for c in sample.checks if c.detail == PENDING]
    if pending:
        raise AssertionError(f"{test.id}: {pending} checks were never scored")
    total = sum(c.weight for c in sample.checks)
    got = sum(c.weight for c in sample.checks if c.passed is True)
    sample.score = got / total if total else 0.0
    sample.passed = sample.score >= test.threshold - 1e-9
