"""A model's own Jinja chat template (tokenizer_config.json, chat_template.jinja, GGUF metadata) as a
:class:`~kindred.data.templates.ChatTemplate`, with assistant-only labels derived from the rendering.

The template is rendered in jinja2's immutable sandbox with the settings Hugging Face uses (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, ``tojson``), so the text equals
``tokenizer.apply_chat_template(messages, tokenize=False)``. The trained characters of each assistant turn:

* with ``{% generation %}`` blocks in the template: exactly the characters inside them;
* otherwise by diffing renderings: the conversation is rendered again with that message's text replaced by
  a sentinel; the characters that differ are its content as the template writes it (trimmed or split as the
  template does). Training covers them and the end-of-turn token: the first special token after them. When
  the message also changed the template's own text before the content (a ``<think>`` block filled from its
  reasoning), training starts where the generation prompt ends instead: the model writes that block. Text
  the template writes identically for any message (Qwen3's empty ``<think>\\n\\n</think>\\n\\n``, role
  headers, the newline after the end-of-turn token) is not trained: the same choices as kindred's
  hand-written templates, which a test checks token for token on all seven families.

Turn boundaries (for per-turn counts and truncation) come from rendering each prefix of the conversation.
A template that drops a message of a training conversation (Mistral NeMo's Jinja keeps the system prompt
only when the last message is a user turn) raises KindredValueError naming the message: nothing is left
out silently. ``strftime_now`` is pinned to ``today`` (default 26 Jul 2024, Llama 3's own default) so token
counts do not change with the calendar.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import KindredFormatError, KindredValueError
from .templates import ChatTemplate, Segment, Special, exchange_index

# Unicode noncharacters: never in interchanged text, so they cannot collide with content.
_SENTINEL = "\ufdd0"
_GEN_OPEN, _GEN_CLOSE = "\ufdd1", "\ufdd2"
_PRIVATE = (_SENTINEL, _GEN_OPEN, _GEN_CLOSE)
_CACHE_MAX = 4096


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise KindredValueError("a model's own chat template needs the 'jinja2' package") from None

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: what the assistant writes (between sentinels)."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _GEN_OPEN + caller() + _GEN_CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env, jinja2


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template rendered in a sandbox; assistant-only labels as the module docstring says.

    ``specials``: the tokenizer's added/special token spellings (resolved by name, never split); ``bos_token``
    / ``eos_token``: the strings the template's ``bos_token`` / ``eos_token`` variables hold; ``variables``:
    extra template variables (``enable_thinking``, ``date_string``, ...); ``today``: what ``strftime_now``
    formats.
    """

    truncation_splices = False  # unknown structure: truncated conversations are rendered again

    def __init__(
        self,
        source: str,
        *,
        specials: Sequence[str] = (),
        bos_token: str = "",
        eos_token: str = "",
        name: str = "model",
        origin: str = "",
        variables: dict | None = None,
        today: _dt.date = _dt.date(2024, 7, 26),
    ):
        if not isinstance(source, str) or not source.strip():
            raise KindredValueError(f"{origin or 'chat template'}: empty chat template")
        env, jinja2 = _environment()
        self._jinja2 = jinja2
        self.origin = origin or name
        try:
            self._compiled = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise KindredFormatError(
                f"{self.origin}:{e.lineno}: chat template syntax error: {e.message}"
            ) from None
        self.source = source
        self.name = name
        self.description = f"the model's own chat template ({self.origin})"
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.variables = dict(variables or {})
        self.today = today
        self.has_generation_blocks = bool(re.search(r"{%-?\s*generation\s*-?%}", source))
        # Only spellings that can occur matter; longest first so "<|im_end|>" wins over a prefix of it.
        self.specials = tuple(sorted({s for s in specials if s}, key=lambda s: (-len(s), s)))
        self._special_re = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self._cache: dict[str, list[Segment]] = {}
        self._prompt: str | None = None
        self._eot: str | None = None

    # -- rendering ---------------------------------------------------------------------------------------
    def _render_raw(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        today = self.today
        context = dict(self.variables)
        context.update(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            strftime_now=lambda fmt: today.strftime(fmt),
        )
        try:
            return self._compiled.render(**context)
        except self._jinja2.exceptions.TemplateError as e:
            raise KindredValueError(
                f"{self.origin}: the chat template refused the conversation: {e}"
            ) from None

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[str, list]:
        """(text, generation-block spans) of a rendering."""
        raw = self._render_raw(messages, add_generation_prompt)
        if _GEN_OPEN not in raw:
            return raw, []
        out, spans, pos, start = [], [], 0, None
        for piece in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", raw):
            if piece == _GEN_OPEN:
                start = pos
            elif piece == _GEN_CLOSE:
                if start is not None and pos > start:
                    spans.append((start, pos))
                start = None
            else:
                out.append(piece)
                pos += len(piece)
        return "".join(out), spans

    def render_text(self, messages: Sequence[dict]) -> str:
        return self._render(messages)[0]

    def render_prompt(self, messages: Sequence[dict]) -> str:
        """What the model reads before it answers ``messages`` (ending with a user turn), exactly as in
        training: the rendering of the conversation with one more assistant turn, up to where that turn's
        trained tokens begin (Qwen3's empty think block included, Phi-4-mini's closing eos not)."""
        probe = [*messages, {"role": "assistant", "content": "x"}]
        text = []
        for seg in self.render(probe):
            if seg.turn == len(messages) and seg.trainable:
                return "".join(text)
            text.append(seg.text)
        raise KindredValueError(
            f"{self.origin}: the template trains nothing of an answer to this conversation"
        )

    @property
    def end_of_turn(self) -> str:
        """The trained end-of-turn token (what generation stops at): the last special token of the trained
        span of a probe conversation's answer; the eos token when there is none."""
        if self._eot is None:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            try:
                trained = [
                    p for s in self.render(probe) if s.trainable for p in s.parts if type(p) is Special
                ]
            except KindredValueError:
                trained = []
            self._eot = trained[-1] if trained else self.eos_token
        return self._eot

    def generation_prompt(self) -> str:
        if self._prompt is None:
            self._prompt = self._find_generation_prompt()
        return self._prompt

    def _find_generation_prompt(self) -> str:
        probe = [{"role": "user", "content": "x"}]
        with_prompt, without = self._render(probe, True)[0], self._render(probe, False)[0]
        for base in (without, without.removesuffix(self.eos_token) if self.eos_token else without):
            if with_prompt.startswith(base):
                return with_prompt[len(base) :]
        return with_prompt[self._snap(_lcp(with_prompt, without), with_prompt) :]

    # -- segments -----------------------------------------------------------------------------------------
    def _special_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._special_re.finditer(text)] if self._special_re else []

    def _snap(self, pos: int, text: str) -> int:
        """``pos`` moved back to the start of a special token spelling it falls inside."""
        for a, b in self._special_spans(text):
            if a < pos < b:
                return a
        return pos

    def _changed(self, text: str, messages: Sequence[dict], i: int) -> tuple[int, int, str] | None:
        """(start, end) in ``text`` of what message i became, and what the sentinel rendering has there."""
        probe = [dict(m) for m in messages]
        probe[i] = {"role": messages[i]["role"], "content": _SENTINEL}
        other = self._render(probe)[0]
        if other == text:
            return None
        a = _lcp(text, other)
        s = _lcs(text, other, a)
        return a, len(text) - s, other[a : len(other) - s]

    def render(self, messages: Sequence[dict]) -> list[Segment]:
        key = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        segs = self._segments(messages)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = segs
        return segs

    def _segments(self, messages: Sequence[dict]) -> list[Segment]:
        for i, m in enumerate(messages):
            for k, v in m.items():
                if isinstance(v, str) and any(c in v for c in _PRIVATE):
                    raise KindredValueError(
                        f"messages[{i}].{k}: holds a Unicode noncharacter (U+FDD0..U+FDD2)"
                    )
        text, gen_spans = self._render(messages)
        specials = self._special_spans(text)
        special_starts = [a for a, _ in specials]
        regions: list[tuple[int, int]] = []
        trained: list[tuple[int, int]] = []
        prompt = self.generation_prompt()
        for i, m in enumerate(messages):
            ch = self._changed(text, messages, i)
            if ch is None:
                if m["content"]:
                    raise KindredValueError(
                        f"messages[{i}] ({m['role']}): {self.origin} leaves this message out of the rendered "
                        "conversation; use a kindred template for this family (kindred.data.TEMPLATES) or "
                        "change the data"
                    )
                at = regions[-1][1] if regions else 0
                regions.append((at, at))
                continue
            a, b, other = ch
            regions.append((a, b))
            if m["role"] != "assistant" or gen_spans:
                continue
            start = a
            if other != _SENTINEL:  # the message changed template text before its content (a think block)
                g = text.rfind(prompt, 0, a) if prompt else -1
                start = g + len(prompt) if g >= 0 and prompt else a
            nxt = next((j for j, s in enumerate(special_starts) if s >= b), None)
            end = specials[nxt][1] if nxt is not None else b
            trained.append((start, end))
        trained = gen_spans or trained
        # message i owns [bounds[i], bounds[i + 1]); before bounds[0] is template text
        bounds = []
        for i in range(len(messages)):
            lo = max(regions[i - 1][1], bounds[-1]) if i else 0
            hi = regions[i][0]
            if i == 0:
                try:
                    head = self._render([])[0]
                except KindredValueError:
                    head = self.bos_token if text.startswith(self.bos_token) else ""
            else:
                head = self._render(messages[:i])[0]
            cut = self._snap(_lcp(head, text), text)
            bounds.append(min(max(cut, lo), hi))
        bounds.append(
            self._suffix_start(text, messages, max(bounds[-1], regions[-1][1], *(e for _, e in trained)))
        )
        return self._assemble(text, messages, bounds, trained, specials)

    def _suffix_start(self, text: str, messages: Sequence[dict], floor: int) -> int:
        """Where the template's closing text begins (Phi-4-mini's ``<|endoftext|>``): what a following user
        turn would replace."""
        try:
            longer = self._render([*messages, {"role": "user", "content": _SENTINEL}])[0]
        except KindredValueError:
            return len(text)
        return max(self._snap(_lcp(longer, text), text), floor)

    def _assemble(self, text, messages, bounds, trained, specials) -> list[Segment]:
        cuts = {0, len(text), *bounds}
        for a, b in trained:
            cuts |= {a, b}
        for a, b in specials:
            cuts |= {a, b}
        cuts = sorted(c for c in cuts if 0 <= c <= len(text))
        special_at = dict(specials)
        exchanges = exchange_index(messages)
        segs: list[Segment] = []
        cur_key, parts = None, []

        def flush():
            if cur_key is not None and parts:
                turn, train = cur_key
                role = messages[turn]["role"] if turn >= 0 else "template"
                role = role if role in ("system", "user", "assistant") else "user"
                x = exchanges[turn] if turn >= 0 else -1
                segs.append(Segment(role, tuple(parts), train, turn, x))

        for a, b in itertools.pairwise(cuts):
            if a == b:
                continue
            turn = -1
            for i in range(len(messages)):
                if bounds[i] <= a < bounds[i + 1]:
                    turn = i
            if a >= bounds[-1]:
                turn = -1
            train = any(s <= a < e for s, e in trained)
            piece = Special(text[a:b]) if special_at.get(a) == b else text[a:b]
            if (turn, train) != cur_key:
                flush()
                cur_key, parts = (turn, train), []
            parts.append(piece)
        flush()
        return segs

    def structure_key(self, messages: Sequence[dict]) -> tuple:
        # the segment structure depends on the text here (trim, think blocks): one structure per conversation
        return (json.dumps(list(messages), sort_keys=True, ensure_ascii=False),)

    def canonical(self, key: tuple) -> list[dict]:
        return json.loads(key[0])

    def __repr__(self) -> str:
        return f"JinjaTemplate({self.origin!r})"


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _lcs(a: str, b: str, floor: int) -> int:
    """Length of the common suffix of a and b that leaves at least ``floor`` characters of each."""
    n = min(len(a), len(b)) - floor
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


