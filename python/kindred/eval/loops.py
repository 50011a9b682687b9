"""Loop detection on generated tokens: the rules, the per-output report, and a callable for the generator.

Four rules, each with its own name in a flagged output (``LoopReport.rule``):

* ``repeated_suffix``: a block of ``p`` tokens (1 <= p <= ``max_period``) repeated back to back at least
  ``min_repeats`` times, spanning at least ``min_loop_tokens`` tokens (``short_min_tokens`` when
  p <= ``short_period``, so "no, no, no" or ``)))`` stay healthy) and, when the detector can decode,
  ``min_loop_chars`` characters (a table rule ``|---|---|---|`` is no loop). Checked at every token;
* ``seq_rep``: seq-rep-n (1 - distinct n-grams / all n-grams, Welleck et al. 2019) above
  ``seq_rep_threshold`` once the output has ``seq_rep_min_tokens`` tokens;
* ``compression``: the zlib compression ratio of the text (bytes / compressed bytes, Whisper's measure)
  above ``compression_threshold`` once the text has ``compression_min_chars`` characters;
* ``max_tokens``: the output hit the token limit while being repetitive (seq-rep-n above
  ``length_seq_rep`` or compression ratio above ``length_compression``). Hitting the limit alone is
  reported (``LoopReport.hit_max_tokens``) but is not a loop: a long healthy answer gets cut too.

``seq_rep`` and ``compression`` look at the last ``window`` tokens, every ``check_every`` and
``compression_every`` tokens.
:meth:`LoopDetector.analyse` (after generation) replays what :meth:`LoopDetector.__call__` (during
generation, where the engine stops a row when it returns a rule name) would have said at each token, and
checks the end of the output too: both report the same rule for an output the engine did not stop.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import KindredValueError

RULES = ("repeated_suffix", "seq_rep", "compression", "max_tokens")


@dataclass(frozen=True)
class LoopConfig:
    """Thresholds of the rules (see the module docstring); defaults measured on tests/data/loops.jsonl."""

    min_repeats: int = 3
    min_loop_tokens: int = 12
    short_period: int = 3
    short_min_tokens: int = 24
    min_loop_chars: int = 32  # and at least this many characters of text (when the detector can decode)
    max_period: int = 256
    ngram: int = 4
    seq_rep_threshold: float = 0.5
    seq_rep_min_tokens: int = 48
    compression_threshold: float = 3.0
    compression_min_chars: int = 240
    length_seq_rep: float = 0.25
    length_compression: float = 2.4
    check_every: int = 32  # seq_rep runs every this many tokens
    compression_every: int = 64  # compression (which decodes the window) every this many
    window: int = 256  # seq_rep and compression look at the last this many tokens

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type in (int, "int") else (int, float)
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise KindredValueError(f"LoopConfig.{f.name} must be a positive {f.type}, got {value!r}")
        if self.min_repeats < 2:
            raise KindredValueError(f"LoopConfig.min_repeats must be >= 2, got {self.min_repeats}")
        if self.compression_every % self.check_every:
            raise KindredValueError(
                f"LoopConfig.compression_every ({self.compression_every}) must be a multiple of "
                f"check_every ({self.check_every})"
            )

    def min_span(self, period: int) -> int:
        """Tokens a loop of this period must cover to count."""
        floor = self.short_min_tokens if period <= self.short_period else self.min_loop_tokens
        # - 1: the first copy's first token often differs ("I" at the start vs " I" after a space)
        return max(self.min_repeats * period - 1, floor)


@dataclass
class LoopReport:
    """What the rules found in one output: ``rule`` is the first rule that fired (None: no loop)."""

    rule: str | None
    period: int | None  # the repeated block's length in tokens (repeated_suffix)
    repeats: int | None
    seq_rep: float  # seq-rep-n of the whole output
    compression_ratio: float | None  # of the whole text (None without text)
    hit_max_tokens: bool

    @property
    def looped(self) -> bool:
        return self.rule is not None

    def to_dict(self) -> dict:
        return asdict(self)


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float:
    """1 - (distinct n-grams / n-grams); 0.0 when there are no n-grams."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    tokens = list(tokens)
    return 1.0 - len(set(zip(*(tokens[i:] for i in range(n)), strict=False))) / total


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes (level 9); 0.0 for empty text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data, 9)) if data else 0.0


def _periodic_runs(a: np.ndarray, p: int, min_span: int) -> list[tuple[int, int]]:
    """(span, end) of each stretch where a[i] == a[i - p] covering >= min_span tokens (its first block
    included)."""
    eq = a[p:] == a[:-p]
    if not eq.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], eq.view(np.int8), [0]))))
    spans = edges[1::2] - edges[::2] + p
    return [(int(s), int(e) + p) for s, e in zip(spans, edges[1::2], strict=True) if s >= min_span]


