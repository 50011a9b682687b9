"""What a run records while it trains: metrics files (CSV and JSONL), TensorBoard when installed, and a
loss-curve PNG at the end (what it prints: kindred.train.progress)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import append_bytes, fsync_file, refuse_symlink, write_bytes
from ..errors import KindredFormatError

SAMPLES = "samples.jsonl"
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
    """``metrics.csv`` and ``metrics.jsonl`` in the output folder, one row per optimizer step, and
    ``samples.jsonl``, one row per held-out evaluation with a sample reply (step, held_out_loss, prompt,
    reply).

    On resume the rows after the checkpoint's step are dropped first, so the files always describe one
    continuous run (rewritten atomically, kindred.atomic; then appended to). A torn last line (the process
    was killed in the middle of an append) is dropped; a malformed line before it is a KindredFormatError
    naming the line.
    """

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool):
        self.csv_path = refuse_symlink(out_dir / "metrics.csv")
        self.jsonl_path = refuse_symlink(out_dir / "metrics.jsonl")
        self.samples_path = refuse_symlink(out_dir / SAMPLES)
        self.rows = self._kept(self.jsonl_path, resume_step, "metrics row")
        self.samples = self._kept(self.samples_path, resume_step, "sample row")
        self._rewrite()
        if self.samples or self.samples_path.exists():
            write_bytes(self.samples_path, self._jsonl(self.samples).encode())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                folder = refuse_symlink(out_dir / "tensorboard")
                self.tb = SummaryWriter(str(folder), purge_step=(resume_step or 0) + 1)
            except ImportError:  # the tensorboard package is optional
                self.tb = None

    @staticmethod
    def _kept(path: Path, resume_step: int | None, what: str) -> list[dict]:
        if resume_step is None or not path.is_file():
            return []
        return [r for r in read_metrics(path, what) if r["step"] <= resume_step]

    def _rewrite(self) -> None:
        write_bytes(self.jsonl_path, self._jsonl(self.rows).encode())
        write_bytes(self.csv_path, self._csv(self.rows, True).encode())

    @staticmethod
    def _jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    @staticmethod
    def _csv(rows: list[dict], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def append(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        append_bytes(self.jsonl_path, self._jsonl(rows).encode(), fault="metrics")
        append_bytes(self.csv_path, self._csv(rows, False).encode())
        if self.tb is not None:
            for r in rows:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gib"):
                    if r.get(key) is not None:
                        self.tb.add_scalar(f"train/{key}", r[key], r["step"])

    def sync(self) -> None:
        """Make the rows written so far durable (before a checkpoint that covers them)."""
        fsync_file(self.jsonl_path)
        fsync_file(self.csv_path)
        if self.samples_path.exists():
            fsync_file(self.samples_path)

    def add_eval(self, step: int, loss: float, prompt: str | None = None, reply: str | None = None) -> None:
        """A held-out evaluation: TensorBoard's eval/loss and, with a sample ``reply``, a samples row."""
        if reply is not None:
            row = {"step": step, "held_out_loss": loss, "prompt": prompt, "reply": reply}
            self.samples.append(row)
            append_bytes(self.samples_path, self._jsonl([row]).encode(), fault="samples")
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", loss, step)
            if reply is not None:
                self.tb.add_text("eval/sample", reply, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path, what: str = "metrics row") -> list[dict]:
    """The rows of a metrics.jsonl (or samples.jsonl: ``what`` names a row in the error); a torn last line
    (no newline, not JSON) is left out."""
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("a row must be an object with an integer 'step'")
        except (ValueError, RecursionError) as e:
            if number == len(lines):  # the last line, without its newline: an append cut short
                break
            raise KindredFormatError(f"{path}: line {number} is not a {what} ({str(e)[:80]})") from None
        rows.append(row)
    return rows


def loss_figure(rows: list[dict], evals: list[tuple[int, float]]):
    """The loss curve as a matplotlib Figure: train loss per step, and the held-out loss at every evaluation
    joined by a dashed line; None when matplotlib is not installed.

    A bare Figure with the Agg canvas, so a notebook's pyplot backend is left alone."""
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
        marker = 4 if len(evals) <= 40 else 2
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o--", ms=marker, label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(rows: list[dict], evals: list[tuple[int, float]], path: Path) -> Path | None:
    """:func:`loss_figure` written as a PNG; None when matplotlib is not installed."""
    fig = loss_figure(rows, evals)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return write_bytes(path, buf.getvalue())