# -- finding the template of a model --------------------------------------------------------------------
def _token_text(t) -> str:
    return t.get("content", "") if isinstance(t, dict) else (t or "")


def _from_tokenizer_json(path: Path) -> list[str]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KindredFormatError(f"{path}: not a valid tokenizer.json ({e})") from None
    return [t["content"] for t in obj.get("added_tokens", []) if isinstance(t, dict) and "content" in t]


def _pick(template, path) -> str:
    """A tokenizer_config's chat_template: a string, or a list of {name, template} (the 'default' one)."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise KindredFormatError(f"{path}: chat_template must be a string or a list with a 'default' entry")


def load_chat_template(source: str | os.PathLike, **options) -> JinjaTemplate:
    """The chat template a model ships: from a model folder (``chat_template.jinja`` or
    ``tokenizer_config.json``'s ``chat_template``), either file itself, or a ``.gguf`` file's
    ``tokenizer.chat_template``. Special tokens come from tokenizer.json / tokenizer_config.json / the GGUF
    vocabulary; ``options`` go to :class:`JinjaTemplate`.
    """
    p = Path(source)
    if not p.exists():
        raise KindredFormatError(
            f"{p}: no such file or folder (expected a model folder, a tokenizer_config.json, "
            "a .jinja file or a .gguf file)"
        )
    if p.suffix == ".gguf":
        return _from_gguf(p, **options)
    folder = p if p.is_dir() else p.parent
    config_path = folder / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise KindredFormatError(f"{config_path}: not valid JSON ({e})") from None
    if p.is_file() and p.suffix == ".jinja":
        source_text, origin = p.read_text(encoding="utf-8"), str(p)
    elif p.is_file() and p.suffix == ".json" and p.name != "tokenizer_config.json":
        raise KindredFormatError(f"{p}: expected tokenizer_config.json, a .jinja file or a model folder")
    elif (folder / "chat_template.jinja").is_file() and p.is_dir():
        source_text, origin = (
            (folder / "chat_template.jinja").read_text(encoding="utf-8"),
            str(folder / "chat_template.jinja"),
        )
    elif "chat_template" in config:
        source_text, origin = _pick(config["chat_template"], config_path), str(config_path)
    else:
        raise KindredFormatError(
            f"{p}: no chat template (no chat_template.jinja; tokenizer_config.json has no 'chat_template'); "
            "name one of kindred's templates instead (kindred.data.TEMPLATES)"
        )
    specials = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    if (folder / "tokenizer.json").is_file():
        specials += _from_tokenizer_json(folder / "tokenizer.json")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if config.get(key):
            specials.append(_token_text(config[key]))
    options.setdefault("bos_token", _token_text(config.get("bos_token")))
    options.setdefault("eos_token", _token_text(config.get("eos_token")))
    options.setdefault("name", f"model:{folder.name}")
    return JinjaTemplate(source_text, specials=specials, origin=origin, **options)


def _from_gguf(path: Path, **options) -> JinjaTemplate:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise KindredFormatError(f"{path}: reading a GGUF file needs the 'gguf' package") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises plain ValueError/OSError/struct errors on bad files
        raise KindredFormatError(f"{path}: not a readable GGUF file ({e})") from None

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    if not isinstance(template, str):
        raise KindredFormatError(f"{path}: the GGUF metadata has no tokenizer.chat_template")
    tokens = field("tokenizer.ggml.tokens") or []
    types = field("tokenizer.ggml.token_type") or []
    # token types 3 (control) and 4 (user-defined) are matched whole, as added tokens are
    specials = [t for t, ty in zip(tokens, types, strict=False) if ty in (3, 4)]

    def token(key):
        i = field(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    options.setdefault("bos_token", token("tokenizer.ggml.bos_token_id"))
    options.setdefault("eos_token", token("tokenizer.ggml.eos_token_id"))
    options.setdefault("name", f"model:{path.stem}")
    return JinjaTemplate(template, specials=specials, origin=f"{path} (tokenizer.chat_template)", **options)
