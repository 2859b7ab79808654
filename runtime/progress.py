"""Machine-readable progress lines: what a node prints on stdout and the launcher parses.

A node's stdout carries only these lines (one JSON object each, prefixed so that stray prints from libraries
can never be mistaken for progress); humans read the launcher's display and the per-node log files (stderr).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

PREFIX = "@fldsl "

# Events a node emits, in the order they usually appear:
#   started   node, role, pipeline
#   phase     name (attest | connect | align | resume | train | export), detail
#   plan      total_steps, steps_per_epoch, epochs, resumed_from
#   step      step, total, train_loss (the batch's), examples_per_s
#   epoch     epoch, metrics {train_loss (the epoch's mean), loss (the holdout's), auc, accuracy, ...};
#             the aggregator of a horizontal/distributed run: metrics over all workers' holdout rows
#   checkpoint step, path
#   export    name, path
#   done      metrics, examples_per_s, bytes_sent {flow: bytes}, bytes_received, exports
#   error     message, code (exit code the node will use), kind (trust | run | input)
_lock = threading.Lock()


# Events also written to the node's log (with timestamps), so a human can see where the time went.
_LOGGED = {"phase", "connected", "aligned", "plan", "epoch", "checkpoint", "export", "done"}


class Progress:
    """Writes progress events to a stream (the node's stdout by default) and, optionally, the milestones
    to a logger."""

    def __init__(self, node: str, stream: TextIO | None = None, log: logging.Logger | None = None) -> None:
        self.node = node
        self._stream = stream
        self._log = log

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "node": self.node, **fields}
        body = json.dumps(rec, sort_keys=True, default=_jsonable)
        stream = self._stream or sys.stdout
        with _lock:
            stream.write(PREFIX + body + "\n")
            stream.flush()
        if self._log is not None and event in _LOGGED:
            detail = {k: v for k, v in fields.items() if k not in ("bytes_sent", "bytes_received", "history")}
            self._log.info("%s %s", event, json.dumps(detail, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    # numpy scalars and arrays sneak into metrics; make them plain JSON.
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def parse_line(line: str) -> dict[str, Any] | None:
    """The event carried by one stdout line, or None for anything else (library noise)."""
    if not line.startswith(PREFIX):
        return None
    try:
        rec = json.loads(line[len(PREFIX):])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "event" in rec else None
