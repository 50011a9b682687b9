"""SamplingConfig (how tokens are chosen) and Completion (what generation returns for one prompt)."""

from __future__ import annotations

import dataclasses
import math

from ..errors import KindredValueError

FINISH_REASONS = ("stop", "length", "stop_string", "loop")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen.

    temperature 0 is greedy (argmax after the repetition penalty); otherwise the logits are divided by the
    temperature, cut to the ``top_k`` best (0: all), to the smallest set whose probability reaches ``top_p``
    and to the tokens whose probability is at least ``min_p`` × the best one's, then sampled. The draw is a
    counter hash of (seed, prompt index, step): the same seed gives the same tokens, whatever the batch.
    ``repetition_penalty`` divides the positive logits (multiplies the negative ones) of every token already
    in the prompt or the reply, as transformers does.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise KindredValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise KindredValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise KindredValueError(f"top_k must be an integer >= 0 (0: no cut), got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise KindredValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p < 1:
            raise KindredValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise KindredValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise KindredValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    """One prompt's reply.

    ``tokens``: the new tokens, the stop token included when ``finish_reason`` is "stop". ``text``: their
    decoded text (None without a tokenizer), without the stop token, cut before a matched stop string.
    ``finish_reason``: "stop" (a stop token), "length" (max_new_tokens), "stop_string", or "loop" (the loop
    detector returned ``loop_rule``). Times are from the start of the prompt's batch: ``ttft_s`` to its
    first token, ``total_s`` to its last; ``tokens_per_s`` is new_tokens / total_s (prefill included).
    """

    tokens: list[int]
    text: str | None
    finish_reason: str
    loop_rule: str | None
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    tokens_per_s: float
