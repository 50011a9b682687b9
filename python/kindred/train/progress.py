"""What a run prints while it trains: on a terminal a rich progress bar; otherwise (a log file, a CI job, a
notebook's captured stdout) one plain line per logged step, so a long run is never silent. The interval is
the metrics' (``output.log_every``). A resumed run says so first; a held-out evaluation prints its loss
and sample reply on a line of its own."""

from __future__ import annotations

import sys


def step_line(step: int, total: int, row: dict) -> str:
    """``step 12/100  loss 1.2345  lr 2.00e-04  1,234 tok/s  elapsed 56.7 s`` (+ GPU memory)."""
    line = (
        f"step {step}/{total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
        f"  elapsed {row['elapsed_s']:.1f} s"
    )
    if row.get("gpu_mem_gib") is not None:
        line += f"  {row['gpu_mem_gib']:.1f} GiB"
    return line


class Progress:
    """A progress bar (``stream`` is a terminal) or plain lines (it is not), or nothing when disabled."""

    def __init__(self, total: int, start: int, enabled: bool, stream=None):
        self.bar = None
        self.total = total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        if not enabled:
            return
        if start:
            print(f"kindred train: resumed from step {start} of {total}", file=self.stream, flush=True)
        if not self.stream.isatty():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, row: dict | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if row is not None:
                print(f"kindred train: {step_line(step, self.total, row)}", file=self.stream, flush=True)
            return
        info = ""
        if row is not None:
            info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
            if row.get("gpu_mem_gib") is not None:
                info += f"  {row['gpu_mem_gib']:.1f} GiB"
        self.bar.update(self.task, completed=step, **({"info": info} if info else {}))

    def note(self, text: str) -> None:
        """One line of news (a held-out evaluation, a notice): above the bar, or a plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(f"kindred train: {text}", markup=False, highlight=False)
        else:
            print(f"kindred train: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
