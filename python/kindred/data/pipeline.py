"""The preparation pipeline of chat data: read / validate → render → tokenize → labels and counts → budget
policy → (optionally) pack. ``budget_report`` (report.py) reports on what it computed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .accounting import tokenize
from .budget import BudgetResult, apply_budget
from .formats import read_chat
from .jsonl import ChatData
from .packing import PackedData, pack
from .templates import ChatTemplate, get_template
from .tokenized import TokenizedData
from .tokenizers import Tokenizer, load_tokenizer


def _load(data, skip_invalid: bool) -> ChatData:
    if isinstance(data, ChatData):
        return data
    return read_chat(data, skip_invalid=skip_invalid)  # JSONL, JSON, Parquet, CSV, datasets; any FORMATS


@dataclass
class Prepared:
    """Everything the pipeline computed: the data, its tokens, the policy's result and the packing."""

    chat: ChatData
    tokenizer: Tokenizer
    template: ChatTemplate
    tokenized: TokenizedData
    budgeted: BudgetResult | None
    packed: PackedData | None
    packed_source: np.ndarray | None = None  # index into `final` of each packed example
    too_long: TokenizedData | None = None  # kept examples longer than a packed row (budget > pack length)

    @property
    def final(self) -> TokenizedData:
        return self.budgeted.data if self.budgeted else self.tokenized


def prepare(
    data,
    tokenizer,
    template,
    budget: int | None = None,
    *,
    policy: str = "truncate",
    pack_to: int | None = None,
    pad_id: int | None = None,
    skip_invalid: bool = False,
    **template_options,
) -> Prepared:
    """Read/validate → render → tokenize → labels and counts → budget policy → (optionally) pack."""
    chat = _load(data, skip_invalid)
    tok = load_tokenizer(tokenizer)
    tpl = get_template(template, **template_options)
    tokenized = tokenize(chat.conversations, tok, tpl)
    budgeted = None
    if budget is not None:
        budgeted = apply_budget(tokenized, chat.conversations, tok, tpl, budget, policy, where=chat.where)
    final = budgeted.data if budgeted else tokenized
    packed = source = too_long = None
    if pack_to is not None:
        # Examples longer than a row (possible when the budget exceeds the pack length) stay unpacked.
        fits = final.tokens <= int(pack_to)
        source = np.flatnonzero(fits)
        packed = pack(
            final if fits.all() else final.take(source), pack_to, _pad_id(tok) if pad_id is None else pad_id
        )
        if not fits.all():
            too_long = final.take(np.flatnonzero(~fits))
    return Prepared(chat, tok, tpl, tokenized, budgeted, packed, source, too_long)


def _pad_id(tok: Tokenizer) -> int:
    for name in ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<|dummy_85|>"):
        tid = tok.lookup(name)
        if tid is not None:
            return tid
    return 0
