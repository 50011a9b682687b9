"""The budget report: what a data set costs in tokens before anything is trained.

``budget_report(data, tokenizer, template, budget)`` reads (or takes) chat data, renders it with the
template, tokenizes it, applies the budget policy and returns a :class:`BudgetReport`: the count
distribution (min, median, p95, max), examples over budget and what the policy did to them, tokens per
exchange, the trainable share, padding waste without and with packing, seed 004's relative cost table
applied to the data, the logits memory per example for the vocabulary, and the conversation-length planner.
``report.print()`` shows rich tables, ``report.plot(path)`` a histogram PNG, ``report.to_dict()`` JSON data.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KindredValueError
from .budget import DROP, TRUNCATE
from .jsonl import Skipped, atomic_write
from .pipeline import Prepared, prepare
from .planner import ConversationPlan, _k, cost_table, logits_bytes, plan_conversation


def _size(b: int) -> str:
    if b >= 10**9:
        return f"{b / 1e9:.2f} GB ({b / 2**30:.2f} GiB)"
    return f"{b / 1e6:.1f} MB ({b / 2**20:.1f} MiB)"


def _pct(a: np.ndarray, q: float) -> int:
    """The q-th percentile as an actual value of ``a`` (the smallest value with at least q % at or below)."""
    return int(np.percentile(a, q, method="higher")) if len(a) else 0


def _dist(a: np.ndarray) -> dict:
    a = np.asarray(a)
    if not len(a):
        return {"min": 0, "median": 0, "mean": 0.0, "p5": 0, "p95": 0, "max": 0}
    return {
        "min": int(a.min()),
        "median": _pct(a, 50),
        "mean": float(a.mean()),
        "p5": _pct(a, 5),
        "p95": _pct(a, 95),
        "max": int(a.max()),
    }


@dataclass
class BudgetReport:
    source: str
    template: str
    tokenizer: str
    tokenizer_backend: str
    vocab_size: int
    examples: int
    skipped: list[dict]
    total: int  # tokens of all examples (before the policy)
    trainable: int  # trained tokens (before the policy)
    distribution: dict  # example length: min, median, mean, p5, p95, max
    exchanges: dict  # tokens per exchange: min, median, mean, p5, p95, max
    exchanges_per_example: dict
    system_tokens: int  # median fixed tokens (template prefix + system prompt)
    budget: int | None
    policy: str | None
    over_budget: int
    truncated: int
    dropped: int
    over_examples: list[dict]  # the longest examples over budget and what happened to them
    total_after: int  # tokens after the policy
    trainable_after: int
    pack: int | None
    padding: dict
    cost: list[dict]
    logits: list[dict]
    planner: dict | None
    lengths: np.ndarray = field(repr=False, default=None)

    @property
    def p95(self) -> int:
        return self.distribution["p95"]

    @property
    def median(self) -> int:
        return self.distribution["median"]

    @property
    def trainable_share(self) -> float:
        return self.trainable / max(self.total, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("lengths")
        d["trainable_share"] = self.trainable_share
        return d

    # ----------------------------------------------------------------------------------------------------
    def renderables(self) -> list:
        """rich renderables: the report's tables."""
        from rich.table import Table

        out = []
        head = Table(title=f"kindred tokens: {self.source}", show_header=False, title_justify="left")
        head.add_column(style="bold")
        head.add_column()
        head.add_row(
            "template / tokenizer", f"{self.template} / {self.tokenizer} ({self.vocab_size:,} tokens)"
        )
        head.add_row("tokenizer backend", self.tokenizer_backend)
        skipped = f", {len(self.skipped)} invalid line(s) skipped" if self.skipped else ""
        head.add_row("examples", f"{self.examples:,}{skipped}")
        if self.skipped:
            head.add_row("skipped lines", ", ".join(str(s["line"]) for s in self.skipped[:30]))
        head.add_row(
            "tokens",
            f"{self.total:,} in all, {self.trainable:,} trained ({100 * self.trainable_share:.1f} %)",
        )
        d = self.distribution
        head.add_row(
            "tokens per example",
            f"min {d['min']:,} · median {d['median']:,} · p95 {d['p95']:,} · max {d['max']:,} "
            f"(mean {d['mean']:,.0f})",
        )
        x = self.exchanges
        head.add_row(
            "tokens per exchange",
            f"min {x['min']:,} · median {x['median']:,} · p95 {x['p95']:,} · max {x['max']:,} "
            f"(mean {x['mean']:,.0f}); "
            f"{self.exchanges_per_example['median']} exchanges per example (median)",
        )
        head.add_row("system prompt + template", f"{self.system_tokens:,} tokens (median)")
        if self.budget is not None:
            head.add_row(
                f"budget {self.budget:,} ({self.policy})",
                f"{self.over_budget} over budget: {self.truncated} truncated, {self.dropped} dropped; "
                f"{self.total_after:,} tokens kept, {self.trainable_after:,} trained",
            )
        p = self.padding
        head.add_row(
            f"padding to {p['seq_len']:,}",
            f"{100 * p['unpacked_waste']:.1f} % waste without packing ({p['unpacked_rows']:,} rows); "
            + (
                f"{100 * p['packed_waste']:.1f} % packed ({p['packed_rows']:,} rows)"
                + (
                    f"; {p['longer_than_rows']:,} examples longer than a row"
                    if p.get("longer_than_rows")
                    else ""
                )
                if p.get("packed_rows") is not None
                else "pass --pack to see packing"
            ),
        )
        out.append(head)
        if self.over_examples:
            t = Table(title="over budget (longest first)", title_justify="left")
            for c in ("example", "tokens", "action", "exchanges dropped", "tokens after"):
                t.add_column(c, justify="right" if c != "example" else "left")
            for e in self.over_examples:
                t.add_row(
                    e["where"],
                    f"{e['tokens']:,}",
                    e["action"],
                    str(e["exchanges_dropped"]),
                    f"{e['tokens_after']:,}",
                )
            out.append(t)
        t = Table(
            title="relative training cost (4K = 1×, 8K = 2×, 16K = 4×, 32K = 8×, 64K = 16×)",
            title_justify="left",
        )
        for c in (
            "context",
            "cost / sequence",
            "examples fit",
            "tokens fit",
            "padded cost",
            "packed rows",
            "packed cost",
        ):
            t.add_column(c, justify="right")
        for r in self.cost:
            t.add_row(
                f"{r['context'] // 1024}K",
                f"{r['relative_cost']:g}×",
                f"{r['examples_fit']:,} ({100 * r['share_fit']:.0f} %)",
                f"{100 * r['tokens_fit_share']:.0f} %",
                f"{r['padded_cost']:,.0f}",
                f"{r['packed_rows']:,}",
                f"{r['packed_cost']:,.0f}",
            )
        out.append(t)
        t = Table(
            title=f"fp32 logits per sequence (tokens × {self.vocab_size:,} vocab × 4 B)", title_justify="left"
        )
        for c in ("length", "tokens", "logits"):
            t.add_column(c, justify="right" if c != "length" else "left")
        for r in self.logits:
            t.add_row(r["what"], f"{r['tokens']:,}", _size(r["bytes"]))
        out.append(t)
        if self.planner:
            pl = self.planner
            t = Table(title="conversation-length planner", show_header=False, title_justify="left")
            t.add_column(style="bold")
            t.add_column(justify="right")
            t.add_row("budget", f"{pl['budget']:,}")
            t.add_row("− system prompt + template", f"{pl['system_tokens']:,}")
            t.add_row("− buffer", f"{pl['buffer']:,}")
            t.add_row("= available", f"{pl['available']:,} (~{_k(pl['available_planning'])} for planning)")
            t.add_row("tokens per exchange (mean)", f"{pl['tokens_per_exchange']:,.0f}")
            t.add_row("max exchanges", str(pl["max_exchanges"]))
            if pl.get("max_exchanges_longest") is not None:
                t.add_row("max if every exchange were p95-long", str(pl["max_exchanges_longest"]))
            t.add_row("recommended", f"{pl['recommended'][0]}–{pl['recommended'][1]}")
            if pl.get("warning"):
                t.add_row("[red]warning[/red]", pl["warning"])
            out.append(t)
        return out

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console(width=max(Console().width, 110))
        for r in self.renderables():
            console.print(r)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        self.print(Console(file=buf, width=120, force_terminal=False))
        return buf.getvalue()

    def plot(self, path: str | os.PathLike) -> Path:
        """A histogram of example lengths, budget and pack length marked, as PNG (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
        lengths = self.lengths if self.lengths is not None else np.zeros(0)
        if len(lengths):
            ax.hist(lengths, bins=min(60, max(10, len(lengths) // 5)), color="#4c72b0", alpha=0.85)
        marks = [("p95", self.p95, "#dd8452", ":")]
        if self.budget:
            marks.append(("budget", self.budget, "#c44e52", "-"))
        if self.pack:
            marks.append(("pack", self.pack, "#55a868", "--"))
        for label, x, color, style in marks:
            ax.axvline(x, color=color, linestyle=style, label=f"{label} {x:,}")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.set_title(f"{Path(self.source).name}: {self.examples:,} examples, {self.template}")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        with atomic_write(path) as f:
            f.write(buf.getvalue())
        return Path(path)


def budget_report(
    data,
    tokenizer,
    template,
    budget: int | None = 16384,
    *,
    pack: int | None = None,
    policy: str = "truncate",
    buffer: int = 1024,
    vocab_size: int | None = None,
    skip_invalid: bool = False,
    prepared: Prepared | None = None,
    **template_options,
) -> BudgetReport:
    """The budget report of chat data (a JSONL path, a ChatData or a list of conversations).

    ``budget=None`` reports counts only (no policy). ``pack`` packs the kept examples into rows of that many
    tokens to measure padding waste. ``vocab_size`` (default: the tokenizer's) sizes the logits memory.
    """
    p = prepared or prepare(
        data,
        tokenizer,
        template,
        budget,
        policy=policy,
        pack_to=pack,
        skip_invalid=skip_invalid,
        **template_options,
    )
    t = p.tokenized
    lengths = t.tokens.astype(np.int64)
    final = p.final
    vocab = int(vocab_size or p.tokenizer.vocab_size)
    exchange_tokens = t.exchange_tokens.astype(np.int64)
    over_examples = []
    b = p.budgeted
    if b is not None:
        over = np.flatnonzero(b.tokens_before > b.budget)
        for i in over[np.argsort(-b.tokens_before[over], kind="stable")][:20]:
            act = {TRUNCATE: "truncated", DROP: "dropped"}.get(int(b.action[i]), "kept")
            over_examples.append(
                {
                    "example": int(i),
                    "where": p.chat.where(int(i)),
                    "tokens": int(b.tokens_before[i]),
                    "action": act,
                    "exchanges_dropped": int(b.dropped_exchanges[i]),
                    "tokens_after": int(b.tokens_after[i]),
                }
            )
    seq_len = pack or budget or (int(lengths.max()) if len(lengths) else 1)
    final_len = final.tokens.astype(np.int64)
    unpacked = final_len[final_len <= seq_len]
    padding = {
        "seq_len": int(seq_len),
        "unpacked_rows": len(unpacked),
        "unpacked_waste": 1 - int(unpacked.sum()) / max(len(unpacked) * seq_len, 1) if len(unpacked) else 0.0,
        "packed_rows": None,
        "packed_waste": None,
    }
    padding["longer_than_rows"] = 0
    if p.packed is not None:
        padding["packed_rows"] = p.packed.rows
        padding["packed_waste"] = 1 - p.packed.fill if p.packed.rows else 0.0
        padding["longer_than_rows"] = len(p.too_long) if p.too_long is not None else 0
    elif pack is None and len(unpacked):
        from ..ops import pack_bfd

        padding["packed_rows"] = pack_bfd(unpacked.astype(np.int32), seq_len)[2]
        padding["packed_waste"] = 1 - int(unpacked.sum()) / max(padding["packed_rows"] * seq_len, 1)
    logits = []
    for what, n in (
        ("p95 example", _pct(lengths, 95)),
        ("longest example", int(lengths.max()) if len(lengths) else 0),
    ):
        logits.append({"what": what, "tokens": n, "bytes": logits_bytes(n, vocab)})
    for what, n in (("4K sequence", 4096), ("budget", budget), ("packed row", pack)):
        if n:
            logits.append({"what": what, "tokens": int(n), "bytes": logits_bytes(int(n), vocab)})
    system = _pct(t.fixed, 50)
    planner = None
    if budget and len(exchange_tokens):
        lo_hi = (_pct(exchange_tokens, 5), _pct(exchange_tokens, 95))
        plan: ConversationPlan = plan_conversation(
            budget, system, float(exchange_tokens.mean()), buffer, exchange_range=lo_hi
        )
        planner = plan.to_dict()
    per_example_exchanges = np.diff(t.exchange_offsets)
    return BudgetReport(
        source=p.chat.path,
        template=p.template.name,
        tokenizer=Path(p.tokenizer.path).name,
        tokenizer_backend=p.tokenizer.backend,
        vocab_size=vocab,
        examples=len(t),
        skipped=[asdict(s) if isinstance(s, Skipped) else s for s in p.chat.skipped],
        total=int(lengths.sum()),
        trainable=int(t.trainable.sum()),
        distribution=_dist(lengths),
        exchanges=_dist(exchange_tokens),
        exchanges_per_example=_dist(per_example_exchanges),
        system_tokens=system,
        budget=budget,
        policy=policy if budget is not None else None,
        over_budget=b.over if b else 0,
        truncated=b.truncated if b else 0,
        dropped=b.dropped if b else 0,
        over_examples=over_examples,
        total_after=int(final_len.sum()),
        trainable_after=int(final.trainable.sum()),
        pack=pack,
        padding=padding,
        cost=cost_table(lengths),
        logits=logits,
        planner=planner,
        lengths=lengths,
    )


def token_report(path, tokenizer=None, template=None, **kwargs) -> BudgetReport:
    """Token counts of a chat JSONL (no budget policy): ``.p95`` (tokens per example) and ``.total``.

    What ``kindred plan --data`` uses to check the context against the data and to estimate training time.
    """
    if tokenizer is None or template is None:
        raise KindredValueError(
            "a token report needs a tokenizer (--tokenizer PATH) and a chat template (--template NAME)"
        )
    return budget_report(path, tokenizer, template, None, **kwargs)
