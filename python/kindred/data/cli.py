"""`kindred tokens`: the budget report of a chat JSONL, and optionally the prepared (tokenized, masked,
budgeted, packed) data written to a safetensors file."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .. import _core
from ..errors import KindredValueError
from .jsonl import atomic_write
from .templates import TEMPLATES

if TYPE_CHECKING:
    from .prepare import Prepared


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `tokens` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "tokens",
        help="token budget report of chat data (counts, policy, packing, cost, logits memory, planner)",
        description="Render chat JSONL with a model family's template, tokenize it, apply a token budget and "
        "report counts, padding waste, relative training cost, logits memory and how many exchanges fit.",
    )
    p.add_argument(
        "data", help='chat JSONL (optionally .gz): {"messages": [{"role", "content"}, ...]} per line'
    )
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a folder with one"
    )
    p.add_argument("--template", required=True, help=f"chat template: {', '.join(TEMPLATES)}")
    p.add_argument(
        "--budget", type=int, default=16384, help="token budget per example (default 16384; 0: none)"
    )
    p.add_argument(
        "--policy",
        choices=_core.BUDGET_POLICIES,
        default="truncate",
        help="for examples over budget (default truncate)",
    )
    p.add_argument(
        "--pack", type=int, metavar="N", help="pack examples best-fit-decreasing into rows of N tokens"
    )
    p.add_argument(
        "--buffer", type=int, default=1024, help="planner: tokens kept free for the answer (default 1024)"
    )
    p.add_argument(
        "--vocab",
        type=int,
        metavar="N",
        help="vocabulary size for the logits memory (default: the tokenizer's)",
    )
    p.add_argument("--date-string", help="llama3: the pinned 'Today Date' (default 26 Jul 2024)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip invalid lines (counted and listed) instead of failing",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.add_argument("--plot", metavar="PNG", help="write a histogram of example lengths")
    p.add_argument(
        "--out", metavar="FILE", help="write the prepared data (safetensors; packed rows with --pack)"
    )
    p.set_defaults(func=run)
    return p


def save_prepared(path, prep: Prepared) -> None:
    """The prepared data as safetensors (int32 tensors; written to a temporary file, renamed on success).

    Packed: input_ids, labels, position_ids [rows, N], cu_seqlens, seq_example, row_seqs, row_trainable (and
    long_ids, long_labels, long_offsets for examples longer than a row, when the budget exceeds N).
    Unpacked: ids, labels, offsets (CSR of the examples), tokens, trainable.
    """
    import numpy as np
    from safetensors.numpy import save

    meta = {
        "template": prep.template.name,
        "tokenizer": str(prep.tokenizer.path),
        "examples": str(len(prep.final)),
        "budget": str(prep.budgeted.budget if prep.budgeted else ""),
        "policy": prep.budgeted.policy if prep.budgeted else "",
    }
    if prep.packed is not None:
        pk = prep.packed
        tensors = {
            "input_ids": pk.input_ids,
            "labels": pk.labels,
            "position_ids": pk.position_ids,
            "cu_seqlens": pk.cu_seqlens,
            "seq_example": pk.seq_example,
            "row_seqs": pk.row_seqs,
            "row_trainable": pk.row_trainable,
        }
        meta["max_tokens"] = str(pk.max_tokens)
        if prep.too_long is not None:  # budget > pack length: the longer examples, unpacked
            t = prep.too_long
            tensors.update(long_ids=t.ids, long_labels=t.labels, long_offsets=t.offsets)
    else:
        f = prep.final
        tensors = {
            "ids": f.ids,
            "labels": f.labels,
            "offsets": f.offsets,
            "tokens": f.tokens,
            "trainable": f.trainable,
        }
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path) as fh:
        fh.write(blob)


def run(args: argparse.Namespace) -> int:
    """Run `kindred tokens` on parsed arguments; prints the report and returns the exit code."""
    from .prepare import prepare
    from .report import budget_report

    budget = args.budget or None
    if budget is not None and budget < 0:
        raise KindredValueError(f"--budget must be a positive number of tokens (or 0 for none), got {budget}")
    if args.pack is not None and args.pack <= 0:
        raise KindredValueError(f"--pack must be a positive number of tokens, got {args.pack}")
    options = {"date_string": args.date_string} if args.date_string else {}
    if options and args.template.lower().replace("-", "").split(".")[0] != "llama3":
        raise KindredValueError("--date-string applies to the llama3 template only")
    prep = prepare(
        args.data,
        args.tokenizer,
        args.template,
        budget,
        policy=args.policy,
        pack_to=args.pack,
        skip_invalid=args.skip_invalid,
        **options,
    )
    report = budget_report(
        None,
        None,
        None,
        budget,
        pack=args.pack,
        policy=args.policy,
        buffer=args.buffer,
        vocab_size=args.vocab,
        prepared=prep,
    )
    if args.plot:
        report.plot(args.plot)
    if args.out:
        save_prepared(args.out, prep)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    report.print()
    for what, path in (("histogram", args.plot), ("prepared data", args.out)):
        if path:
            print(f"wrote {what}: {path}")
    return 0
