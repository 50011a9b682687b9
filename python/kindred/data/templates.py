"""Chat templates of the catalogue's families, rendered as segments with a role and a trainable flag.

A rendered conversation is a list of :class:`Segment`; each holds text and special tokens (:class:`Special`,
resolved by name against the tokenizer, never matched as text). The assistant-only label mask follows by
construction: the segments holding an assistant message's content and its end-of-turn token are trainable,
everything else (BOS, role headers, user and system text, the newline after an end-of-turn token) is not.
Concatenating the segments' text gives exactly the string the model family's own template renders for a
training conversation (no generation prompt); ``render_text`` returns it. Strings per
``shared/reference/pipeline-formats.md`` §5:

* gemma3: ``<bos>`` once; ``<start_of_turn>user\\n{content|trim}<end_of_turn>\\n``; the assistant is
  ``model``; the system prompt is no role: its text + ``\\n\\n`` prefixes the first user turn.
* qwen3: ChatML ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the last assistant turn (after the last
  user query) carries ``<think>\\n{reasoning}\\n</think>\\n\\n`` (empty without reasoning); earlier
  assistant turns are rendered without their reasoning.
* llama3: ``<|begin_of_text|>``, always a system header with ``Cutting Knowledge Date: December 2023`` and
  ``Today Date: {date_string}`` (pinned, default ``26 Jul 2024``), turns
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>``.
* phi4: ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>``, no newlines, no BOS.
* phi4-mini: ``<|{role}|>{content}<|end|>``, no newlines, then ``<|endoftext|>`` after the last turn.
* mistral-nemo: ``<s>[INST]{user}[/INST]{assistant}</s>...``, no spaces; the system prompt goes into the
  **last** user turn as ``[INST]{system}\\n\\n{user}[/INST]``.
* chatml: generic ChatML ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, no BOS.
* harmony (gpt-oss): ``<|start|>{role}<|message|>{text}<|end|>``, replies on the ``final`` channel, the last
  one ending ``<|return|>`` after its ``analysis`` (see :class:`Harmony`).
* qwen3-coder: ChatML with XML ``<tool_call>`` blocks and ``<tool_response>`` user turns
  (:class:`Qwen3Coder`).

Choices where a template leaves room (all documented on the classes): the trained end-of-turn token is
the one generation stops at (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``</s>``); the
newline after it is not trained; Qwen3's empty ``<think>\\n\\n</think>\\n\\n`` is template text, not
trained (the model must not learn to skip thinking from data that has no reasoning); Phi-4-mini's trailing
``<|endoftext|>`` is not trained (generation stops at ``<|end|>``).
"""

from __future__ import annotations

import abc
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import KindredValueError


class Special(str):
    """A special token in a rendered template, by name (its literal spelling); resolved to an id by name."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Special({str(self)!r})"


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a rendered conversation with one role and one trainable flag.

    ``turn`` is the index of the message it belongs to (-1 for template-only tokens such as BOS);
    ``exchange`` the index of the user + assistant exchange (-1 for fixed tokens: template prefix/suffix and
    the system prompt, which truncation keeps).
    """

    role: str  # "system" | "user" | "assistant" | "template"
    parts: tuple[str, ...]  # text and Special pieces, in order
    trainable: bool
    turn: int
    exchange: int

    @property
    def text(self) -> str:
        return "".join(self.parts)


PLACEHOLDER = "\x01{}\x02"  # stands for message i's content in canonical renderings (kindred.data.accounting)


def exchange_index(messages: Sequence[dict]) -> list[int]:
    """The exchange of each message: user turn k and the assistant turn after it are exchange k; system -1."""
    out, k = [], -1
    for m in messages:
        if m["role"] == "user":
            k += 1
        out.append(-1 if m["role"] == "system" else k)
    return out


