"""Token accounting of chat data: render → tokenize → per-segment roles → labels and counts (C++ core).

Every tokenizer splits text at its special tokens before anything else, and templates put a special token
at every boundary that matters, so the text between two special tokens (a *run*) tokenizes the same alone
as inside the whole string. Two engines build on that and give identical results (tested):

* ``auto`` (the default, as fast as the tokenizer): encode each whole rendered string once — exactly the
  raw tokenizer's work — then find the template's special tokens in the ids, check that they are the ones
  the template emitted, in order, and divide the runs between them among the segments. The segment
  structure of a rendering depends only on its roles (and, for Qwen3, whether the last turn has reasoning);
  it is compiled once per structure from a canonical rendering, and all conversations of one structure are
  divided at once with numpy. A conversation whose text spells a special token, or where a token straddles
  a divided run's boundary, falls back to:
* ``runs``: encode the runs themselves. A run that spans segments (``assistant\\n`` + the content) is
  divided where the tokens of its first part end (checked against that part's own tokens); if a token
  straddles the boundary, the later segment gets the longest tail of the run's tokens that equals the tail
  of its own tokenization and the straddling token goes to the earlier (untrained) segment: no trained
  token ever holds prompt text. Short repeated texts (role headers, newlines) are cached.

Either way the segments' tokens concatenated equal the tokenizer's encoding of the whole rendered string,
special tokens are resolved by name, and the labels are correct by construction. One exception, for the
``runs`` engine only: a sentencepiece *unigram* model may score two segmentations of a run the same (``...``
as ``.`` + ``..`` or ``..`` + ``.``); its Viterbi breaks the tie by float rounding, which depends on the score
of the text before the run, so a run encoded alone can come out as the other, equally good one (same text,
same token count in every tie seen). ``auto`` encodes whole strings, so its ids are the library's own.
Sharing the encoding of a common system-prompt prefix across conversations is ruled out for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import KindredValueError
from .templates import PLACEHOLDER, ChatTemplate, Segment, Special, get_template
from .tokenized import ROLE_CODES, TokenizedData, assemble, gather_csr
from .tokenizers import Tokenizer, load_tokenizer

_CACHE_MAX_LEN = 48  # runs up to this many characters are cached per tokenizer
_CACHE_MAX_ENTRIES = 200_000
_PLACEHOLDER_RE = re.compile(PLACEHOLDER.format("(\\d+)"))  # message i's content in canonical renderings


class _Engine:
    """Run-based tokenization of rendered conversations for one tokenizer and template."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tok = tokenizer
        self.template = template
        self.special_ids = {
            Special(n): tokenizer.token_id(n, needed_by=f"chat template {template.name!r}")
            for n in template.specials
        }
        cache = tokenizer.__dict__.setdefault("_kindred_run_cache", {})
        if len(cache) > _CACHE_MAX_ENTRIES:
            cache.clear()
        self.cache: dict[str, np.ndarray] = cache
        structures = tokenizer.__dict__.setdefault("_kindred_structures", {})
        options = tuple(
            sorted((k, v) for k, v in vars(template).items() if isinstance(v, (str, int, float, bool)))
        )
        self.structures: dict = structures.setdefault((type(template).__qualname__, options), {})

    def encode_cached(self, texts: list[str]) -> None:
        """Encode the texts not yet cached and cache them."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            ids, off = self.tok.encode_batch(todo)
            for k, t in enumerate(todo):
                self.cache[t] = ids[off[k] : off[k + 1]].copy()

    def run(self, rendered: list[list[Segment]]) -> TokenizedData:
        n = len(rendered)
        special_ids = self.special_ids
        # Units in token order; kind 0: a cached text or special (key into `cache_keys`), 1: an encoded run.
        unit_kind: list[int] = []
        unit_ref: list[int] = []
        unit_seg: list[int] = []
        cache_index: dict = {}
        cache_keys: list = []
        encode: list[str] = []
        multi: list[tuple[int, list[tuple[str, int]]]] = []  # (unit position, [(part text, segment)])
        seg_trainable: list[int] = []
        seg_turn: list[int] = []
        seg_exchange: list[int] = []
        seg_role: list[int] = []
        example_segs = np.zeros(n + 1, np.int64)
        turn_counts = np.zeros(n, np.int64)
        exchange_counts = np.zeros(n, np.int64)
        role_codes = ROLE_CODES
        g = 0

        def add_cached(key, seg: int) -> None:
            ref = cache_index.get(key)
            if ref is None:
                ref = cache_index[key] = len(cache_keys)
                cache_keys.append(key)
            unit_kind.append(0)
            unit_ref.append(ref)
            unit_seg.append(seg)

        for e, segs in enumerate(rendered):
            run: list[tuple[str, int]] = []
            max_turn = max_exchange = -1
            for seg in segs:
                seg_trainable.append(seg.trainable)
                seg_turn.append(seg.turn)
                seg_exchange.append(seg.exchange)
                seg_role.append(role_codes[seg.role])
                if seg.turn > max_turn:
                    max_turn = seg.turn
                if seg.exchange > max_exchange:
                    max_exchange = seg.exchange
                for p in seg.parts:
                    if type(p) is Special:
                        if run:
                            self._flush(run, add_cached, unit_kind, unit_ref, unit_seg, encode, multi)
                            run = []
                        add_cached(special_ids[p], g)
                    elif p:
                        run.append((p, g))
                g += 1
            if run:
                self._flush(run, add_cached, unit_kind, unit_ref, unit_seg, encode, multi)
            example_segs[e + 1] = g
            turn_counts[e] = max_turn + 1
            exchange_counts[e] = max_exchange + 1

        # Encode: the runs, the cached texts not yet in the cache, the split prefixes of multi-segment runs.
        prefixes = []
        for _, parts in multi:
            prefix = ""
            for t, _ in parts[:-1]:
                prefix += t
                prefixes.append(prefix)
        self.encode_cached([k for k in cache_keys if isinstance(k, str)] + prefixes)
        enc_ids, enc_off = self.tok.encode_batch(encode)
        # Cached pieces (specials and short texts) live after the encoded ids in one source array.
        cached = [np.asarray([k], np.int32) if not isinstance(k, str) else self.cache[k] for k in cache_keys]
        cache_len = np.fromiter(map(len, cached), np.int64, count=len(cached))
        cache_start = np.zeros(len(cached) + 1, np.int64)
        np.cumsum(cache_len, out=cache_start[1:])
        source = np.concatenate([enc_ids, *cached]) if cached else enc_ids
        base = len(enc_ids)

        kind = np.asarray(unit_kind, np.int8)
        ref = np.asarray(unit_ref, np.int64)
        useg = np.asarray(unit_seg, np.int64)
        start = np.empty(len(kind), np.int64)
        length = np.empty(len(kind), np.int64)
        from_cache = kind == 0
        start[from_cache] = base + cache_start[ref[from_cache]]
        length[from_cache] = cache_len[ref[from_cache]]
        encoded = ~from_cache
        start[encoded] = enc_off[ref[encoded]]
        length[encoded] = enc_off[ref[encoded] + 1] - enc_off[ref[encoded]]
        # Multi-segment runs: split into one unit per segment (appended; units are re-sorted below).
        extra_pos: list[float] = []
        extra_start: list[int] = []
        extra_len: list[int] = []
        extra_seg: list[int] = []
        for pos, parts in multi:
            a, b = int(start[pos]), int(start[pos] + length[pos])
            bounds = self._split(source[a:b], parts)
            length[pos] = 0  # replaced by its pieces
            for k, (text_seg, lo, hi) in enumerate(
                zip([p[1] for p in parts], bounds[:-1], bounds[1:], strict=True)
            ):
                extra_pos.append(pos + (k + 1) / (len(parts) + 1))
                extra_start.append(a + lo)
                extra_len.append(hi - lo)
                extra_seg.append(text_seg)
        if extra_pos:
            order = np.argsort(
                np.concatenate([np.arange(len(kind), dtype=np.float64), extra_pos]), kind="stable"
            )
            start = np.concatenate([start, extra_start])[order]
            length = np.concatenate([length, extra_len])[order]
            useg = np.concatenate([useg, extra_seg])[order]
        # Token stream and per-segment lengths.
        unit_off = np.zeros(len(length) + 1, np.int64)
        np.cumsum(length, out=unit_off[1:])
        gather = np.repeat(start - unit_off[:-1], length) + np.arange(unit_off[-1], dtype=np.int64)
        ids = np.ascontiguousarray(source[gather], dtype=np.int32)
        seg_len = np.bincount(useg, weights=length, minlength=g).astype(np.int64)
        seg_offsets = np.zeros(g + 1, np.int64)
        np.cumsum(seg_len, out=seg_offsets[1:])
        return assemble(
            ids,
            seg_offsets,
            np.asarray(seg_trainable, np.uint8),
            np.asarray(seg_turn, np.int32),
            np.asarray(seg_exchange, np.int32),
            np.asarray(seg_role, np.uint8),
            example_segs,
            turn_counts,
            exchange_counts,
        )

    def _flush(self, run, add_cached, unit_kind, unit_ref, unit_seg, encode, multi) -> None:
        first_seg = run[0][1]
        if len(run) == 1 or all(s == first_seg for _, s in run):
            text = run[0][0] if len(run) == 1 else "".join(t for t, _ in run)
            if len(text) <= _CACHE_MAX_LEN:
                add_cached(text, first_seg)
                return
            unit_kind.append(1)
            unit_ref.append(len(encode))
            unit_seg.append(first_seg)
            encode.append(text)
            return
        # Several segments in one run: merge adjacent parts of the same segment, then encode the whole run.
        parts: list[tuple[str, int]] = []
        for t, s in run:
            if parts and parts[-1][1] == s:
                parts[-1] = (parts[-1][0] + t, s)
            else:
                parts.append((t, s))
        multi.append((len(unit_kind), parts))
        unit_kind.append(1)
        unit_ref.append(len(encode))
        unit_seg.append(parts[0][1])
        encode.append("".join(t for t, _ in parts))

    def _split(self, run_ids: np.ndarray, parts: list[tuple[str, int]]) -> list[int]:
        """Token boundaries [0, b1, ..., len] dividing a multi-segment run's tokens among its parts."""
        bounds = [0]
        prefix = ""
        for k in range(len(parts) - 1):
            prefix += parts[k][0]
            head = self.cache.get(prefix)
            if head is None:
                self.encode_cached([prefix])
                head = self.cache[prefix]
            h = len(head)
            if h <= len(run_ids) and np.array_equal(run_ids[:h], head):
                cut = h
            else:  # a token straddles the boundary: the tail that the rest tokenizes to alone goes right
                rest = "".join(t for t, _ in parts[k + 1 :])
                rest_ids = np.asarray(self.tok.encode(rest), np.int32)
                m = min(len(rest_ids), len(run_ids))
                same = run_ids[len(run_ids) - m :] == rest_ids[len(rest_ids) - m :]
                tail = m if same.all() else int(m - 1 - np.flatnonzero(~same)[-1])
                cut = len(run_ids) - tail
            bounds.append(max(cut, bounds[-1]))
        bounds.append(len(run_ids))
        return bounds


