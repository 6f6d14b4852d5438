"""The task scheduler: which task the next batch of trials goes to (Ansor's / MetaSchedule's gradient
scheduler). Pure functions of :class:`TaskState`: :func:`next_batch` picks, :func:`gain` ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Trials of one batch (one MetaSchedule call on one task: evolutionary search, build, measure).
ROUND_TRIALS = 8
#: Weight of the measured improvement rate against the optimistic term, and how many batches back
#: the improvement rate looks.
GRADIENT_ALPHA, GRADIENT_WINDOW = 0.2, 3


@dataclass
class TaskState:
    """What the task scheduler knows of one task: ``weight`` (calls per inference), ``trials`` in the
    log, ``history`` of its best latency (ms) at the start of this run and after each of its batches
    since, ``cap`` on its trials (its max share of the budget), ``warm`` once it has had its first batch
    (in this run, or a full one in an earlier run)."""

    weight: float
    trials: int
    history: list[float]
    cap: float = math.inf
    warm: bool = False

    @property
    def best(self) -> float:
        return self.history[-1]


def gain(state: TaskState, alpha: float = GRADIENT_ALPHA, window: int = GRADIENT_WINDOW) -> float:
    """Estimated end-to-end gain (ms per batch) of one more batch on a task, as in Ansor's gradient
    task scheduler: ``weight x (alpha x backward + (1 - alpha) x forward)`` where ``backward`` is the
    improvement of the task's best per batch over its last ``window`` batches (measured) and
    ``forward = best / batches`` is the optimistic term (large for tasks with few trials, shrinking
    as a task accumulates them)."""
    hist = state.history
    k = min(window, len(hist) - 1)
    backward = (hist[-1 - k] - hist[-1]) / k if k > 0 else 0.0
    forward = hist[-1] / max(state.trials / ROUND_TRIALS, 1.0)
    return state.weight * (alpha * max(backward, 0.0) + (1.0 - alpha) * forward)


def next_batch(states, remaining: float) -> tuple[int, int] | None:
    """The scheduler's choice: ``(task index, trials)`` for the next batch, or None when no task may
    take more (every task at its cap, or no trials ``remaining``).

    Warm-up first: every task that has not had a batch yet gets one, the heaviest (weight x latency)
    first, topped up to :data:`ROUND_TRIALS` trials (an even split of what remains when that is
    less). Then the task of largest :func:`gain`. Ties go to the lower index: deterministic."""
    open_ = [i for i, s in enumerate(states) if s.trials < s.cap]
    if not open_ or remaining < 1:
        return None
    cold = [i for i in open_ if not states[i].warm]
    if cold:
        i = max(cold, key=lambda i: (states[i].weight * states[i].best, -i))
        n = min(max(ROUND_TRIALS - states[i].trials, 1), max(remaining // len(cold), 1))
    else:
        i = max(open_, key=lambda i: (gain(states[i]), -i))
        n = ROUND_TRIALS
    return i, int(min(n, remaining, states[i].cap - states[i].trials))