class ChatTemplate(abc.ABC):
    """A model family's chat template for training conversations (validated: see kindred.data.jsonl)."""

    name: str = ""
    description: str = ""
    specials: tuple[str, ...] = ()  # every special token the template emits
    end_of_turn: str = ""  # the trained end-of-turn token
    # Dropping leading exchanges leaves every other segment's text and tokens as they were (exchanges are
    # rendered independently and bounded by special tokens): truncation can cut tokens instead of
    # re-rendering. Gemma 3 folds the system prompt into the first user turn, so it cannot.
    truncation_splices: bool = True

    @abc.abstractmethod
    def render(self, messages: Sequence[dict]) -> list[Segment]:
        """The conversation as role-tagged segments (text, role, trainable)."""

    def render_text(self, messages: Sequence[dict]) -> str:
        """The whole rendered string (the concatenated text of ``render``; templates write it directly)."""
        return "".join(s.text for s in self.render(messages))

    def structure_key(self, messages: Sequence[dict]) -> tuple:
        """What determines the segment structure of a rendering (not its text): the role sequence."""
        return ("".join([m["role"][0] for m in messages]),)

    def canonical(self, key: tuple) -> list[dict]:
        """A conversation of structure ``key`` whose message i has the content PLACEHOLDER.format(i)."""
        roles = {"s": "system", "u": "user", "a": "assistant"}
        return [{"role": roles[r], "content": PLACEHOLDER.format(i)} for i, r in enumerate(key[0])]

    @abc.abstractmethod
    def generation_prompt(self) -> str:
        """What follows a conversation to make the model answer (for generation, not training)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _split_system(messages: Sequence[dict]) -> tuple[dict | None, int]:
    return (messages[0], 1) if messages and messages[0]["role"] == "system" else (None, 0)


class ChatML(ChatTemplate):
    """Generic ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` for every message, no BOS."""

    name = "chatml"
    description = "generic ChatML"
    specials = ("<|im_start|>", "<|im_end|>")
    end_of_turn = "<|im_end|>"

    def __init__(self):
        self._start, self._end = Special("<|im_start|>"), Special("<|im_end|>")

    def _assistant(self, i: int, x: int, content: str, header_extra: tuple = ()) -> list[Segment]:
        return [
            Segment("assistant", (self._start, "assistant\n", *header_extra), False, i, x),
            Segment("assistant", (content, self._end), True, i, x),
            Segment("assistant", ("\n",), False, i, x),
        ]

    def _plain(self, role: str, i: int, x: int, content: str) -> Segment:
        return Segment(role, (self._start, f"{role}\n{content}", self._end, "\n"), False, i, x)

    def render(self, messages):
        segs = []
        for i, (m, x) in enumerate(zip(messages, exchange_index(messages), strict=True)):
            if m["role"] == "assistant":
                segs += self._assistant(i, x, m["content"])
            else:
                segs.append(self._plain(m["role"], i, x, m["content"]))
        return segs

    def render_text(self, messages):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    def generation_prompt(self) -> str:
        return "<|im_start|>assistant\n"


class Qwen3(ChatML):
    """Qwen3 (ChatML) with its handling of ``<think>`` blocks.

    Reasoning comes from an assistant message's ``reasoning_content`` or from its content split at
    ``</think>``. Assistant turns after the last user query (in training data: the final one) render
    ``<think>\\n{reasoning}\\n</think>\\n\\n{content}`` — trained when the reasoning is non-empty,
    template text (untrained) when it is empty; earlier assistant turns render only their content (reasoning
    dropped), as     Qwen3's template does, so the rendering is not prefix-preserving across turns.
    """

    name = "qwen3"
    description = "Qwen3 (ChatML with <think> blocks)"
    specials = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")

    def __init__(self):
        super().__init__()
        self._think, self._unthink = Special("<think>"), Special("</think>")

    @staticmethod
    def split_reasoning(m: dict) -> tuple[str, str]:
        """(reasoning, content) of an assistant message, as Qwen3's template splits them."""
        content = m["content"]
        reasoning = m.get("reasoning_content")
        if isinstance(reasoning, str):
            return reasoning, content
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            return reasoning, content.split("</think>")[-1].lstrip("\n")
        return "", content

    def render(self, messages):
        last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
        segs = []
        exchanges = exchange_index(messages)
        for i, m in enumerate(messages):
            x = exchanges[i]
            if m["role"] != "assistant":
                segs.append(self._plain(m["role"], i, x, m["content"]))
                continue
            reasoning, content = self.split_reasoning(m)
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning = reasoning.strip("\n")
                content = content.lstrip("\n")
                if reasoning:
                    body = (self._think, f"\n{reasoning}\n", self._unthink, f"\n\n{content}", self._end)
                    segs += [
                        Segment("assistant", (self._start, "assistant\n"), False, i, x),
                        Segment("assistant", body, True, i, x),
                        Segment("assistant", ("\n",), False, i, x),
                    ]
                else:
                    segs += self._assistant(i, x, content, (self._think, "\n\n", self._unthink, "\n\n"))
            else:
                segs += self._assistant(i, x, content)
        return segs

    def render_text(self, messages):
        last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
                continue
            if i < last_query and "</think>" not in m["content"]:  # the common case, without a split
                out.append(f"<|im_start|>assistant\n{m['content']}<|im_end|>\n")
                continue
            reasoning, content = self.split_reasoning(m)
            if i > last_query and (i == len(messages) - 1 or reasoning):
                think = reasoning.strip("\n")
                out.append(
                    f"<|im_start|>assistant\n<think>\n{think}\n</think>\n\n{content.lstrip(chr(10))}<|im_end|>\n"
                )
            else:
                out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        return "".join(out)

    def structure_key(self, messages):
        # the last turn's think block is trained only when its reasoning is non-empty
        last = messages[-1]
        if "reasoning_content" not in last and "</think>" not in last["content"]:
            return ("".join([m["role"][0] for m in messages]), False)
        reasoning, _ = self.split_reasoning(last)
        return ("".join([m["role"][0] for m in messages]), bool(reasoning.strip("\n")))

    def canonical(self, key):
        msgs = super().canonical(key)
        if key[1]:
            msgs[-1]["reasoning_content"] = "\x03reasoning\x04"
        return msgs


class Gemma3(ChatTemplate):
    """Gemma 3: ``<bos>``, turns ``<start_of_turn>{user|model}\\n{content|trim}<end_of_turn>\\n``.

    The system prompt is not a role: its text (untrimmed) + ``\\n\\n`` prefixes the first user turn. Trained:
    the model turn's content and ``<end_of_turn>`` (not ``<eos>``; not the newline after it).
    """

    name = "gemma3"
    description = "Gemma 3"
    truncation_splices = False
    specials = ("<bos>", "<start_of_turn>", "<end_of_turn>")
    end_of_turn = "<end_of_turn>"

    def __init__(self):
        self._bos, self._sot, self._eot = (
            Special("<bos>"),
            Special("<start_of_turn>"),
            Special("<end_of_turn>"),
        )

    def render(self, messages):
        system, first = _split_system(messages)
        exchanges = exchange_index(messages)
        segs = [Segment("template", (self._bos,), False, -1, -1)]
        for i in range(first, len(messages)):
            m, x = messages[i], exchanges[i]
            content = m["content"].strip()
            if m["role"] == "assistant":
                segs += [
                    Segment("assistant", (self._sot, "model\n"), False, i, x),
                    Segment("assistant", (content, self._eot), True, i, x),
                    Segment("assistant", ("\n",), False, i, x),
                ]
            elif system is not None and i == first:
                segs += [
                    Segment("user", (self._sot, "user\n"), False, i, x),
                    Segment("system", (system["content"] + "\n\n",), False, 0, -1),
                    Segment("user", (content, self._eot, "\n"), False, i, x),
                ]
            else:
                segs.append(Segment("user", (self._sot, "user\n" + content, self._eot, "\n"), False, i, x))
        return segs

    def render_text(self, messages):
        system, first = _split_system(messages)
        out = ["<bos>"]
        for i in range(first, len(messages)):
            m = messages[i]
            c = m["content"].strip()
            if m["role"] == "assistant":
                out.append(f"<start_of_turn>model\n{c}<end_of_turn>\n")
            elif system is not None and i == first:
                out.append(f"<start_of_turn>user\n{system['content']}\n\n{c}<end_of_turn>\n")
            else:
                out.append(f"<start_of_turn>user\n{c}<end_of_turn>\n")
        return "".join(out)

    def generation_prompt(self) -> str:
        return "<start_of_turn>model\n"


class Llama3(ChatTemplate):
    """Llama 3.1 / 3.2 / 3.3: ``<|begin_of_text|>``, always a system header with the date lines, then
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>``.

    ``date_string`` is pinned (default ``26 Jul 2024``, the template's own default) so token counts do not
    change with the calendar. Trained: assistant content and ``<|eot_id|>``.
    """

    name = "llama3"
    description = "Llama 3.x (date line pinned)"
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    end_of_turn = "<|eot_id|>"
    CUTOFF = "Cutting Knowledge Date: December 2023\n"

    def __init__(self, date_string: str = "26 Jul 2024"):
        self.date_string = date_string
        self._bot = Special("<|begin_of_text|>")
        self._sh, self._eh, self._eot = (
            Special("<|start_header_id|>"),
            Special("<|end_header_id|>"),
            Special("<|eot_id|>"),
        )

    def render(self, messages):
        system, first = _split_system(messages)
        exchanges = exchange_index(messages)
        sys_text = system["content"].strip() if system is not None else ""
        header = f"\n\n{self.CUTOFF}Today Date: {self.date_string}\n\n{sys_text}"
        segs = [
            Segment("template", (self._bot,), False, -1, -1),
            Segment(
                "system" if system is not None else "template",
                (self._sh, "system", self._eh, header, self._eot),
                False,
                0 if system is not None else -1,
                -1,
            ),
        ]
        for i in range(first, len(messages)):
            m, x = messages[i], exchanges[i]
            content = m["content"].strip()
            if m["role"] == "assistant":
                segs += [
                    Segment("assistant", (self._sh, "assistant", self._eh, "\n\n"), False, i, x),
                    Segment("assistant", (content, self._eot), True, i, x),
                ]
            else:
                segs.append(
                    Segment("user", (self._sh, "user", self._eh, "\n\n" + content, self._eot), False, i, x)
                )
        return segs

    def render_text(self, messages):
        system, first = _split_system(messages)
        sys_text = system["content"].strip() if system is not None else ""
        out = [
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{self.CUTOFF}Today Date: {self.date_string}\n\n{sys_text}<|eot_id|>"
        ]
        for i in range(first, len(messages)):
            m = messages[i]
            out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
        return "".join(out)

    def generation_prompt(self) -> str:
        return "<|start_header_id|>assistant<|end_header_id|>\n\n"


class Phi4(ChatTemplate):
    """Phi-4 (14B): ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>``, no newlines, no BOS.

    Trained: assistant content and ``<|im_end|>`` (Phi-4's eos after Unsloth's fixes; pad must not be it).
    """

    name = "phi4"
    description = "Phi-4"
    specials = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")
    end_of_turn = "<|im_end|>"

    def __init__(self):
        self._start, self._sep, self._end = (
            Special("<|im_start|>"),
            Special("<|im_sep|>"),
            Special("<|im_end|>"),
        )

    def render(self, messages):
        segs = []
        for i, (m, x) in enumerate(zip(messages, exchange_index(messages), strict=True)):
            role, content = m["role"], m["content"]
            if role == "assistant":
                segs += [
                    Segment("assistant", (self._start, "assistant", self._sep), False, i, x),
                    Segment("assistant", (content, self._end), True, i, x),
                ]
            else:
                segs.append(Segment(role, (self._start, role, self._sep, content, self._end), False, i, x))
        return segs

    def render_text(self, messages):
        return "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)

    def generation_prompt(self) -> str:
        return "<|im_start|>assistant<|im_sep|>"


class Phi4Mini(ChatTemplate):
    """Phi-4-mini: ``<|{role}|>{content}<|end|>``, no newlines; ``<|endoftext|>`` after the last turn.

    Trained: assistant content and ``<|end|>`` (the chat eos, id 200020); the trailing ``<|endoftext|>``
    the template appends without a generation prompt is template text (fixed, untrained).
    """

    name = "phi4-mini"
    description = "Phi-4-mini"
    specials = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
    end_of_turn = "<|end|>"

    def __init__(self):
        self._end, self._eos = Special("<|end|>"), Special("<|endoftext|>")
        self._role = {r: Special(f"<|{r}|>") for r in ("system", "user", "assistant")}

    def render(self, messages):
        segs = []
        for i, (m, x) in enumerate(zip(messages, exchange_index(messages), strict=True)):
            role, content = m["role"], m["content"]
            if role == "assistant":
                segs += [
                    Segment("assistant", (self._role[role],), False, i, x),
                    Segment("assistant", (content, self._end), True, i, x),
                ]
            else:
                segs.append(Segment(role, (self._role[role], content, self._end), False, i, x))
        segs.append(Segment("template", (self._eos,), False, -1, -1))
        return segs

    def render_text(self, messages):
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|endoftext|>"

    def generation_prompt(self) -> str:
        return "<|assistant|>"


class MistralNemo(ChatTemplate):
    """Mistral NeMo (V3-Tekken): ``<s>[INST]{user}[/INST]{assistant}</s>``, no spaces, no newlines.

    System prompt placement: it goes into the **last** user turn, ``[INST]{system}\\n\\n{user}[/INST]``, as
    mistral-common encodes it. (Hugging Face's Jinja only does so when that user turn is the very last
    message, i.e. at inference; a training conversation ends with an assistant turn, where that rule would
    silently drop the system prompt.) Consequences: the rendering is not prefix-preserving across turns, and
    truncating exchanges from the front never moves the system prompt. Trained: assistant content and
    ``</s>``.
    """

    name = "mistral-nemo"
    description = "Mistral NeMo (Tekken; system prompt in the last user turn)"
    specials = ("<s>", "</s>", "[INST]", "[/INST]")
    end_of_turn = "</s>"

    def __init__(self):
        self._bos, self._eos = Special("<s>"), Special("</s>")
        self._inst, self._uninst = Special("[INST]"), Special("[/INST]")

    def render(self, messages):
        system, first = _split_system(messages)
        exchanges = exchange_index(messages)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        segs = [Segment("template", (self._bos,), False, -1, -1)]
        for i in range(first, len(messages)):
            m, x = messages[i], exchanges[i]
            if m["role"] == "assistant":
                segs.append(Segment("assistant", (m["content"], self._eos), True, i, x))
            elif i == last_user and system is not None:
                segs += [
                    Segment("user", (self._inst,), False, i, x),
                    Segment("system", (system["content"] + "\n\n",), False, 0, -1),
                    Segment("user", (m["content"], self._uninst), False, i, x),
                ]
            else:
                segs.append(Segment("user", (self._inst, m["content"], self._uninst), False, i, x))
        return segs

    def render_text(self, messages):
        system, first = _split_system(messages)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        out = ["<s>"]
        for i in range(first, len(messages)):
            m = messages[i]
            if m["role"] == "assistant":
                out.append(f"{m['content']}</s>")
            elif i == last_user and system is not None:
                out.append(f"[INST]{system['content']}\n\n{m['content']}[/INST]")
            else:
                out.append(f"[INST]{m['content']}[/INST]")
        return "".join(out)

    def generation_prompt(self) -> str:
        return ""


class Harmony(ChatTemplate):
    """gpt-oss's harmony format: ``<|start|>{role}<|message|>{text}<|end|>`` messages, no newlines between.

    First a system message with the model identity, ``Knowledge cutoff: 2024-06``, ``Current date:``
    (pinned: ``current_date``, default ``2025-06-28``, so counts do not change with the calendar),
    ``Reasoning: {reasoning_effort}`` and the valid channels; a conversation's system prompt becomes the
    developer message ``# Instructions\n\n{text}\n\n``. Assistant replies go to the ``final`` channel:
    ``<|start|>assistant<|channel|>final<|message|>{content}<|end|>``; the last one ends with
    ``<|return|>`` (where generation stops) and is preceded by its reasoning on the ``analysis`` channel
    when the message has ``thinking`` (or ``reasoning_content``); earlier replies drop their reasoning, as
    gpt-oss's own template does. Trained (assistant-only labels on ``final``): each final content with its
    end token; the analysis text only with ``train_analysis=True``.
    """

    name = "harmony"
    description = "gpt-oss harmony (analysis / final channels; date pinned)"
    specials = ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>")
    end_of_turn = "<|return|>"
    IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
    EFFORTS = ("low", "medium", "high")

    def __init__(
        self,
        current_date: str = "2025-06-28",
        reasoning_effort: str = "medium",
        model_identity: str = IDENTITY,
        train_analysis: bool = False,
    ):
        if reasoning_effort not in self.EFFORTS:
            raise KindredValueError(
                f"reasoning_effort must be one of {self.EFFORTS}, got {reasoning_effort!r}"
            )
        self.system_text = (
            f"{model_identity}\nKnowledge cutoff: 2024-06\nCurrent date: {current_date}\n\n"
            f"Reasoning: {reasoning_effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message."
        )
        self.train_analysis = train_analysis
        self._start, self._msg, self._end, self._chan, self._ret = (Special(t) for t in self.specials)

    @staticmethod
    def thinking(m: dict) -> str:
        t = m.get("thinking", m.get("reasoning_content"))
        return t if isinstance(t, str) else ""

    def _check(self, m: dict, i: int) -> None:
        for key in ("content", "thinking", "reasoning_content"):
            if isinstance(m.get(key), str) and "<|channel|>" in m[key]:
                raise KindredValueError(
                    f"messages[{i}].{key} holds a <|channel|> tag: put the analysis text in 'thinking' "
                    "and the final answer in 'content'"
                )

    def render(self, messages):
        system, first = _split_system(messages)
        exchanges = exchange_index(messages)
        s, msg, end = self._start, self._msg, self._end
        segs = [Segment("template", (s, "system", msg, self.system_text, end), False, -1, -1)]
        if system is not None:
            dev = f"# Instructions\n\n{system['content']}\n\n"
            segs.append(Segment("system", (s, "developer", msg, dev, end), False, 0, -1))
        for i in range(first, len(messages)):
            m, x = messages[i], exchanges[i]
            self._check(m, i)
            if m["role"] != "assistant":
                segs.append(Segment("user", (s, "user", msg, m["content"], end), False, i, x))
                continue
            last = i == len(messages) - 1
            thinking = self.thinking(m) if last else ""
            if thinking:
                segs += [
                    Segment("assistant", (s, "assistant", self._chan, "analysis", msg), False, i, x),
                    Segment("assistant", (thinking, end), self.train_analysis, i, x),
                ]
            segs += [
                Segment("assistant", (s, "assistant", self._chan, "final", msg), False, i, x),
                Segment("assistant", (m["content"], self._ret if last else end), True, i, x),
            ]
        return segs

    def structure_key(self, messages):
        return ("".join([m["role"][0] for m in messages]), bool(self.thinking(messages[-1])))

    def canonical(self, key):
        msgs = super().canonical(key)
        if key[1]:
            msgs[-1]["thinking"] = "\x03reasoning\x04"
        return msgs

    def generation_prompt(self) -> str:
        return "<|start|>assistant"


class Qwen3Coder(ChatML):
    """Qwen3-Coder (ChatML, no ``<think>``) with its XML tool calls.

    An assistant message with ``tool_calls`` ([{"function": {"name", "arguments"}}] or [{"name",
    "arguments"}], arguments an object or its JSON text) renders ``<|im_start|>assistant``, then
    ``\n{content|trim}\n`` when there is content, then per call
    ``\n<tool_call>\n<function={name}>\n`` + ``<parameter={key}>\n{value}\n</parameter>\n`` per argument +
    ``</function>\n</tool_call>``, then ``<|im_end|>\n`` (values: objects and lists as JSON, the rest as
    text). Consecutive ``tool`` messages share one user turn: ``<|im_start|>user\n`` +
    ``<tool_response>\n{content}\n</tool_response>\n`` each + ``<|im_end|>\n``. Trained: the assistant
    text (tool calls included) and ``<|im_end|>``. Tool definitions are not rendered from a ``tools``
    list: put them in the system prompt's text.
    """

    name = "qwen3-coder"
    description = "Qwen3-Coder (ChatML with XML tool calls)"

    @staticmethod
    def tool_calls_text(m: dict, where: str) -> str:
        out = []
        for k, call in enumerate(m["tool_calls"]):
            fn = call.get("function", call) if isinstance(call, dict) else None
            args = fn.get("arguments", {}) if isinstance(fn, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as e:
                    raise KindredValueError(
                        f"{where}.tool_calls[{k}].arguments: not JSON ({e.msg})"
                    ) from None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
                raise KindredValueError(
                    f"{where}.tool_calls[{k}] must be {{'name': str, 'arguments': object}} "
                    "(or those under 'function')"
                )
            params = "".join(
                f"<parameter={key}>\n"
                + (json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else _jinja_str(v))
                + "\n</parameter>\n"
                for key, v in args.items()
            )
            out.append(f"\n<tool_call>\n<function={fn['name']}>\n{params}</function>\n</tool_call>")
        return "".join(out)

    def render(self, messages):
        segs = []
        exchanges = exchange_index(messages)
        for i, m in enumerate(messages):
            x, role = exchanges[i], m["role"]
            if role == "tool":
                prev_tool = i > 0 and messages[i - 1]["role"] == "tool"
                next_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
                head = () if prev_tool else (self._start, "user\n")
                tail = () if next_tool else (self._end, "\n")
                body = f"<tool_response>\n{m['content']}\n</tool_response>\n"
                segs.append(Segment("user", (*head, body, *tail), False, i, x))
            elif role == "assistant" and m.get("tool_calls"):
                content = m["content"].strip() if isinstance(m.get("content"), str) else ""
                text = (f"\n{content}\n" if content else "") + self.tool_calls_text(m, f"messages[{i}]")
                segs += [
                    Segment("assistant", (self._start, "assistant"), False, i, x),
                    Segment("assistant", (text, self._end), True, i, x),
                    Segment("assistant", ("\n",), False, i, x),
                ]
            elif role == "assistant":
                segs += self._assistant(i, x, m["content"])
            else:
                segs.append(self._plain(role, i, x, m["content"]))
        return segs

    def render_text(self, messages):
        return "".join(s.text for s in self.render(messages))

    def structure_key(self, messages):
        # tool calls and tool turns change the segments, not only the roles: such conversations key alone
        if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            return ("".join([m["role"][0] for m in messages]), json.dumps(messages, sort_keys=True))
        return super().structure_key(messages)

    def canonical(self, key):
        if len(key) > 1:  # a tool conversation: its own canonical form, contents replaced by placeholders
            msgs = json.loads(key[1])
            for i, m in enumerate(msgs):
                m["content"] = PLACEHOLDER.format(i)
            return msgs
        return super().canonical(key)


def _jinja_str(v) -> str:
    """Jinja's ``| string`` of a JSON scalar (Python's str: True, None, 1.5)."""
    return v if isinstance(v, str) else str(v)


_TEMPLATES = {
    t.name: t for t in (Gemma3, Qwen3, Llama3, Phi4, Phi4Mini, MistralNemo, ChatML, Harmony, Qwen3Coder)
}
_ALIASES = {
    "gemma-3": "gemma3",
    "gemma": "gemma3",
    "qwen": "qwen3",
    "qwen-3": "qwen3",
    "llama-3": "llama3",
    "llama3.1": "llama3",
    "llama3.2": "llama3",
    "llama3.3": "llama3",
    "llama-3.1": "llama3",
    "llama-3.2": "llama3",
    "llama-3.3": "llama3",
    "phi-4": "phi4",
    "phi-4-mini": "phi4-mini",
    "phi4mini": "phi4-mini",
    "nemo": "mistral-nemo",
    "mistral_nemo": "mistral-nemo",
    "mistral-tekken": "mistral-nemo",  # NeMo's V3-Tekken format (the catalogue's name for it)
    "tekken": "mistral-nemo",
    "gpt-oss": "harmony",
    "qwen3_coder": "qwen3-coder",
}
TEMPLATES: tuple[str, ...] = tuple(_TEMPLATES)


def get_template(name: str | ChatTemplate, **options) -> ChatTemplate:
    """The template called ``name`` (see TEMPLATES; aliases such as ``llama-3.1`` accepted), or a model's own
    Jinja template from a path: a model folder, tokenizer_config.json, a .jinja or a .gguf file
    (:func:`kindred.data.chat_template.load_chat_template`)."""
    if isinstance(name, ChatTemplate):
        return name
    if isinstance(name, os.PathLike) or (
        isinstance(name, str) and (name.endswith((".jinja", ".gguf", ".json")) or os.path.isdir(name))
    ):
        from .chat_template import load_chat_template

        return load_chat_template(name, **options)
    if not isinstance(name, str) or not name:
        raise KindredValueError(f"a chat template name is needed: one of {', '.join(TEMPLATES)}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _TEMPLATES:
        near = difflib.get_close_matches(key, [*TEMPLATES, *_ALIASES], n=1, cutoff=0.6)
        hint = f"; did you mean {_ALIASES.get(near[0], near[0])!r}?" if near else ""
        raise KindredValueError(
            f"unknown chat template {name!r}{hint} (known: {', '.join(TEMPLATES)}, or a model folder / "
            "tokenizer_config.json / .jinja / .gguf path for the model's own template)"
        )
    try:
        return _TEMPLATES[key](**options)
    except TypeError as e:
        raise KindredValueError(f"template {key!r}: {e}") from None
