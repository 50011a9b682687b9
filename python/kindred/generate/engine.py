"""kindred.generate: batched generation over a DecoderLM with per-row stopping, streaming and a loop hook."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch

from ..errors import KindredValueError
from ..models import DecoderLM
from ..nn import lora_modules
from .config import Completion, SamplingConfig
from .runner import Engine, Runner
from .sampling import choose, row_keys


def _check_ids(name: str, ids, vocab: int, allow_empty: bool = False) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise KindredValueError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    out = list(ids)
    if not out and not allow_empty:
        raise KindredValueError(f"{name} must hold at least one token id")
    for i, t in enumerate(out):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise KindredValueError(f"{name}[{i}] must be a token id in [0, {vocab}), got {t!r}")
    return out


def _validate(
    model,
    prompts,
    config,
    stop_token_ids,
    stop_strings,
    tokenizer,
    loop_detector,
    on_token,
    adapter,
    batch_size,
):
    if not isinstance(model, DecoderLM):
        raise KindredValueError(f"model must be a kindred.models.DecoderLM, got {type(model).__name__}")
    vocab = model.config.vocab_size
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise KindredValueError("prompts must be a non-empty list of token-id lists")
    prompts = [_check_ids(f"prompts[{i}]", p, vocab) for i, p in enumerate(prompts)]
    cfg = SamplingConfig() if config is None else config
    if not isinstance(cfg, SamplingConfig):
        raise KindredValueError(f"config must be a SamplingConfig or None, got {type(config).__name__}")
    stops = frozenset(_check_ids("stop_token_ids", stop_token_ids, vocab, allow_empty=True))
    if isinstance(stop_strings, str) or not isinstance(stop_strings, Sequence):
        raise KindredValueError(f"stop_strings must be a list of strings, got {type(stop_strings).__name__}")
    for i, s in enumerate(stop_strings):
        if not isinstance(s, str) or not s:
            raise KindredValueError(f"stop_strings[{i}] must be a non-empty string, got {s!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise KindredValueError(f"tokenizer must be a kindred.data tokenizer, got {type(tokenizer).__name__}")
    if stop_strings and tokenizer is None:
        raise KindredValueError("stop_strings needs a tokenizer (to decode the replies)")
    for name, fn in (("loop_detector", loop_detector), ("on_token", on_token)):
        if fn is not None and not callable(fn):
            raise KindredValueError(f"{name} must be callable or None, got {type(fn).__name__}")
    per_row = isinstance(adapter, (list, tuple))
    if per_row:
        if len(adapter) != len(prompts) or not all(isinstance(a, bool) for a in adapter):
            raise KindredValueError(
                f"adapter as a list must hold one True/False per prompt ({len(prompts)}), got {adapter!r}"
            )
    elif adapter not in (None, True, False):
        raise KindredValueError(f"adapter must be True, False, None or a list of those, got {adapter!r}")
    mods = lora_modules(model)
    if adapter is not None and not mods:
        raise KindredValueError(f"adapter={adapter} but the model has no LoRA layers")
    off = adapter is False or (per_row and not all(adapter))
    if off and any(m.merged_adapter is not None for m in mods.values()):
        raise KindredValueError("adapter=False but the adapters are merged into the base: unmerge() first")
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise KindredValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if longest > model.config.max_position_embeddings:
        raise KindredValueError(
            f"the longest prompt plus max_new_tokens is {longest} tokens, over the model's "
            f"max_position_embeddings = {model.config.max_position_embeddings}"
        )
    return prompts, cfg, stops, tuple(stop_strings), mods


@contextlib.contextmanager
def _adapters(mods: dict, adapter: bool | list[bool] | None):
    """Every LoRA layer enabled (True, or a list: per row) or disabled (False) for the call, restored
    afterwards."""
    saved = {name: m.disabled for name, m in mods.items()}
    try:
        if adapter is not None:
            for m in mods.values():
                m.disabled = not adapter  # a list (per row): enabled, the rows' mask decides
        yield
    finally:
        for name, m in mods.items():
            m.disabled = saved[name]
            m.row_adapter = None


class _Row:
    """The host-side state of one prompt while it generates."""

    def __init__(self, index: int, prompt_len: int):
        self.index, self.prompt_len = index, prompt_len
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.rule: str | None = None
        self.ttft = self.total = 0.0


def _stop_string_hit(tokenizer, tokens: list[int], stop_strings: tuple[str, ...], window: int) -> bool:
    tail = tokenizer.decode(tokens[-window:])
    return any(s in tail for s in stop_strings)


def _finish_text(row: _Row, tokenizer, stop_ids, stop_strings) -> str | None:
    if tokenizer is None:
        return None
    toks = row.tokens[:-1] if row.reason == "stop" else row.tokens
    text = tokenizer.decode([t for t in toks if t not in stop_ids])
    if row.reason == "stop_string":
        cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
        text = text[:cut]
    return text


def _run_batch(
    model, prompts, first_index, cfg, stop_ids, stop_strings, tokenizer, loop_detector, on_token, flags
):
    start = time.perf_counter()
    rows = [_Row(first_index + i, len(p)) for i, p in enumerate(prompts)]
    runner = Runner(Engine.for_model(model), prompts, cfg.max_new_tokens, flags)
    logits = runner.prefill()
    vocab = logits.shape[-1]
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=logits.device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=logits.device)] = True
    window = max((len(s) for s in stop_strings), default=0) + 4
    active = list(rows)
    for step in range(cfg.max_new_tokens):
        nxt = choose(logits, cfg, seen, row_keys(cfg.seed, [r.index for r in active], step))
        toks = nxt.tolist()
        now = time.perf_counter() - start
        kept = []
        for j, (row, t) in enumerate(zip(active, toks, strict=True)):
            row.tokens.append(t)
            if len(row.tokens) == 1:
                row.ttft = now
            if on_token is not None:
                on_token(row.index, t)
            if t in stop_ids:
                row.reason = "stop"
            elif stop_strings and _stop_string_hit(tokenizer, row.tokens, stop_strings, window):
                row.reason = "stop_string"
            elif loop_detector is not None and (rule := loop_detector(list(row.tokens))) is not None:
                row.reason, row.rule = "loop", str(rule)
            elif len(row.tokens) == cfg.max_new_tokens:
                row.reason = "length"
            if row.reason is None:
                kept.append(j)
            else:
                row.total = now
        if not kept:
            break
        if len(kept) < len(active):
            idx = torch.tensor(kept, device=nxt.device)
            nxt = nxt[idx]
            seen = None if seen is None else seen[idx]
            runner.keep(kept)
            active = [active[j] for j in kept]
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits = runner.step(nxt)
    out = []
    for row in rows:
        n = len(row.tokens)
        out.append(
            Completion(
                tokens=row.tokens,
                text=_finish_text(row, tokenizer, stop_ids, stop_strings),
                finish_reason=row.reason,
                loop_rule=row.rule,
                prompt_tokens=row.prompt_len,
                new_tokens=n,
                ttft_s=row.ttft,
                total_s=row.total,
                tokens_per_s=n / row.total if row.total > 0 else 0.0,
            )
        )
    return out


def generate(
    model: DecoderLM,
    prompts: list[list[int]],
    config: SamplingConfig | None = None,
    *,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    loop_detector: Callable[[list[int]], str | None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    adapter: bool | Sequence[bool] | None = None,
    batch_size: int | None = None,
) -> list[Completion]:
    """Generate a reply for each prompt (a list of token ids); one Completion per prompt, in order.

    stop_token_ids: a row stops after emitting one of them (the template's end-of-turn token, the
    tokenizer's eos: ``kindred.generate.stop_token_ids`` gathers them); nothing stops a row by default but
    max_new_tokens. stop_strings: a row stops once its decoded reply contains one (needs ``tokenizer``).
    loop_detector(tokens) -> rule name or None: a name stops the row with finish_reason "loop".
    on_token(row, token): called for every new token as it is chosen (row: the prompt's index).
    adapter: False runs the base model (every LoRA layer disabled), True with the adapters, None as is; a
    list of one bool per prompt mixes them in one batch (each row its own; the base weights are read once
    per step for all; no CUDA graphs).
    batch_size: prompts run in batches of at most this many (default: all at once).
    """
    prompts, cfg, stops, stop_strings, mods = _validate(
        model,
        prompts,
        config,
        stop_token_ids,
        stop_strings,
        tokenizer,
        loop_detector,
        on_token,
        adapter,
        batch_size,
    )
    size = batch_size or len(prompts)
    rope = model.config.rope
    if rope.rope_type == "longrope" and max(map(len, prompts)) + cfg.max_new_tokens > (
        rope.original_max_position_embeddings
    ):
        size = 1  # a row past the original context re-encodes itself with the long factors: alone
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        with _adapters(mods, adapter), torch.no_grad():
            for first in range(0, len(prompts), size):
                out += _run_batch(
                    model,
                    prompts[first : first + size],
                    first,
                    cfg,
                    stops,
                    stop_strings,
                    tokenizer,
                    loop_detector,
                    on_token,
                    list(adapter[first : first + size]) if isinstance(adapter, (list, tuple)) else None,
                )
    finally:
        model.train(was_training)
    return out


def stop_token_ids(tokenizer, template=None) -> list[int]:
    """The ids generation should stop at, those of them the tokenizer has: the template's end-of-turn token
    (every known template's when ``template`` is None) and ``</s>``, ``<eos>``, ``<|endoftext|>``."""
    from ..data import TEMPLATES, get_template

    turns = TEMPLATES if template is None else (template,)
    names = [get_template(t).end_of_turn for t in turns] + ["</s>", "<eos>", "<|endoftext|>"]
    ids = []
    for n in dict.fromkeys(names):
        t = tokenizer.lookup(n) if n else None
        if t is not None and t not in ids:
            ids.append(t)
    return ids
