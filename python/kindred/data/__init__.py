"""Chat data preparation: JSONL → chat template → tokens → assistant-only labels → budget → packing.

    import kindred.data as kd
    report = kd.budget_report("data.jsonl", "tokenizer.json", "qwen3", budget=16384, pack=8192)
    report.print()                       # rich tables; report.to_dict() for JSON, report.plot("lengths.png")
    prep = kd.prepare("data.jsonl", "tokenizer.model", "gemma3", budget=8192, pack_to=8192)
    batch = prep.packed.batch([0, 1], device="cuda")   # input_ids, labels, position_ids, cu_seqlens, ...

Pieces: :func:`read_chat` (chat messages, ShareGPT, Alpaca, prompt-completion in JSONL / JSON / Parquet /
CSV / ``datasets``, detected), :func:`read_jsonl` (validation with file:line:field errors),
:func:`load_tokenizer` (tokenizer.json or sentencepiece .model), :func:`get_template` (gemma3, qwen3,
llama3, phi4, phi4-mini, mistral-nemo, chatml; or a path: the model's own Jinja template,
:func:`load_chat_template`), :func:`tokenize` (labels and counts), :func:`apply_budget`, :func:`pack`,
:func:`plan_conversation` (conversation lengths), :func:`token_report` (what ``kindred plan
--data`` reads).
Names are imported from their modules on first use (``kindred tokens --help`` imports no torch).
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "tokenize": "accounting",
    "JinjaTemplate": "chat_template",
    "load_chat_template": "chat_template",
    "tokenize_whole": "accounting",
    "POLICIES": "budget",
    "BudgetResult": "budget",
    "apply_budget": "budget",
    "truncate_conversation": "budget",
    "detect_format": "formats",
    "read_chat": "formats",
    "ChatData": "jsonl",
    "Skipped": "jsonl",
    "from_conversations": "jsonl",
    "read_jsonl": "jsonl",
    "validate_conversation": "jsonl",
    "write_jsonl": "jsonl",
    "PackedData": "packing",
    "pack": "packing",
    "COST_CONTEXTS": "planner",
    "ConversationPlan": "planner",
    "cost_table": "planner",
    "floor_2sig": "planner",
    "logits_bytes": "planner",
    "plan_conversation": "planner",
    "relative_cost": "planner",
    "Prepared": "pipeline",
    "prepare": "pipeline",
    "BudgetReport": "report",
    "budget_report": "report",
    "token_report": "report",
    "TEMPLATES": "templates",
    "ChatTemplate": "templates",
    "Segment": "templates",
    "Special": "templates",
    "get_template": "templates",
    "TokenizedData": "tokenized",
    "HFTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers",
    "Tokenizer": "tokenizers",
    "load_tokenizer": "tokenizers",
    "sentencepiece_backend": "tokenizers",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
