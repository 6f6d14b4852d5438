"""TVM's native log, kept out of the console.

TVM's C++ code writes warnings straight to the process's stderr (file descriptor 2): dozens of
"Scope Saving" lines per export, "Fast mode segfaults when there are out-of-bounds indices" per
gather, none of which a user can act on. :func:`captured` redirects descriptor 2 for the length of
a compile step, then sends TVM's lines to the ``kiln.tvm`` logger at DEBUG (``kiln -v -v`` or any
DEBUG handler shows them) and writes every other captured line (another thread's output, a Python
warning) back to stderr unchanged. With ``kiln.tvm`` enabled for DEBUG nothing is redirected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

log = logging.getLogger("kiln.tvm")

#: A line of TVM's native log: ``[05:27:27] /project/src/runtime/vm/executable.cc:276: Warning: ...``.
_TVM_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")
_lock = threading.Lock()
_depth = 0


@contextlib.contextmanager
def captured():
    """Within the block, TVM's native log goes to the ``kiln.tvm`` logger instead of the console."""
    global _depth
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with _lock:
        _depth += 1
        outer = _depth == 1
        if outer:
            sys.stderr.flush()
            saved = os.dup(2)
            sink = tempfile.TemporaryFile()
            os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if outer:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                _replay(sink.read().decode(errors="replace"))
                sink.close()


def _replay(text: str) -> None:
    other = []
    for line in text.splitlines():
        if _TVM_LINE.match(line):
            log.debug("%s", line)
        elif line.strip():
            other.append(line)
    if other:
        sys.stderr.write("\n".join(other) + "\n")
