"""The sample reply of a held-out evaluation: the first held-out conversation's last answer is replaced by
a short greedy reply of the model in training (kindred.generate).

The prompt is the conversation's tokens up to that answer's first trained token, exactly as training
tokenized it (the template's generation prompt for that turn included, e.g. ChatML's
``<|im_start|>assistant\\n``), so the model answers what it is trained to answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generate import SamplingConfig, generate, stop_token_ids


@dataclass
class SamplePrompt:
    ids: list[int]  # the tokens before the answer
    text: str  # the user turn the answer replies to (for the log)
    stop_ids: list[int]  # the template's end of turn and the model's eos


def sample_prompt(prepared, model) -> SamplePrompt | None:
    """The prompt of the last answer of ``prepared``'s first conversation (a kindred.data.Prepared of the
    held-out data, before the budget: the whole conversation), or None when nothing of it is trained or
    the prompt fills the model's context."""
    data = prepared.tokenized
    if not len(data):
        return None
    trained = [g for g in range(data.example_segs[0], data.example_segs[1]) if data.seg_trainable[g]]
    if not trained:
        return None
    turn = int(data.seg_turn[trained[-1]])
    first = next(g for g in trained if data.seg_turn[g] == turn)
    ids = [int(t) for t in data.ids[data.offsets[0] : data.seg_offsets[first]]]
    if len(ids) >= model.config.max_position_embeddings:  # no room left for a reply
        return None
    messages = prepared.chat.conversations[0]
    user = next((m["content"] for m in reversed(messages[:turn]) if m["role"] == "user"), "")
    stops = stop_token_ids(prepared.tokenizer, prepared.template)
    stops += [t for t in model.config.eos_token_ids if t not in stops]
    return SamplePrompt(ids, user, stops)


def sample_reply(model, prompt: SamplePrompt, max_new_tokens: int, tokenizer) -> str:
    """The greedy reply (at most ``max_new_tokens``, fewer where the context ends), decoded without its stop
    token. Greedy generation draws no random numbers."""
    room = min(max_new_tokens, model.config.max_position_embeddings - len(prompt.ids))
    config = SamplingConfig(max_new_tokens=room, temperature=0.0)
    (out,) = generate(model, [prompt.ids], config, stop_token_ids=prompt.stop_ids, tokenizer=tokenizer)
    return out.text
