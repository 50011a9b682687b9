"""GPU prices (prices.json: hourly on-demand rates with provider, source and date) and what a plan costs.

Overrides: a JSON file in the same format (``--prices FILE``) replaces entries GPU by GPU, ``--price
GPU=USD`` (any name ``get_gpu`` knows) replaces one rate. Costs: a fine-tune = training hours × rate; an
hour of serving = the rate (one GPU). Seed 004's relative-cost table (4K = 1× … 64K = 16×) becomes absolute
with ``context_costs``: per context, the data's examples packed into rows of that length, trained at the
tokens/s the time model predicts for that sequence length, at the GPU's rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import KindredValueError
from .gpus import get_gpu

_DATA = Path(__file__).with_name("prices.json")


@dataclass(frozen=True)
class Price:
    gpu: str
    usd_per_hour: float
    provider: str = ""
    offer: str = ""
    source: str = ""
    date: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _entries(path: Path) -> list[Price]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KindredValueError(f"{path}: cannot read prices ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise KindredValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prices"), list):
        raise KindredValueError(f"{path}: expected an object with a 'prices' list")
    out = []
    for i, e in enumerate(data["prices"]):
        where = f"{path}: prices[{i}]"
        if not isinstance(e, dict) or "gpu" not in e or "usd_per_hour" not in e:
            raise KindredValueError(f"{where}: needs 'gpu' and 'usd_per_hour'")
        rate = e["usd_per_hour"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
            raise KindredValueError(f"{where}: usd_per_hour must be a number >= 0, got {rate!r}")
        try:
            gpu = get_gpu(str(e["gpu"])).id
        except KindredValueError as err:
            raise KindredValueError(f"{where}: {err}") from None
        fields = {k: str(e.get(k, "")) for k in ("provider", "offer", "source", "date")}
        out.append(Price(gpu, float(rate), **fields))
    return out


def load_prices(
    path: str | Path | None = None, overrides: dict[str, float] | None = None
) -> dict[str, Price]:
    """The packaged prices, updated by the entries of ``path`` and then by ``overrides`` {GPU name: USD}."""
    prices = {p.gpu: p for p in _entries(_DATA)}
    if path is not None:
        prices.update({p.gpu: p for p in _entries(Path(path))})
    for name, rate in (overrides or {}).items():
        if rate < 0:
            raise KindredValueError(f"--price {name}={rate}: the rate must be >= 0")
        gpu = get_gpu(name).id
        prices[gpu] = Price(gpu, float(rate), "your rate", "", "--price", "")
    return prices


def context_costs(
    lengths, tokens_per_s_at, usd_per_hour: float, contexts=None, epochs: float = 1.0
) -> list[dict]:
    """Seed 004's cost table in dollars for examples of ``lengths`` tokens (see the module docstring).

    ``tokens_per_s_at(context)``: predicted training tokens/s at that sequence length (None: unknown).
    """
    from ..data import COST_CONTEXTS, cost_table

    rows = []
    for row in cost_table(lengths, contexts or COST_CONTEXTS):
        tps = tokens_per_s_at(row["context"])
        hours = row["packed_rows"] * row["context"] * epochs / tps / 3600 if tps else None
        rows.append({**row, "hours": hours, "usd": None if hours is None else hours * usd_per_hour})
    return rows
