"""What a tuning run reports: :class:`TuningReport` with one :class:`TaskReport` per task, and how
durations and latencies read (:func:`fmt_hms`, :func:`fmt_ms`, :func:`parse_duration`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TuningError


def fmt_ms(v: float | None) -> str:
    """A latency in ms for tables: ``"-"`` for None, 4 decimals, or scientific below 1 us."""
    return "-" if v is None else f"{v:.4f}" if v >= 0.001 else f"{v:.2e}"


def fmt_hms(seconds: float | None) -> str:
    """A duration as ``"12m05s"`` or ``"1h02m05s"`` (``"-"`` for None)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass(frozen=True)
class TaskReport:
    """One tuning task (a fused kernel; kernels with identical TIR share one task).

    ``name``: the task (kernel) name; ``kernels``: the fused kernels it covers; ``weight``: how many
    times one inference calls it; ``trials``: measured trials in the log for it (every run so far);
    ``new_trials``: of those, measured by this run; ``best_ms``: its best record's measured
    latency, the default schedule's record included (None when nothing was measured);
    ``default_ms``: its latency with Kiln's default schedule, measured by the runner that measures
    candidates when the task was first tuned (None when that could not be built or timed);
    ``best_is_default``: the best record is the default schedule (no trial beat it yet).
    """

    name: str
    kernels: tuple[str, ...]
    weight: float
    trials: int
    new_trials: int
    best_ms: float | None
    default_ms: float | None
    best_is_default: bool = False


@dataclass(frozen=True)
class TuningReport:
    """What a tuning run did.

    ``target``/``fingerprint``: the target and the key of its logs; ``log_dir``: the folder holding
    this target's database (``<log_dir>/<fingerprint>``); ``tasks``: one :class:`TaskReport` each;
    ``total_trials``: trials in the log for this model's tasks; ``new_trials``: measured by this
    run; ``elapsed_s``: wall time of the run; ``rounds``: batches run (one task's trials each);
    ``stopped_by``: ``"trials"`` (the model's tasks hold ``trials`` trials, or every task its max
    share), ``"time"`` (the next batch would not fit in ``time_budget``) or ``"early-stopping"`` (no
    batch gained for ``early_stopping`` trials after the warm-up); ``estimated_ms``: estimated
    end-to-end kernel time, the sum over tasks of weight x best record's latency (the schedule compile
    applies; tasks without a record count at their default latency; None if neither is known for some
    task); ``default_estimated_ms``: the
    same sum with default latencies, measured the same way. ``cost_model``: ``"warm"`` when the
    search started from the cost model saved with the logs, ``"cold"`` when it started from scratch,
    ``None`` when no search ran. ``progress_file``: the JSON-lines trajectory of this model's runs
    (one entry per batch: trials, estimated end-to-end ms; see :func:`progress_path`).
    """

    model: str
    target: str
    fingerprint: str
    log_dir: Path
    tasks: tuple[TaskReport, ...]
    total_trials: int
    new_trials: int
    elapsed_s: float
    rounds: int
    stopped_by: str
    estimated_ms: float | None
    default_estimated_ms: float | None
    repairs: tuple[str, ...] = field(default=())
    cost_model: str | None = None
    progress_file: Path | None = None

    def __str__(self) -> str:
        lines = [f"tuned {self.model} for {self.target} ({self.fingerprint}): {self.new_trials} new trials, "
                 f"{self.total_trials} in the log, {fmt_hms(self.elapsed_s)}, stopped by {self.stopped_by}",
                 f"  logs: {self.log_dir}"]
        if self.estimated_ms is not None:
            default = (f" (default schedules {self.default_estimated_ms:.4g} ms, "
                       f"{self.default_estimated_ms / self.estimated_ms:.2f}x faster)"
                       if self.default_estimated_ms else "")
            lines.append(f"  estimated end-to-end kernel time: {self.estimated_ms:.4g} ms{default}")
        width = max((len(t.name) for t in self.tasks), default=4)
        lines.append(f"  {'task':<{width}}  weight  trials   best ms   default ms")
        for t in self.tasks:
            note = "  (default schedule)" if t.best_is_default else ""
            lines.append(f"  {t.name:<{width}}  {t.weight:>6g}  {t.trials:>6}  {fmt_ms(t.best_ms):>8}  "
                         f"{fmt_ms(t.default_ms):>11}{note}")
        return "\n".join(lines)


def parse_duration(text) -> float:
    """``"8h"``, ``"30m"``, ``"90s"``, ``"1h30m"`` or a number of seconds -> seconds.

    Raises :class:`TuningError` for text it cannot read and for a duration that is not positive."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or parts is None or not any(parts.groups()):
            raise TuningError(f"cannot read the time budget {text!r}: use e.g. 8h, 30m, 90s or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if seconds <= 0:
        raise TuningError(f"the time budget must be positive, got {text!r}")
    return seconds
