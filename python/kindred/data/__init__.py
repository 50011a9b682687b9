"""Chat data preparation: JSONL → chat template → tokens → assistant-only labels → budget → packing.

    import kindred.data as kd
    report = kd.budget_report("data.jsonl", "tokenizer.json", "qwen3", budget=16384, pack=8192)
    report.print()                       # rich tables; report.to_dict() for JSON, report.plot("lengths.png")
    prep = kd.prepare("data.jsonl", "tokenizer.model", "gemma3", budget=8192, pack_to=8192)
    batch = prep.packed.batch([0, 1], device="cuda")   # input_ids, labels, position_ids, cu_seqlens, ...

Pieces: :func:`read_jsonl` (validation with file:line:field errors), :func:`load_tokenizer`
(tokenizer.json or sentencepiece .model), :func:`get_template` (gemma3, qwen3, llama3, phi4, phi4-mini,
mistral-nemo, chatml), :func:`tokenize` (labels and counts), :func:`apply_budget`, :func:`pack`,
:func:`plan_conversation` (seed 004's planner), :func:`token_report` (what ``kindred plan --data`` reads).
"""

from .accounting import TokenizedData, tokenize, tokenize_whole
from .budget import POLICIES, BudgetResult, apply_budget, truncate_conversation
from .jsonl import ChatData, Skipped, from_conversations, read_jsonl, validate_conversation, write_jsonl
from .packing import PackedData, pack
from .planner import (
    COST_CONTEXTS,
    ConversationPlan,
    cost_table,
    floor_2sig,
    logits_bytes,
    plan_conversation,
    relative_cost,
)
from .report import BudgetReport, Prepared, budget_report, prepare, token_report
from .templates import TEMPLATES, ChatTemplate, Segment, Special, get_template
from .tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, sentencepiece_backend

__all__ = [
    "COST_CONTEXTS",
    "POLICIES",
    "TEMPLATES",
    "BudgetReport",
    "BudgetResult",
    "ChatData",
    "ChatTemplate",
    "ConversationPlan",
    "HFTokenizer",
    "PackedData",
    "Prepared",
    "Segment",
    "SentencePieceTokenizer",
    "Skipped",
    "Special",
    "TokenizedData",
    "Tokenizer",
    "apply_budget",
    "budget_report",
    "cost_table",
    "floor_2sig",
    "from_conversations",
    "get_template",
    "load_tokenizer",
    "logits_bytes",
    "pack",
    "plan_conversation",
    "prepare",
    "read_jsonl",
    "relative_cost",
    "sentencepiece_backend",
    "token_report",
    "tokenize",
    "tokenize_whole",
    "truncate_conversation",
    "validate_conversation",
    "write_jsonl",
]
