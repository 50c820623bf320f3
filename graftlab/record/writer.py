"""The :class:`~graftlab.Recorder`'s background writer: one thread that turns each flushed host
buffer into a trace part file, off the training thread."""
from __future__ import annotations

import queue
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from graftlab import trace

GRAD_COLUMN = "norm_g"
# the columns a trace part holds itself (``ratio`` is computed on read from /2 on): no scalar may take them
RESERVED = (*trace.REQUIRED, GRAD_COLUMN)


def scalar_name_problem(key: str) -> str:
    """Why ``key`` cannot name a logged scalar column ("" when it can): a trace column, or text
    that is not valid UTF-8 (Parquet stores column names as UTF-8)."""
    if key in RESERVED:
        return "it is a trace column"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "a column name must be valid UTF-8 text"
    return ""


class Writer(threading.Thread):
    """Waits for each flushed host buffer, writes it as one part file, then hands the part to the
    ``on_flush`` callbacks (once per flush).

    A job is the tuple :meth:`graftlab.record.buffer.Rows.to_host` builds plus the groups and metadata
    it was recorded under; ``None`` stops the thread. The first error is kept in :attr:`error` (the
    Recorder raises it on the training thread) and later jobs are drained unwritten.
    """

    def __init__(self, directory: Path, on_flush: Sequence[Callable[[Any, dict], None]] = (),
                 after_first: Optional[Callable[[], None]] = None) -> None:
        super().__init__(name="graftlab-trace-writer", daemon=True)
        self.directory = directory
        self.after_first = after_first  # once the first part is durable (the replaced trace may go)
        self.on_flush = list(on_flush)
        self.jobs: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=4)
        self.error: Optional[BaseException] = None
        self.parts: list[Path] = []
        self.fields: Optional[dict] = None  # every part's columns (trace.conform), read at the first write

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.error is not None:  # after an error: keep draining, never block the loop
                self.jobs.task_done()
                if job is None:
                    return
                continue
            try:
                self._write(*job)
            except BaseException as err:  # noqa: BLE001 - reported on the training thread
                self.error = err
            finally:
                self.jobs.task_done()  # sync() waits on these

    def _one_schema(self, table: Any) -> Any:
        """``table`` with every column of the trace; parts written before a new column are widened."""
        if self.fields is None:  # a resumed trace: the columns its parts already have
            self.fields = trace.part_fields(self.directory)
        new = [f for f in table.schema if f.name not in self.fields]
        if new:
            grown = bool(self.fields)
            self.fields.update((f.name, f) for f in new)
            if grown:
                trace.widen_parts(self.directory, self.fields)
        return trace.conform(table, self.fields)

    # each job carries its groups and metadata: a Graft may gain groups between flushes
    def _write(self, steps, host_stats, host_dev, event, keys, dev_keys, host_scalars, names, meta) -> None:
        if event is not None:
            event.synchronize()
        n, g = len(steps), len(names)
        flat = host_stats.numpy().reshape(n, -1)
        stats = flat[:, : 3 * g].reshape(n, 3, g)
        # gradient norms ride after the stats when the recorder takes them
        per_group = {GRAD_COLUMN: flat[:, 3 * g :]} if flat.shape[1] == 4 * g else None
        dev = {k: host_dev[:, j].numpy().astype(np.float64) for j, k in enumerate(dev_keys)}
        scalars = {}
        for key in keys:  # one float64 column per key: a host float wins over a tensor on its row
            host = host_scalars.get(key)
            col = dev.get(key)
            if col is None:
                col = host
            elif host is not None:
                col = np.where(np.isnan(host), col, host)
            scalars[key] = col
        # Recorder.log refuses these names; a bad one that got here anyway costs its column, never the rows
        for key in [k for k in scalars if scalar_name_problem(k)]:
            warnings.warn(f"graftlab: logged scalar {key!r} not written ({scalar_name_problem(key)})", stacklevel=1)
            del scalars[key]
        table = self._one_schema(trace.build_table(steps, names, stats, scalars, meta, per_group))
        self.parts.append(trace.write_part(self.directory, table))
        if self.after_first is not None:
            after, self.after_first = self.after_first, None
            after()
        if self.on_flush:
            table = trace.with_ratio(table)  # callbacks see the trace columns, as read_trace gives them
        for callback in self.on_flush:
            callback(table, meta)
