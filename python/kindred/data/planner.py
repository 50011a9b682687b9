"""Budget arithmetic of a user's notes: the conversation-length planner, the relative training cost of context
lengths, and the logits memory of a vocabulary.

Conversation-length planner: from a token budget, the system prompt's tokens, the measured tokens per
exchange (user + assistant turn) and a buffer for the answer being generated / template overhead:

    available = budget − system − buffer, rounded down to two significant digits for planning
    maximum   = ⌊available / tokens per exchange⌋
    recommended = ⌈0.7 × maximum⌉ … ⌊0.9 × maximum⌋   (10–30 % headroom for long exchanges)

Seed 004's worked example: budget 16K, system ~500, exchanges 400–600 tokens, buffer ~1K: 16,384 − 500 −
1,000 = 14,884 → ~14K available (16,000 − 500 − 1,024 = 14,476 gives the same 14,000); 14,000 / 500 = 28
exchanges at most; 0.7 × 28 = 19.6 → 20 and 0.9 × 28 = 25.2 → 25 recommended.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import KindredValueError

# Seed 004's relative training cost table: cost grows linearly with the context each sequence is padded to.
COST_CONTEXTS = (4096, 8192, 16384, 32768, 65536)
COST_BASE = 4096


def _k(x: int) -> str:
    return f"{x / 1000:g}K" if x >= 1000 else f"{x:,}"


def floor_2sig(x: int) -> int:
    """``x`` rounded down to two significant digits (14,884 → 14,000; 950 → 950; 1,592 → 1,500)."""
    if x <= 0:
        return 0
    step = 10 ** max(len(str(int(x))) - 2, 0)
    return int(x) // step * step


@dataclass(frozen=True)
class ConversationPlan:
    budget: int
    system_tokens: int
    tokens_per_exchange: float
    buffer: int
    available: int  # budget − system − buffer
    available_planning: int  # rounded down to two significant digits
    max_exchanges: int
    recommended: tuple[int, int]
    exchange_range: tuple[int, int] | None = None  # shortest / longest measured exchange
    max_exchanges_longest: int | None = None  # if every exchange were the longest measured
    warning: str | None = None  # the budget leaves no room for one exchange

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lo, hi = self.recommended
        rng = ""
        if self.exchange_range:
            rng = f" (measured {self.exchange_range[0]:,}–{self.exchange_range[1]:,})"
        return (
            f"budget {self.budget:,} − system {self.system_tokens:,} − buffer {self.buffer:,} = "
            f"{self.available:,} available (~{_k(self.available_planning)} for planning) → "
            f"{self.max_exchanges} exchanges max at {self.tokens_per_exchange:,.0f} tokens each{rng}; "
            f"{lo}–{hi} recommended" + (f"; warning: {self.warning}" if self.warning else "")
        )


def plan_conversation(
    budget: int,
    system_tokens: int,
    tokens_per_exchange: float,
    buffer: int = 1024,
    *,
    exchange_range: tuple[int, int] | None = None,
    headroom: tuple[float, float] = (0.7, 0.9),
) -> ConversationPlan:
    """The maximum and recommended number of exchanges that fit ``budget`` (see the module docstring)."""
    if budget <= 0 or tokens_per_exchange <= 0 or system_tokens < 0 or buffer < 0:
        raise KindredValueError(
            "budget and tokens_per_exchange must be positive, system_tokens and buffer non-negative; got "
            f"budget={budget}, tokens_per_exchange={tokens_per_exchange}, system_tokens={system_tokens}, "
            f"buffer={buffer}"
        )
    available = int(budget) - int(system_tokens) - int(buffer)
    planning = floor_2sig(available)
    maximum = int(planning // tokens_per_exchange) if planning > 0 else 0
    hi = math.floor(headroom[1] * maximum)
    hi = max(hi, 1) if maximum >= 1 else 0  # at least one exchange when one fits
    recommended = (min(math.ceil(headroom[0] * maximum), hi), hi)
    warning = None
    if available <= 0:
        warning = (
            f"the budget of {budget:,} tokens is used up by the system prompt ({system_tokens:,}) and the "
            f"buffer ({buffer:,}): no exchange fits; raise the budget or shorten the system prompt"
        )
    elif maximum == 0:
        warning = (
            f"one exchange ({tokens_per_exchange:,.0f} tokens) is longer than the {available:,} tokens "
            "available: no exchange fits; raise the budget"
        )
    longest = None
    if exchange_range:
        longest = int(planning // exchange_range[1]) if planning > 0 and exchange_range[1] > 0 else 0
    return ConversationPlan(
        budget=int(budget),
        system_tokens=int(system_tokens),
        tokens_per_exchange=float(tokens_per_exchange),
        buffer=int(buffer),
        available=available,
        available_planning=planning,
        max_exchanges=maximum,
        recommended=recommended,
        exchange_range=tuple(int(v) for v in exchange_range) if exchange_range else None,
        max_exchanges_longest=longest,
        warning=warning,
    )


def relative_cost(context: int, base: int = COST_BASE) -> float:
    """Seed 004: cost of one sequence of ``context`` tokens relative to one of 4K (4K 1×, 8K 2×, ...)."""
    return context / base


def cost_table(lengths, contexts=COST_CONTEXTS, base: int = COST_BASE) -> list[dict]:
    """Seed 004's relative cost table applied to examples of ``lengths`` tokens.

    Per context: relative cost of one sequence; examples that fit (and their share of the tokens); the cost
    of training the fitting examples one per sequence padded to the context, and packed (best-fit-decreasing)
    into rows of the context — both in units of one 4K sequence.
    """
    from ..ops import pack_bfd

    lengths = np.asarray(lengths, dtype=np.int64)
    total = max(int(lengths.sum()), 1)
    rows = []
    for c in contexts:
        fit = lengths[(lengths <= c) & (lengths > 0)]
        packed_rows = pack_bfd(fit.astype(np.int32), c)[2] if len(fit) else 0
        rel = relative_cost(c, base)
        rows.append(
            {
                "context": int(c),
                "relative_cost": rel,
                "examples_fit": len(fit),
                "share_fit": len(fit) / max(len(lengths), 1),
                "tokens_fit_share": int(fit.sum()) / total,
                "padded_cost": len(fit) * rel,
                "packed_rows": int(packed_rows),
                "packed_cost": packed_rows * rel,
            }
        )
    return rows


def logits_bytes(tokens: int, vocab_size: int, bytes_per_logit: int = 4) -> int:
    """Memory of the fp32 logits of one sequence: tokens × vocab × 4 B (4096 × 262,144 → 4.29 GB, Gemma 3)."""
    return int(tokens) * int(vocab_size) * int(bytes_per_logit)
