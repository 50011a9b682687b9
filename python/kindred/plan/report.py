"""Rendering plan results: text tables (rich when installed), records / DataFrame, a breakdown bar chart."""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import KindredValueError

SUMMARY_COLUMNS = (
    ("model", "model"),
    ("params_b", "params B"),
    ("context", "context"),
    ("kindred", "kindred"),
    ("train_gib", "train GiB"),
    ("fits_train", "fits"),
    ("infer_gib", "infer GiB"),
    ("train_tok_s", "train tok/s"),
    ("train_hours", "train h"),
    ("train_usd", "train $"),
    ("decode_tok_s", "decode tok/s"),
    ("score", "score"),
    ("license", "license"),
)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def render_table(rows: list[list], header: list[str], title: str = "") -> str:
    """A table as text: rich's layout when rich is importable, aligned plain columns otherwise."""
    cells = [[_cell(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
        lines = [title] if title else []
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines) + "\n"
    table = Table(title=title or None)
    for h in header:
        table.add_column(h)
    for r in cells:
        table.add_row(*r)
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(table)
    return console.file.getvalue()


def summary_table(records: list[dict], title: str = "") -> str:
    rows = [[r.get(key) for key, _ in SUMMARY_COLUMNS] for r in records]
    text = render_table(rows, [label for _, label in SUMMARY_COLUMNS], title)
    notes = [f"{r['model']}: {r['error']}" for r in records if r.get("error")]
    notes += [
        f"{r['model']}: format refused: {r['format_refused']}" for r in records if r.get("format_refused")
    ]
    notes += [
        f"{r['model']}: plan only: {r['kindred_why']}" for r in records if r.get("kindred") == "plan only"
    ]
    return text + "".join(f"  note: {n}\n" for n in notes)


def serving_tables(spec, gpu, context: int, utilization: float, price=None) -> str:
    """vLLM's KV-cache pool and slots on ``gpu`` (AWQ), and llama.cpp / Ollama memory per GGUF type."""
    from .serving import gguf_table, vllm_kv_cache
    from .support import format_refusal

    context = min(context, spec.context)
    gib = 1 << 30
    out = []
    refused = format_refusal(spec, "AWQ-INT4")
    if gpu.backend == "metal":
        out.append("vLLM: not on Apple GPUs (llama.cpp / Ollama below)")
    elif refused:
        out.append(f"vLLM AWQ: refused ({refused})")
    else:
        v = vllm_kv_cache(spec, gpu.memory_bytes, "AWQ-INT4", context, utilization)
        out.append(
            f"vLLM AWQ at {utilization:g} of {gpu.memory_gb:g} GB: weights "
            f"{v['weights_bytes'] / gib:.2f} GiB, "
            f"profiling activations {v['activation_bytes'] / gib:.2f} GiB, KV pool {v['pool_gib']:.2f} GiB = "
            f"{v['slots']:,} blocks of {v['block_size']} tokens, {v['concurrent_requests']:.1f} requests of "
            f"{context:,} tokens at once (CUDA graphs and the runtime not counted)"
        )
    parts = ("weights_bytes", "kv_cache_bytes", "compute_buffer_bytes")
    rows = [
        [g["format"], *(g[k] / gib for k in parts), g["total_gib"], g["total_bytes"] <= gpu.memory_bytes]
        for g in gguf_table(spec, context)
    ]
    head = ["GGUF", "weights GiB", "KV GiB", "compute GiB", "total GiB", "fits"]
    out.append(render_table(rows, head, f"{spec.name}: llama.cpp / Ollama at {context:,} tokens (f16 KV)"))
    if price:
        out.append(f"an hour of serving on {gpu.name}: ${price.usd_per_hour:g} ({price.provider})")
    return "\n".join(out)


def breakdown_table(breakdown: dict, title: str) -> str:
    parts = breakdown["parts_gib"]
    rows = [[name, gib, breakdown["notes"].get(name, "")] for name, gib in parts.items()]
    rows.append(["total", breakdown["total_gib"], f"{breakdown['total_gb']:.2f} GB"])
    return render_table(rows, ["part", "GiB", "how counted"], title)


def checklist_table(checks: dict, title: str) -> str:
    return render_table(
        [[name, c["status"], c["detail"]] for name, c in checks.items()], ["check", "status", "detail"], title
    )


def to_records(records: list[dict]) -> list[dict]:
    """Flat records (nested breakdowns and checklists dropped) for tables and DataFrames."""
    flat = []
    for r in records:
        row = {k: v for k, v in r.items() if k not in ("breakdown", "checklist", "scores")}
        row.update({f"score_{k}": v for k, v in r.get("scores", {}).items()})
        row.update({f"check_{k}": c["status"] for k, c in r.get("checklist", {}).items()})
        flat.append(row)
    return flat


def to_dataframe(records: list[dict]):
    """A pandas DataFrame of the flat records, or the records themselves when pandas is not installed."""
    try:
        import pandas as pd
    except ImportError:
        return to_records(records)
    return pd.DataFrame(to_records(records))


def plot_breakdown(breakdowns: dict[str, dict], path: str | Path, title: str = "memory by part") -> Path:
    """Stacked horizontal bars (GiB by part), one bar per labelled breakdown, saved as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KindredValueError("--plot needs matplotlib (pip install matplotlib)") from None
    items = [(label, b) for label, b in breakdowns.items() if b]
    if not items:
        raise KindredValueError("nothing to plot: no breakdown was estimated")
    parts = list(dict.fromkeys(p for _, b in items for p in b["parts_gib"]))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(items)))
    left = [0.0] * len(items)
    for part in parts:
        widths = [b["parts_gib"].get(part, 0.0) for _, b in items]
        ax.barh([label for label, _ in items], widths, left=left, label=part)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    ax.set_xlabel("GiB")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
