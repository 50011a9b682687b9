"""A judge model: rates one answer against a rubric criterion (1-10) or picks the better of two answers.

The prompts are kindred's own, in the style of MT-Bench's single-v1 and pair-v2 judges: the verdict goes
on the last line in double brackets (``Rating: [[7]]``; ``[[A]]``, ``[[B]]`` or ``[[C]]`` for a tie). A
reply without a verdict is asked again once (the reply stays in the conversation, followed by a request
for the verdict alone); a second miss is "ungraded", which never counts as a pass or a win.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

JUDGE_SYSTEM = (
    "You are an impartial, careful grader of answers written by AI assistants. You judge only what is "
    "written, you are not swayed by length, confidence or formatting, and you always finish with the "
    "verdict in the exact format you are asked for."
)
RATING_PROMPT = """Grade the assistant's answer to the conversation below against one criterion.

[Criterion]
{criterion}

[Conversation]
{conversation}

[The assistant's answer]
{answer}
[End of the answer]

First explain in two or three sentences how well the answer meets the criterion, and only the criterion.
Then, on the last line, give a rating from 1 (does not meet it at all) to 10 (meets it fully) in exactly
this format: Rating: [[5]]"""
PAIR_PROMPT = """Two AI assistants answered the same conversation. Decide which answer is better: more
helpful, honest, accurate and considerate, with the depth the question needs. The order in which they are
shown says nothing about their quality, and neither does their length or style.

[Conversation]
{conversation}

[Answer of assistant A]
{answer_a}
[End of assistant A's answer]

[Answer of assistant B]
{answer_b}
[End of assistant B's answer]

Compare the two answers in a few sentences. Then, on the last line, give your verdict in exactly this format:
[[A]] if assistant A's answer is better, [[B]] if assistant B's answer is better, [[C]] if they are equally
good."""
RATING_RETRY = (
    "Your reply has no rating in the required format. Reply with only the rating, like: Rating: [[5]]"
)
PAIR_RETRY = "Your reply has no verdict in the required format. Reply with only one of: [[A]], [[B]], [[C]]"

_RATING = re.compile(r"\[\[\s*(\d{1,2})(?:\.\d+)?\s*\]\]")
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(reply: str) -> int | None:
    """The last ``[[N]]`` with 1 <= N <= 10 in a judge reply, else None."""
    found = [int(m) for m in _RATING.findall(reply)]
    return found[-1] if found and 1 <= found[-1] <= 10 else None


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "tie" from the last ``[[A]]``/``[[B]]``/``[[C]]`` in a judge reply, else None."""
    found = _PAIR.findall(reply)
    return None if not found else {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def conversation_text(messages: Sequence[dict]) -> str:
    """The turns a judge sees (the system prompt included: it sets what a good answer is)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


@dataclass
class Verdict:
    value: object  # an int rating, "A" / "B" / "tie", or None (ungraded)
    replies: list[str]  # the first reply and, after a miss, the retry's

    @property
    def graded(self) -> bool:
        return self.value is not None


class Judge:
    """Grades with ``complete(conversations) -> replies`` (a batch of chats in, one reply each out);
    :func:`load_judge` builds one from a kindred-loaded model."""

    def __init__(self, complete: Callable[[list[list[dict]]], list[str]], name: str = "judge"):
        self.complete = complete
        self.name = name

    def _ask(self, chats: list[list[dict]], parse, retry: str) -> list[Verdict]:
        if not chats:
            return []
        first = self.complete(chats)
        out = [Verdict(parse(r), [r]) for r in first]
        again = [i for i, v in enumerate(out) if v.value is None]
        if again:
            followups = [
                [*chats[i], {"role": "assistant", "content": first[i]}, {"role": "user", "content": retry}]
                for i in again
            ]
            for i, reply in zip(again, self.complete(followups), strict=True):
                out[i] = Verdict(parse(reply), [first[i], reply])
        return out

    def rate(self, items: Sequence[tuple[Sequence[dict], str, str]]) -> list[Verdict]:
        """A 1-10 rating for each (conversation, answer, criterion)."""
        chats = [
            [
                {"role": "system", "content": JUDGE_SYSTEM},
                {
                    "role": "user",
                    "content": RATING_PROMPT.format(
                        criterion=criterion, conversation=conversation_text(msgs), answer=answer
                    ),
                },
            ]
            for msgs, answer, criterion in items
        ]
        return self._ask(chats, parse_rating, RATING_RETRY)

    def pick(self, items: Sequence[tuple[Sequence[dict], str, str]]) -> list[Verdict]:
        """ "A", "B" or "tie" for each (conversation, answer A, answer B), in the order shown."""
        chats = [
            [
                {"role": "system", "content": JUDGE_SYSTEM},
                {
                    "role": "user",
                    "content": PAIR_PROMPT.format(
                        conversation=conversation_text(msgs), answer_a=a, answer_b=b
                    ),
                },
            ]
            for msgs, a, b in items
        ]
        return self._ask(chats, parse_verdict, PAIR_RETRY)


def load_judge(
    source: str,
    *,
    where: str = "--judge",
    quant: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    max_new_tokens: int = 384,
) -> Judge:
    """A Judge from a kindred-loadable model (HF folder, GGUF, exported folder, adapter folder, smollm2),
    greedy. A model that cannot be loaded raises KindredError naming ``where`` (file:line: field)."""
    from ..errors import KindredError, KindredValueError
    from ..generate import SamplingConfig, generate
    from .models import resolve

    try:
        plan = resolve(source, quant=quant, dtype=dtype, device=device, template=template, what="judge")
        model = plan.load()
    except (KindredError, OSError, RuntimeError) as e:
        raise KindredValueError(f"{where}: the judge model {source!r} cannot be loaded: {e}") from None
    stops = plan.stop_ids()
    budget = plan.context - max_new_tokens

    def complete(chats: list[list[dict]]) -> list[str]:
        """Greedy replies; a chat longer than the judge's context gets an empty reply (ungraded)."""
        prompts = [plan.tokenizer.encode(plan.render(c)) for c in chats]
        fits = [i for i, p in enumerate(prompts) if len(p) <= budget]
        replies = [""] * len(chats)
        if fits:
            done = generate(
                model,
                [prompts[i] for i in fits],
                SamplingConfig(max_new_tokens=max_new_tokens),
                stop_token_ids=stops,
                tokenizer=plan.tokenizer,
                adapter=None,
            )
            for i, c in zip(fits, done, strict=True):
                replies[i] = c.text or ""
        return replies

    return Judge(complete, name=str(source))
