"""Data shipped with kindred: a small calibration set written for this project.

``ethics_calibration.jsonl``: 61 multi-turn conversations (a system prompt and 2–5 user/assistant exchanges
each) on personal-ethics questions — honesty with friends, workplace dilemmas, family obligations — original
text written for kindred, for demos, tests and calibration. :func:`corpus_lines` derives the plain-text
corpus the tests train their small tokenizers on (sentencepiece and tokenizer.json) from the same
conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION = Path(__file__).with_name("ethics_calibration.jsonl")


def calibration_path() -> Path:
    """Path of the shipped calibration set (chat JSONL)."""
    return CALIBRATION


def load_calibration() -> list[list[dict]]:
    """The calibration conversations (lists of messages)."""
    with CALIBRATION.open(encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def corpus_lines() -> list[str]:
    """Plain text for training test tokenizers: every message of the calibration set, one per line, plus
    each message split into its sentences (so short pieces are as frequent as in chat turns)."""
    lines = []
    for conv in load_calibration():
        for m in conv:
            lines.append(m["content"])
            lines.extend(s.strip() + "." for s in m["content"].split(". ") if s.strip())
    return lines