def _primitive(block: Sequence[int]) -> bool:
    """True unless the block is itself a repetition of a shorter one (then that period is the loop's)."""
    p = len(block)
    return all(block[q:] != block[:-q] for q in range(1, p // 2 + 1) if p % q == 0)


class LoopDetector:
    """Loop rules over token ids, with ``decode`` (ids -> text) for the compression rule.

    ``detector(tokens)`` (the generated tokens so far) returns the name of a rule that fires at the last
    token, else None: pass it to ``kindred.generate(..., loop_detector=detector)`` to stop looping rows.
    ``detector.analyse(tokens, finish_reason=...)`` reports a finished output.
    """

    def __init__(self, config: LoopConfig | None = None, decode: Callable[[list[int]], str] | None = None):
        self.config = config or LoopConfig()
        self.decode = decode

    # -- during generation --------------------------------------------------------------------------
    def __call__(self, tokens: Sequence[int]) -> str | None:
        c = self.config
        n = len(tokens)
        if n >= 2 and self._suffix_loop(tokens) is not None:
            return "repeated_suffix"
        if n % c.check_every == 0:
            return self._statistical(tokens[-c.window :], compress=n % c.compression_every == 0)
        return None

    def _suffix_loop(self, tokens: Sequence[int]) -> int | None:
        """The period of the shortest-period loop ending at the last token, else None."""
        c = self.config
        n = len(tokens)
        top = min(c.max_period, (n + 1) // c.min_repeats)
        last, before = tokens[-1], tokens[-2]
        back = list(tokens[n - 1 - top : n - 1])[::-1]  # back[k] is tokens[n - 2 - k]: period k + 1
        k = -1
        while True:  # list.index scans in C: a healthy token costs a few microseconds
            try:
                k = back.index(last, k + 1)
            except ValueError:
                return None
            p = k + 1
            span = c.min_span(p)
            if span > n or tokens[n - 2 - p] != before:
                continue
            tail = list(tokens[n - span :])
            if tail[p:] == tail[:-p] and _primitive(tail[-p:]) and self._long_enough(tail):
                return p

    def _first_suffix_loop(self, tokens: list[int]) -> tuple[int, int, int] | None:
        """(tokens seen, period, repeats) when ``__call__`` would first return repeated_suffix, else None.

        A loop can only fire inside a stretch that is periodic for min_span(p) tokens, so only those
        positions are replayed."""
        c = self.config
        a = np.asarray(tokens, dtype=np.int64)
        top = min(c.max_period, (len(tokens) + 1) // c.min_repeats)
        runs = {p: _periodic_runs(a, p, c.min_span(p)) for p in range(1, top + 1)}
        candidates = sorted(
            {
                i
                for p, rs in runs.items()
                for span, end in rs
                for i in range(end - span + c.min_span(p), end + 1)
            }
        )
        for i in candidates:
            p = self._suffix_loop(tokens[:i])
            if p is not None:
                span = max(span for span, end in runs[p] if end - span < i <= end)
                return i, p, round(span / p)
        return None

    def _long_enough(self, span: list[int]) -> bool:
        return self.decode is None or len(self.decode(span)) >= self.config.min_loop_chars

    def _statistical(
        self, tokens: Sequence[int], text: str | None = None, compress: bool = True
    ) -> str | None:
        """seq_rep, then (if ``compress``) compression, over ``tokens`` (``text``: their text, if known)."""
        c = self.config
        if len(tokens) >= c.seq_rep_min_tokens and seq_rep_n(tokens, c.ngram) > c.seq_rep_threshold:
            return "seq_rep"
        if not compress:
            return None
        if text is None and self.decode is not None:
            text = self.decode(list(tokens))
        long_enough = text is not None and len(text) >= c.compression_min_chars
        if long_enough and compression_ratio(text) > c.compression_threshold:
            return "compression"
        return None

    # -- after generation ---------------------------------------------------------------------------
    def analyse(
        self,
        tokens: Sequence[int],
        text: str | None = None,
        finish_reason: str | None = None,
        stopped_by: str | None = None,
    ) -> LoopReport:
        """Every rule over a finished output. ``finish_reason`` "length" means the token limit was hit;
        ``stopped_by`` is the rule a detector stopped generation on (a Completion's ``loop_rule``)."""
        c = self.config
        tokens = [int(t) for t in tokens]
        if text is None and self.decode is not None:
            text = self.decode(tokens)
        rule = period = repeats = None
        loop = self._first_suffix_loop(tokens) if len(tokens) >= 2 else None
        ends = list(range(c.check_every, len(tokens) + 1, c.check_every))
        if not ends or ends[-1] != len(tokens):
            ends.append(len(tokens))  # after generation the end is checked too
        for end in ends:
            if loop is not None and loop[0] <= end:
                break
            last = end == len(tokens)
            window = tokens[max(0, end - c.window) : end]
            compress = last or end % c.compression_every == 0
            rule = self._statistical(window, text if last and end <= c.window else None, compress)
            if rule:
                break
        if rule is None and loop is not None:
            rule, (_, period, repeats) = "repeated_suffix", loop
        rep = seq_rep_n(tokens, c.ngram)
        ratio = compression_ratio(text) if text is not None else None
        hit = finish_reason == "length"
        if rule is None and hit and (rep > c.length_seq_rep or (ratio or 0.0) > c.length_compression):
            rule = "max_tokens"
        if rule is None and stopped_by is not None:  # a detector with other settings stopped it
            rule = stopped_by
        return LoopReport(rule, period, repeats, rep, ratio, hit)