class _Structure:
    """The segment structure of one kind of rendering (template + structure key), compiled from the segments
    of a canonical conversation whose contents are placeholders.

    The rendered string holds K special tokens; the K + 1 gaps between them hold the text runs. Each gap is
    empty, belongs to one segment, or is a multi-segment run divided at given prefixes.
    """

    def __init__(self, engine: _Engine, key: tuple):
        tpl = engine.template
        canonical = tpl.canonical(key)
        segs = tpl.render(canonical)
        self.n_turns = len(canonical)
        self.n_exchanges = sum(m["role"] == "user" for m in canonical)
        self.seg_trainable = np.array([sg.trainable for sg in segs], np.uint8)
        self.seg_turn = np.array([sg.turn for sg in segs], np.int32)
        self.seg_exchange = np.array([sg.exchange for sg in segs], np.int32)
        self.seg_role = np.array([ROLE_CODES[sg.role] for sg in segs], np.uint8)
        special_ids, special_seg = [], []
        gaps: list[list[tuple[str, int]]] = [[]]
        for g, sg in enumerate(segs):
            for part in sg.parts:
                if type(part) is Special:
                    special_ids.append(engine.special_ids[part])
                    special_seg.append(g)
                    gaps.append([])
                elif part:
                    if gaps[-1] and gaps[-1][-1][1] == g:
                        gaps[-1][-1] = (gaps[-1][-1][0] + part, g)
                    else:
                        gaps[-1].append((part, g))
        self.special_ids = np.array(special_ids, np.int32)
        self.special_seg = np.array(special_seg, np.int64)
        self.gap_seg = np.array([gap[0][1] if len(gap) == 1 else -1 for gap in gaps], np.int64)
        self.empty = np.array([not gap for gap in gaps])
        # multi-segment gaps: (gap, segments in order, recipe of the prefix at each inner boundary)
        self.multi = []
        for j, gap in enumerate(gaps):
            if len(gap) > 1:
                recipes, acc = [], ""
                for text, _ in gap[:-1]:
                    acc += text
                    recipes.append(self._recipe(acc, canonical))
                self.multi.append((j, [g for _, g in gap], recipes))

    @staticmethod
    def _recipe(template_text: str, canonical: list[dict]) -> tuple[list[str], list[int]] | None:
        """How a prefix is spelled for one conversation: literal pieces with the raw contents of the listed
        messages between them. None when a message other than the system prompt appears (only the system
        prompt appears raw inside a run's prefix in kindred's templates): such gaps go to the run engine."""
        pieces = _PLACEHOLDER_RE.split(template_text)
        messages = [int(i) for i in pieces[1::2]]
        if any(canonical[i]["role"] != "system" for i in messages):
            return None
        return pieces[0::2], messages


