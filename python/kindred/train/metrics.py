"""What a run records while it trains: metrics files (CSV and JSONL), TensorBoard when installed, and a
loss-curve PNG at the end (what it prints: kindred.train.progress)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

FIELDS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "trainable_tokens",
    "tokens_per_s",
    "elapsed_s",
    "gpu_mem_gib",
)


class MetricsLog:
    """``metrics.csv`` and ``metrics.jsonl`` in the output folder, one row per optimizer step.

    On resume the rows after the checkpoint's step are dropped first, so the files always describe one
    continuous run (the rewrite goes through a temporary file and ``os.replace``).
    """

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool):
        self.csv_path = out_dir / "metrics.csv"
        self.jsonl_path = out_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if resume_step is not None and self.jsonl_path.is_file():
            for line in self.jsonl_path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resume_step:
                    self.rows.append(row)
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
            except ImportError:  # the tensorboard package is optional
                self.tb = None

    def _rewrite(self) -> None:
        for path, text in (
            (self.jsonl_path, self._jsonl(self.rows)),
            (self.csv_path, self._csv(self.rows, True)),
        ):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    @staticmethod
    def _jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    @staticmethod
    def _csv(rows: list[dict], header: bool) -> str:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def append(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        with self.jsonl_path.open("a") as f:
            f.write(self._jsonl(rows))
        with self.csv_path.open("a") as f:
            f.write(self._csv(rows, False))
        if self.tb is not None:
            for r in rows:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gib"):
                    if r.get(key) is not None:
                        self.tb.add_scalar(f"train/{key}", r[key], r["step"])

    def add_eval(self, step: int, loss: float) -> None:
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", loss, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(rows: list[dict], evals: list[tuple[int, float]], path: Path) -> Path | None:
    """The loss curve (train per step, eval points) as a PNG; None when matplotlib is not installed.

    Drawn on a bare Figure with the Agg canvas, so a notebook's pyplot backend is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o--", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
