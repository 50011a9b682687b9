"""The user's own chats as export data: rendered with the training template, tokenized, cut into fixed-length
sequences (AWQ's calibration, the quality gate's held-out text). By default both come from the training
data's held-out split (as ``kindred train`` drew it): AWQ calibrates on its even conversations and the gate
measures on the odd ones, so the gate's figures are on text the quantizer never saw."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import read_jsonl, tokenize
from ..data.jsonl import ChatData, held_out_split
from ..errors import KindredValueError


def sequences(
    conversations, tokenizer, template, seq_len: int, max_sequences: int, what: str
) -> torch.Tensor:
    """Token ids [n, seq_len]: the conversations rendered and tokenized end to end, cut into sequences."""
    if not conversations:
        raise KindredValueError(f"{what}: no conversation")
    ids = torch.from_numpy(tokenize(list(conversations), tokenizer, template).ids.astype("int64"))
    n = min(max_sequences, ids.numel() // seq_len)
    if n < 1:
        raise KindredValueError(
            f"{what}: {ids.numel()} tokens, fewer than one sequence of {seq_len}: give more chats or a "
            "shorter --seq-len"
        )
    return ids[: n * seq_len].reshape(n, seq_len)


def run_data(run_config: dict) -> tuple[ChatData, str]:
    """(held-out conversations, template) of a kindred training run's config (its config.yaml as a dict)."""
    data, seed = run_config.get("data") or {}, (run_config.get("train") or {}).get("seed", 0)
    template = data.get("template")
    if data.get("eval_path"):
        return read_jsonl(data["eval_path"]), template
    if not data.get("path") or not data.get("eval_fraction"):
        raise KindredValueError(
            "the training run has no held-out split (data.eval_fraction / data.eval_path): pass "
            "--calibration and --eval-data chat JSONL files"
        )
    chat = read_jsonl(data["path"], skip_invalid=bool(data.get("skip_invalid")))
    _, held = held_out_split(chat, float(data["eval_fraction"]), int(seed))
    return held, template


def halves(chat: ChatData) -> tuple[list, list]:
    """(even, odd) conversations: calibration and gate text drawn from one held-out split."""
    convs = list(chat.conversations)
    if len(convs) < 2:
        raise KindredValueError(
            f"{chat.path}: the held-out split has {len(convs)} conversation(s); calibration and the gate "
            "need two at least: pass --calibration and --eval-data"
        )
    return convs[0::2], convs[1::2]


def read_chats(path: str | Path) -> list:
    return list(read_jsonl(path).conversations)
