"""Progress of a tuning run: a live ``rich`` display on a terminal, plain log lines elsewhere, and
the run's trajectory in a JSON-lines file.

``compiler.tuning.run`` builds a :class:`Snapshot` after every batch and hands it to the display that
:func:`open_display` picked:

* :class:`LiveDisplay` when stdout is a terminal (and ``rich`` is installed): trials done / total,
  elapsed and remaining time, estimated end-to-end latency and speedup over the default schedules
  (the untuned build), early-stopping patience, and the tasks weighing most on the latency with their
  best and default figures. Redrawn in place twice a second.
* :class:`PlainDisplay` otherwise (CI, tests, ``nohup``, pipes): one INFO line per batch on the
  ``compiler.tuning`` logger, plain text (no escape codes), shown by ``kiln tune``.

Each batch is also appended to the model's trajectory file (:func:`progress_path`,
:func:`append_progress`, :func:`read_progress`): trials and estimated latency over time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .report import fmt_hms as hms
from .report import fmt_ms as ms

log = logging.getLogger("compiler.tuning")

#: Tasks listed by the live display (the heaviest: weight x best latency).
TOP_TASKS = 8


@dataclass(frozen=True)
class TaskRow:
    name: str
    weight: float
    trials: int
    best_ms: float | None
    default_ms: float | None

    @property
    def share_ms(self) -> float:
        v = self.best_ms if self.best_ms is not None else self.default_ms
        return self.weight * v if v is not None else 0.0


@dataclass(frozen=True)
class Snapshot:
    """The state of a run after a batch. ``trials``: this model's trials in the log; ``trials_total``:
    the ``trials`` budget (None: none); ``remaining_s``: time budget left, or the trials left at the
    measured rate, whichever is less (None: unknown); ``estimated_ms`` / ``default_ms``: estimated
    end-to-end kernel time with the best records / with Kiln's default schedules; ``since_gain``:
    trials since a batch last gained (None before the warm-up ends or without early stopping)."""

    model: str
    target: str
    trials: int
    trials_total: int | None
    new_trials: int
    elapsed_s: float
    remaining_s: float | None
    estimated_ms: float | None
    default_ms: float | None
    batches: int
    last_task: str | None
    last_trials: int
    since_gain: int | None
    patience: int | None
    tasks: tuple[TaskRow, ...]

    @property
    def speedup(self) -> float | None:
        if self.estimated_ms and self.default_ms:
            return self.default_ms / self.estimated_ms
        return None

    def top(self, n: int = TOP_TASKS) -> list[TaskRow]:
        return sorted(self.tasks, key=lambda r: -r.share_ms)[:n]


def summary_line(snap: Snapshot) -> str:
    """One plain-text line: what :class:`PlainDisplay` logs."""
    total = f"/{snap.trials_total}" if snap.trials_total is not None else ""
    parts = [f"batch {snap.batches}: {snap.trials}{total} trials ({snap.new_trials} new)",
             f"{hms(snap.elapsed_s)} elapsed"]
    if snap.remaining_s is not None:
        parts.append(f"~{hms(snap.remaining_s)} left")
    if snap.estimated_ms is not None:
        speed = f" ({snap.speedup:.2f}x the untuned {snap.default_ms:.4g} ms)" if snap.speedup else ""
        parts.append(f"est. {snap.estimated_ms:.4g} ms{speed}")
    if snap.since_gain is not None and snap.patience:
        parts.append(f"{snap.since_gain}/{snap.patience} trials without gain")
    top = ", ".join(f"{r.name} {ms(r.best_ms)}" for r in snap.top(3))
    last = f" | last: {snap.last_task} x{snap.last_trials}" if snap.last_task else ""
    return ", ".join(parts) + f" | top: {top}{last}"


class PlainDisplay:
    """One INFO log line per batch (no escape codes)."""

    def update(self, snap: Snapshot) -> None:
        log.info("%s", summary_line(snap))

    def close(self) -> None:
        pass


class LiveDisplay:
    """A ``rich.live.Live`` panel redrawn in place; the last state stays on screen when closed."""

    def __init__(self, stream=None):
        from rich.console import Console
        from rich.live import Live

        self._snap: Snapshot | None = None
        self._t_snap = time.perf_counter()
        self._console = Console(file=stream or sys.stdout)
        self._live = Live(console=self._console, get_renderable=self._render, refresh_per_second=2,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def update(self, snap: Snapshot) -> None:
        self._snap, self._t_snap = snap, time.perf_counter()
        self._live.refresh()

    def _render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        snap = self._snap
        if snap is None:
            return Text("tuning: measuring the default schedules and starting the workers ...")
        ago = time.perf_counter() - self._t_snap  # the clock keeps running between batches
        left = None if snap.remaining_s is None else max(snap.remaining_s - ago, 0.0)
        total = snap.trials_total
        head = Text.assemble((f"tuning {snap.model} for {snap.target}", "bold"),
                             f"   trials {snap.trials}" + (f" / {total}" if total else "") + f" ({snap.new_trials} new)",
                             f"   elapsed {hms(snap.elapsed_s + ago)}", f"   left ~{hms(left)}")
        lines = [head]
        if total:
            lines.append(ProgressBar(total=total, completed=min(snap.trials, total), width=60))
        elif snap.remaining_s is not None:
            spent = snap.elapsed_s + ago
            lines.append(ProgressBar(total=spent + (left or 0.0), completed=spent, width=60))
        if snap.estimated_ms is not None:
            speed = f" = {snap.speedup:.2f}x" if snap.speedup else ""
            untuned = f"   untuned (default schedules) {snap.default_ms:.4g} ms{speed}" if snap.default_ms else ""
            lines.append(Text.assemble("estimated end-to-end ", (f"{snap.estimated_ms:.4g} ms", "bold green"), untuned))
        if snap.since_gain is not None and snap.patience:
            lines.append(Text(f"early stopping: {snap.since_gain} / {snap.patience} trials without gain"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (("task", "left"), ("weight", "right"), ("trials", "right"), ("best ms", "right"),
                          ("default ms", "right"), ("share ms", "right")):
            table.add_column(col, justify=just)
        for r in snap.top():
            mark = " *" if r.name == snap.last_task else ""
            table.add_row(r.name + mark, f"{r.weight:g}", str(r.trials), ms(r.best_ms), ms(r.default_ms),
                          ms(r.share_ms))
        lines.append(table)
        return Group(*lines)

    def close(self) -> None:
        self._live.stop()


def open_display(live: bool | None = None, stream=None):
    """The display for a run: ``live=None`` picks :class:`LiveDisplay` when ``stream`` (stdout) is a
    terminal, ``rich`` is installed and ``TERM`` is not ``dumb``; :class:`PlainDisplay` otherwise."""
    stream = stream or sys.stdout
    if live is None:
        live = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"
    if live:
        try:
            return LiveDisplay(stream)
        except ImportError:  # rich missing: plain lines still say everything
            pass
    return PlainDisplay()


# -- the trajectory file ---------------------------------------------------------------------------
def progress_path(work: Path, model: str) -> Path:
    """Where ``tune`` appends the trajectory of ``model``'s runs: ``<work>/progress/<model>.jsonl``."""
    return Path(work) / "progress" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") + ".jsonl")


def append_progress(path: Path, entry: dict) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor (concurrent
    appends never interleave; a kill mid-write tears at most this line, which readers skip)."""
    data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_progress(path) -> list[dict]:
    """The entries of a progress file (lines that do not parse, such as a torn last line, skipped; a
    missing file has none)."""
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