def _spell(literals: list[str], messages: list[int], conversation: Sequence[dict]) -> str:
    out = literals[0]
    for k, m in enumerate(messages):
        out += conversation[m]["content"] + literals[k + 1]
    return out


def _prefix_match(
    engine: _Engine,
    ids: np.ndarray,
    distinct: list[str],
    code: np.ndarray,
    start: np.ndarray,
    room: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(match, cut) per conversation: whether its whole-string tokens from ``start`` (``room`` of them in the
    gap) begin with the tokens of its prefix ``distinct[code]`` — each distinct prefix encoded once, all
    conversations compared at once — and that prefix's token count."""
    engine.encode_cached(distinct)
    heads = [engine.cache[x] for x in distinct]
    head_len = np.fromiter(map(len, heads), np.int64, count=len(heads))
    head_start = np.zeros(len(heads), np.int64)
    np.cumsum(head_len[:-1], out=head_start[1:])
    flat = np.concatenate(heads)
    cut = head_len[code]
    match = cut <= room
    rows = np.flatnonzero(match)
    n = cut[rows]
    row_of = np.repeat(np.arange(len(rows)), n)  # one entry per compared token
    k = np.arange(len(row_of)) - np.repeat(np.cumsum(n) - n, n)  # its index within the prefix
    same = ids[start[rows][row_of] + k] == flat[head_start[code[rows]][row_of] + k]
    match[rows[row_of[~same]]] = False
    return match, cut


def _fast(engine: _Engine, conversations: Sequence) -> tuple[TokenizedData | None, np.ndarray, np.ndarray]:
    """Tokenize whole rendered strings and divide them among segments at the template's special tokens.

    Returns (data of the conversations that aligned, their indices, the indices left for the run engine).
    A conversation is left over when its special tokens do not sit where the template put them (its text
    spells a special token) or a token straddles a divided run's boundary.
    """
    tpl = engine.template
    render_text, key_of = tpl.render_text, tpl.structure_key
    texts, groups = [], {}
    for i, c in enumerate(conversations):
        texts.append(render_text(c))
        groups.setdefault(key_of(c), []).append(i)
    ids, off = engine.tok.encode_batch(texts)
    n = len(conversations)
    special_set = np.array(sorted(set(engine.special_ids.values())), np.int32)
    is_special = np.isin(ids, special_set)
    positions = np.flatnonzero(is_special)
    # specials per conversation: which conversation each special token position falls in
    special_count = np.bincount(np.searchsorted(off, positions, side="right") - 1, minlength=n)[:n]
    first_special = np.zeros(n, np.int64)
    np.cumsum(special_count[:-1], out=first_special[1:])
    good = np.zeros(n, bool)
    aligned = []  # (structure, conversations, their segment lengths)
    for key, members in groups.items():
        st = engine.structures.get(key)
        if st is None:
            st = engine.structures[key] = _Structure(engine, key)
        idx = np.asarray(members, np.int64)
        k = len(st.special_ids)
        idx = idx[special_count[idx] == k]
        if not len(idx):
            continue
        pos = (
            positions[first_special[idx][:, None] + np.arange(k)] if k else np.zeros((len(idx), 0), np.int64)
        )
        ok = (ids[pos] == st.special_ids).all(axis=1)
        lo = np.concatenate([off[idx][:, None], pos + 1], axis=1)  # gap starts
        hi = np.concatenate([pos, off[idx + 1][:, None]], axis=1)  # gap ends
        gap_len = hi - lo
        ok &= (gap_len[:, st.empty] == 0).all(axis=1)
        seg_len = np.zeros((len(idx), len(st.seg_trainable)), np.int64)
        single = np.flatnonzero(st.gap_seg >= 0)
        np.add.at(seg_len, (slice(None), st.gap_seg[single]), gap_len[:, single])
        np.add.at(seg_len, (slice(None), st.special_seg), 1)
        for j, segs_in_gap, recipes in st.multi:
            cut_prev = np.zeros(len(idx), np.int64)
            for b, recipe in enumerate(recipes):
                if recipe is None:
                    ok[:] = False
                    break
                literals, messages = recipe
                if messages:  # the system prompt inside the prefix: one string per distinct prompt
                    code_of: dict[str, int] = {}
                    code = np.fromiter(
                        (
                            code_of.setdefault(_spell(literals, messages, conversations[i]), len(code_of))
                            for i in idx.tolist()
                        ),
                        np.int64,
                        count=len(idx),
                    )
                    distinct = list(code_of)
                else:
                    distinct, code = [literals[0]], np.zeros(len(idx), np.int64)
                match, cut = _prefix_match(engine, ids, distinct, code, lo[:, j], gap_len[:, j])
                ok &= match & (cut >= cut_prev)
                seg_len[np.arange(len(idx)), segs_in_gap[b]] += np.where(match, cut - cut_prev, 0)
                cut_prev = np.where(match, cut, cut_prev)
            seg_len[np.arange(len(idx)), segs_in_gap[-1]] += np.maximum(gap_len[:, j] - cut_prev, 0)
        good[idx[ok]] = True
        aligned.append((st, idx[ok], seg_len[ok]))
    done = np.flatnonzero(good)
    rest = np.flatnonzero(~good)
    if not len(done):
        return None, done, rest
    # Flat per-segment arrays in conversation order, scattered group by group.
    n_segs = np.zeros(n, np.int64)
    n_turns = np.zeros(n, np.int64)
    n_exchanges = np.zeros(n, np.int64)
    for st, members, _ in aligned:
        n_segs[members] = len(st.seg_trainable)
        n_turns[members] = st.n_turns
        n_exchanges[members] = st.n_exchanges
    example_segs = np.zeros(len(done) + 1, np.int64)
    np.cumsum(n_segs[done], out=example_segs[1:])
    total = int(example_segs[-1])
    seg_len = np.empty(total, np.int64)
    seg_trainable = np.empty(total, np.uint8)
    seg_turn = np.empty(total, np.int32)
    seg_exchange = np.empty(total, np.int32)
    seg_role = np.empty(total, np.uint8)
    for st, members, rows in aligned:
        at = example_segs[np.searchsorted(done, members)][:, None] + np.arange(len(st.seg_trainable))
        seg_len[at] = rows
        seg_trainable[at] = st.seg_trainable
        seg_turn[at] = st.seg_turn
        seg_exchange[at] = st.seg_exchange
        seg_role[at] = st.seg_role
    sub_ids = ids if len(done) == n else ids[gather_csr(off, done)[0]]
    seg_offsets = np.zeros(total + 1, np.int64)
    np.cumsum(seg_len, out=seg_offsets[1:])
    data = assemble(
        np.ascontiguousarray(sub_ids, dtype=np.int32),
        seg_offsets,
        seg_trainable,
        seg_turn,
        seg_exchange,
        seg_role,
        example_segs,
        n_turns[done],
        n_exchanges[done],
    )
    return data, done, rest


def tokenize(
    conversations: Sequence,
    tokenizer: Tokenizer | str,
    template: ChatTemplate | str,
    *,
    engine: str = "auto",
    **template_options,
) -> TokenizedData:
    """Render, tokenize and account a list of validated conversations (lists of messages).

    Special tokens the template needs are looked up by name; a tokenizer without one raises
    KindredValueError naming the token and the template. ``engine``: ``"auto"`` encodes each whole rendered
    string once and divides its tokens among the segments at the template's special tokens (checked; any
    conversation that does not align goes through the run engine); ``"runs"`` encodes the text runs of the
    segments (see the module docstring). Both give the same result.
    """
    tok = load_tokenizer(tokenizer)
    tpl = get_template(template, **template_options)
    eng = _Engine(tok, tpl)
    if engine == "runs":
        return eng.run([tpl.render(c) for c in conversations])
    if engine != "auto":
        raise KindredValueError(f"engine must be 'auto' or 'runs', got {engine!r}")
    data, done, rest = _fast(eng, conversations)
    if not len(rest):
        return data if data is not None else eng.run([])
    slow = eng.run([tpl.render(conversations[int(i)]) for i in rest])
    if data is None:
        return slow
    merged = TokenizedData.concat([data, slow])
    order = np.empty(len(conversations), np.int64)
    order[done] = np.arange(len(done))
    order[rest] = len(done) + np.arange(len(rest))
    return merged.take(order)


def tokenize_whole(conversation, tokenizer: Tokenizer | str, template: ChatTemplate | str) -> list[int]:
    """The tokenizer's encoding of the whole rendered string (what the segments must add up to)."""
    tok = load_tokenizer(tokenizer)
    return list(tok.encode(get_template(template).render_text(conversation)))
