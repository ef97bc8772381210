"""What a person sees while a run trains: the progress bar, Ctrl-C handling, the loss-curve picture.

- ``Progress``: a rich bar on a terminal (phase, step/total, it/s, ETA, a smoothed loss), a plain line every
  ``every`` seconds otherwise (logs, CI), both with the same figures.
- ``Interrupts``: Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` as usual, except inside ``critical()`` blocks (the
  optimizer update, a phase's setup), where it waits for the block's end: the loop's state is then always that
  of a finished step, so the checkpoint it writes on Ctrl-C continues bit-identically.
- ``write_loss_curves``: ``RUN/loss.png``, every logged loss term per phase from ``metrics.jsonl``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is the checkpoint the run continues from with ``--resume`` (None
    if no step had finished), ``step`` its step, ``run`` the run folder."""

    def __init__(self, run: Path, step: int, total: int, checkpoint: Path | None):
        self.run, self.step, self.total, self.checkpoint = Path(run), step, total, checkpoint
        where = (f"checkpoint {checkpoint} (step {step}/{total}); continue it with --resume" if checkpoint
                 else "no step had finished, nothing to resume")
        super().__init__(f"interrupted: {where}")


class Smoothed:
    """Exponential moving average with bias correction (what TensorBoard's smoothing shows)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.n = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.n += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - self.beta ** self.n) if self.n else float("nan")


class Progress:
    """Phase, step/total, it/s, ETA and the smoothed loss: a rich bar on a terminal, else a line every ``every`` s."""

    def __init__(self, total: int, done: int, enabled: bool, every: float = 10.0, stream=None):
        self.total, self.done0, self.enabled, self.every = total, done, enabled, every
        self.stream = stream or sys.stderr
        self.loss = Smoothed()
        self.start = self.last_print = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
                           console=Console(file=self.stream), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("starting", total=total, completed=done, rate="- it/s", loss="-")

    def say(self, text: str) -> None:
        """A line above the bar (or on its own without one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.start
        return (step - self.done0) / elapsed if elapsed > 0 and step > self.done0 else 0.0

    def update(self, step: int, phase: str, loss: float | None) -> None:
        if loss is not None and loss == loss:  # not NaN
            self.loss.update(float(loss))
        if not self.enabled:
            return
        rate = self.rate(step)
        smooth = self.loss.get()
        loss_text = f"{smooth:.4f}" if smooth == smooth else "-"
        rate_text = f"{rate:.2f} it/s" if rate >= 1 else (f"{1 / rate:.1f} s/it" if rate > 0 else "- it/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=phase, rate=rate_text, loss=loss_text)
        elif time.perf_counter() - self.last_print > self.every or step == self.total or step == self.done0 + 1:
            self.last_print = time.perf_counter()
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "-"
            print(f"[{step}/{self.total}] {phase}  {rate_text}  ETA {eta_text}  loss {loss_text} (smoothed)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Interrupts:
    """SIGINT raises ``KeyboardInterrupt`` at once outside ``critical()`` blocks, at the block's end inside one.

    Installed only in the main thread (signal handlers cannot be set elsewhere; a UI's worker thread keeps the
    default behaviour), and the previous handler is restored on exit."""

    def __init__(self):
        self.depth, self.pending, self.previous = 0, False, None

    def install(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


def write_loss_curves(metrics: list[dict], path: Path) -> Path | None:
    """``path`` (PNG): the loss terms of ``metrics`` (one record per step) against the step, raw and smoothed,
    one panel per phase. None (nothing written) without records or without matplotlib."""
    if not metrics:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    from ..io import atomic_write

    phases: dict[str, list[dict]] = {}
    for r in metrics:
        phases.setdefault(str(r.get("phase", "")), []).append(r)
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.4), squeeze=False)
    for ax, (phase, rows) in zip(axes[0], phases.items()):
        keys = list(dict.fromkeys(k for r in rows for k in r if k == "loss" or k.startswith("loss_")))
        for k in keys:
            xs = [r["step"] for r in rows if isinstance(r.get(k), (int, float))]
            ys = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            s = Smoothed()
            line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, [s.update(y) for y in ys], color=line.get_color(), label=k, linewidth=1.6)
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    fig.suptitle("training loss (faint: per step; bold: smoothed)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path
