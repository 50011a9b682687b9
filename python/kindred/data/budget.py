"""The budget policy over tokenized examples: ``error`` | ``drop`` | ``truncate``.

The C++ core decides per example (``kindred._core.apply_budget``): keep; drop; or, for ``truncate``, how many
whole exchanges to remove from the front, keeping the fixed tokens (template prefix, system prompt) and at
least the last exchange. A truncated conversation is then rendered again from its messages (the system
prompt first, then the remaining exchanges) and re-tokenized, because some templates place the system
prompt inside a user turn (Gemma 3: the first; Mistral NeMo: the last); if the re-rendered example is still
over budget, one more exchange goes, and an example whose last exchange alone does not fit is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import _core
from .._ops import tokens as _tokens
from ..errors import KindredValueError
from .accounting import tokenize
from .templates import ChatTemplate, exchange_index
from .tokenized import TokenizedData, compose, splice_exchanges
from .tokenizers import Tokenizer

POLICIES: tuple[str, ...] = tuple(_core.BUDGET_POLICIES)
KEEP, TRUNCATE, DROP, OVER = _core.BUDGET_KEEP, _core.BUDGET_TRUNCATE, _core.BUDGET_DROP, _core.BUDGET_OVER


@dataclass
class BudgetResult:
    """What the policy did: the examples kept (truncated ones re-tokenized) and per-example actions."""

    data: TokenizedData  # examples after the policy, in input order
    source: np.ndarray  # int64 [kept]: index of each kept example in the input
    action: np.ndarray  # int32 [N]: KEEP, TRUNCATE, DROP
    dropped_exchanges: np.ndarray  # int32 [N]: exchanges removed from the front (TRUNCATE)
    tokens_before: np.ndarray  # int32 [N]
    tokens_after: np.ndarray  # int32 [N] (0 when dropped)
    budget: int
    policy: str
    conversations: list | None = None  # the kept conversations (truncated ones shortened), when asked for

    @property
    def over(self) -> int:
        return int(np.count_nonzero(self.tokens_before > self.budget))

    @property
    def truncated(self) -> int:
        return int(np.count_nonzero(self.action == TRUNCATE))

    @property
    def dropped(self) -> int:
        return int(np.count_nonzero(self.action == DROP))


def truncate_conversation(messages: Sequence[dict], drop: int) -> list[dict]:
    """The conversation without its first ``drop`` exchanges (system prompt kept)."""
    xs = exchange_index(messages)
    return [m for m, x in zip(messages, xs, strict=True) if x < 0 or x >= drop]


def apply_budget(
    data: TokenizedData,
    conversations: Sequence,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    budget: int,
    policy: str = "truncate",
    *,
    where=None,
    keep_conversations: bool = False,
) -> BudgetResult:
    """Apply ``policy`` to examples over ``budget`` tokens.

    ``where(i)`` names example i in errors (e.g. ``data.jsonl:12``). Policy ``error`` raises
    KindredValueError listing the examples over budget (the first 10) and how many there are.
    """
    if policy not in POLICIES:
        raise KindredValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if int(budget) < 1:
        raise KindredValueError(f"budget must be a positive number of tokens, got {budget}")
    budget = int(budget)
    where = where or (lambda i: f"example {i}")
    action, drop, after = _tokens.apply_budget(
        data.tokens, data.fixed, data.exchange_tokens, data.exchange_offsets, budget, policy
    )
    if policy == "error" and (action == OVER).any():
        over = np.flatnonzero(action == OVER)
        lines = [f"{where(int(i))}: {int(data.tokens[i]):,} tokens" for i in over[:10]]
        more = f" (and {len(over) - 10} more)" if len(over) > 10 else ""
        raise KindredValueError(
            f"{len(over)} example(s) over the budget of {budget:,} tokens{more}; "
            "use policy 'drop' or 'truncate':\n  " + "\n  ".join(lines)
        )
    action = action.copy()
    drop = drop.copy()
    after = after.copy()
    convs = list(conversations)
    truncated = np.flatnonzero(action == TRUNCATE)
    extra: TokenizedData | None = None
    extra_row = np.full(len(data), -1, np.int64)
    if len(truncated) and getattr(template, "truncation_splices", False):
        extra = splice_exchanges(
            data, truncated, drop[truncated]
        )  # exact: see ChatTemplate.truncation_splices
        extra_row[truncated] = np.arange(len(truncated))
    elif len(truncated):
        rounds: list[TokenizedData] = []  # re-rendered truncated examples, round by round
        base, todo = 0, list(truncated)
        while todo:
            shortened = [truncate_conversation(convs[i], int(drop[i])) for i in todo]
            again = tokenize(shortened, tokenizer, template)
            rounds.append(again)
            retry = []
            for k, i in enumerate(todo):
                n = int(again.tokens[k])
                if n <= budget:
                    after[i] = n
                    extra_row[i] = base + k
                elif again.exchange_offsets[k + 1] - again.exchange_offsets[k] > 1:
                    drop[i] += 1  # the re-rendered example grew (system prompt moved): one more exchange goes
                    retry.append(i)
                else:
                    action[i], drop[i], after[i] = DROP, 0, 0
            base += len(again)
            todo = retry
        extra = TokenizedData.concat(rounds)
    kept = np.flatnonzero(action != DROP)
    unchanged = len(kept) == len(data) and extra is None
    out = data if unchanged else compose(data, kept, extra, extra_row[kept])
    kept_convs = None
    if keep_conversations:
        kept_convs = [
            truncate_conversation(convs[i], int(drop[i])) if action[i] == TRUNCATE else convs[i] for i in kept
        ]
    return BudgetResult(
        data=out,
        source=kept.astype(np.int64),
        action=action,
        dropped_exchanges=drop,
        tokens_before=data.tokens.copy(),
        tokens_after=after,
        budget=budget,
        policy=policy,
        conversations=kept_convs,
    )
