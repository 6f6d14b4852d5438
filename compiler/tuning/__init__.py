"""The tuner: ``compiler.tune`` and the tuning logs.

Modules, each importing only those listed after it (no cycles):

* :mod:`.run` — :func:`tune` and :class:`TuningRun`, the state and steps of one tuning run;
* :mod:`.rpc` — measuring on the devices under a TVM RPC tracker key (builder and ``RPCRunner``);
* :mod:`.search` — MetaSchedule's search as Kiln runs it: tasks, the ``Searcher`` (builder, runner,
  cost model), Kiln's default schedules as records;
* :mod:`.archive` — ``kiln logs export`` / ``import`` archives;
* :mod:`.database` — the tuning logs on disk: one MetaSchedule JSON database per target, repaired,
  merged, listed;
* :mod:`.measurement` — how candidates are timed (the protocol recorded with the logs);
* :mod:`.progress` — the live display, plain progress lines and the trajectory file;
* :mod:`.scheduler` — the gradient task scheduler;
* :mod:`.report` — :class:`TuningReport` and the duration and latency formats.

The public names below are exposed lazily: ``import compiler.tuning`` imports neither TVM nor torch.
"""

from __future__ import annotations

import importlib

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "tune": "run", "TuningRun": "run", "Budget": "run", "DEFAULT_TRIALS_PER_TASK": "run", "MAX_SHARE": "run",
    "EARLY_STOPPING_TRIALS": "run", "EARLY_STOPPING_MIN_GAIN": "run",
    "TaskReport": "report", "TuningReport": "report", "parse_duration": "report",
    "TaskState": "scheduler", "gain": "scheduler", "next_batch": "scheduler", "ROUND_TRIALS": "scheduler",
    "GRADIENT_ALPHA": "scheduler", "GRADIENT_WINDOW": "scheduler",
    "progress_path": "progress", "read_progress": "progress",
    "EMULATED_SUBDIR": "rpc", "MEASUREMENT": "measurement",
}
_SUBMODULES = ("archive", "database", "measurement", "progress", "report", "rpc", "run", "scheduler", "search")


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


__all__ = sorted(_EXPORTS)
