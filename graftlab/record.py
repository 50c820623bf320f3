"""The :class:`Recorder`: a training loop's hook that streams a Graft's per-group ratios to a trace.

The training loop changes only by creating and closing the recorder (see :class:`Recorder`); the
file format is :mod:`graftlab.trace`. Whole runs of the built-in tasks that record are in
:mod:`graftlab.runs`.
"""
from __future__ import annotations

import atexit
import math
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from graftlab import termination, trace
from graftlab.distributed.checkpoints import before_checkpoint
from graftlab.errors import GraftlabError
from graftlab.graft import Graft
from graftlab.kinds import GroupKind, Overrides, _as_kind, _owners, classify_names, group_kind, to_dict
from graftlab.optimizers import describe
from graftlab.trace_target import open_trace

DEFAULT_FLUSH_EVERY = 100

_OPEN: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


@atexit.register
def _close_open_recorders() -> None:
    # An interpreter that exits without close() still gets its buffered rows written.
    for rec in list(_OPEN):
        try:
            rec.close()
        except Exception:  # noqa: BLE001 - nothing sensible to do at exit
            pass


def _versions() -> dict[str, str]:
    import graftlab

    return {"graftlab": graftlab.__version__, "torch": torch.__version__}


class _Writer(threading.Thread):
    """Background thread: waits for each flushed host buffer and writes it as one part file."""

    def __init__(self, directory: Path, group_names: list[str], meta: dict[str, Any]) -> None:
        super().__init__(name="graftlab-trace-writer", daemon=True)
        self.directory = directory
        self.group_names = group_names
        self.meta = meta
        self.jobs: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=4)
        self.error: Optional[BaseException] = None
        self.parts: list[Path] = []

    def run(self) -> None:
        g = len(self.group_names)
        while True:
            job = self.jobs.get()
            if job is None or self.error is not None:  # after an error: keep draining, never block the loop
                self.jobs.task_done()
                if job is None:
                    return
                continue
            steps, host, event, dev_keys, host_scalars = job
            try:
                if event is not None:
                    event.synchronize()
                arr = host.numpy()
                n = len(steps)
                stats = arr[:, : 3 * g].reshape(n, 3, g)
                scalars = {k: arr[:, 3 * g + j] for j, k in enumerate(dev_keys)}
                scalars.update(host_scalars)
                table = trace.build_table(steps, self.group_names, stats, scalars, self.meta)
                self.parts.append(trace.write_part(self.directory, table))
            except BaseException as err:  # noqa: BLE001 - reported on the training thread
                self.error = err
            finally:
                self.jobs.task_done()  # sync() waits on these


class Recorder:
    """Record ``graft``'s per-group step norms and their ratio, every ``every``-th step, to a trace.

    The ratio is the one grafting transfers (paper, Section 3, Algorithm 1), per group of the
    partition (Section 3.1: a tensor for ``granularity="layer"``, the model for ``"global"``):
    ``ratio = ||w_M - w_t|| / ||w_D - w_t||``. Recorded over a grafted run (Section 4), it is what
    Section 5 distills into a learning-rate correction for D alone (:func:`graftlab.distill`).

    ``path`` becomes a trace directory (:mod:`graftlab.trace`) with ``G = len(graft.group_names)``
    rows per recorded step, and the run metadata (optimizers, groups with kinds/shapes/sizes, task,
    seed, versions) in every part and in ``_graftlab.json``. Columns:

    ``step`` int64: the 0-based optimizer step; ``group`` string: ``Graft.group_names``;
    ``norm_m``, ``norm_d`` float32: L2 norms of M's and D's proposed steps on the group, in
    parameter units; ``ratio`` float32: ``norm_m / norm_d``, dimensionless, not finite where D's
    step was zero; ``lr`` float64: M's learning rate (first param group) the step used;
    any scalar given to :meth:`log` (``loss``, ...), repeated on the step's rows.

    Free per step: a step post-hook copies ``graft.last_stats`` (shape ``(3, G)``, on the
    parameters' device) into a preallocated ``(flush_every, 3, G)`` device buffer, with no host
    sync. When ``flush_every`` recorded steps are buffered, the next step's pre-hook hands them in
    one batched copy (pinned, ``non_blocking`` on CUDA) to a background thread that writes one
    Parquet part, renamed into place when complete, while that step computes; its post-hook waits
    for the part (once per ``flush_every`` steps, usually done by then). So a process killed at any
    moment (SIGKILL) leaves a readable trace lacking at most the last ``flush_every`` recorded
    steps. SIGTERM is handled like Ctrl-C while a Recorder is open (:mod:`graftlab.termination`):
    the process exits with status 143 after the buffered rows are written.

    Only one process writes a trace: the Recorder holds an exclusive lock on ``path`` (a hidden
    ``.graftlab.lock``) until :meth:`close`, and a second writer gets a GraftlabError. A
    :func:`graftlab.distributed.save_checkpoint` of ``graft`` first waits until every step recorded
    so far is on disk (:meth:`sync`), so resuming from a checkpoint never leaves a gap; call
    :meth:`sync` yourself before saving a checkpoint of your own.

    Args:
        graft: the :class:`~graftlab.Graft` optimizer to watch (through a step post-hook).
        path: trace directory to create.
        every: record steps whose number is a multiple of ``every`` (>= 1).
        flush_every: recorded steps per part file (>= 1); at most this many are lost if the process dies.
        metadata: extra run metadata (task, batch_size, seed, config, ...), merged over the defaults.
        model: the model, so group kinds also use module types (LayerNorm, Conv, Embedding).
        kinds: overrides for the kind rules: a dict ``param or group name -> kind`` or a callable
            ``param name -> kind | None`` (see :func:`graftlab.kinds.classify_names`).
        overwrite: replace an existing trace at ``path``: its parts and sidecar are deleted, other
            files beside them are kept; never a directory that holds no trace, never a file.
        start_step: number of the next step (default ``graft.steps``, so a resumed Graft continues).
        resume: append to an existing trace at ``path``, dropping its rows from ``start_step`` on.
            Refused when that drops every recorded step (a fresh Graft: load its state first; with
            ``overwrite`` the trace starts over instead), leaves a gap after the trace's last step,
            or the trace holds another run (groups, seed, task, batch size, every, optimizers).
        record_lr: add column ``lr``, read just before each step (after it a scheduler has moved on).

    Raises:
        GraftlabError: ``graft`` is not a Graft; ``every``/``flush_every`` < 1 or ``start_step`` < 0;
            ``metadata`` sets ``format``, ``groups`` or ``granularity``; ``path`` exists without
            ``overwrite``/``resume``, is a file, lies inside another trace, holds something other
            than a trace, or is being written by another process; a resume that
            :mod:`graftlab.trace_target` refuses; :meth:`log` gets a trace column or a non-scalar
            tensor; writing failed (raised at the next flush, :meth:`sync` or :meth:`close`).

    Example::

        opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
        with graftlab.Recorder(opt, "runs/trace", model=model, metadata={"task": "mine"}) as rec:
            for batch in loader:
                loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()
                rec.log(loss=loss.detach())            # optional per-step scalars, stay on the device
        df = graftlab.read_trace("runs/trace")        # or pandas.read_parquet("runs/trace")
    """

    def __init__(
        self,
        graft: Graft,
        path: Union[str, Path],
        *,
        every: int = 1,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        metadata: Optional[Mapping[str, Any]] = None,
        model: Optional[nn.Module] = None,
        kinds: Overrides = None,
        overwrite: bool = False,
        start_step: Optional[int] = None,
        resume: bool = False,
        record_lr: bool = True,
    ) -> None:
        if not isinstance(graft, Graft):
            raise GraftlabError(f"Recorder needs a graftlab.Graft optimizer, got {type(graft).__name__}")
        if int(every) < 1 or int(flush_every) < 1:
            raise GraftlabError(f"every and flush_every must be >= 1, got {every} and {flush_every}")
        self.graft = graft
        self.path = Path(path)
        self.every = int(every)
        self.flush_every = int(flush_every)
        self._next_step = graft.steps if start_step is None else int(start_step)
        if self._next_step < 0:
            raise GraftlabError(f"start_step must be >= 0, got {start_step}")
        self.group_kinds = self._group_kinds(model, kinds)
        self.metadata = self._metadata(metadata or {})

        # checks, then the lock, then the old trace replaced or truncated; a resumed trace keeps its
        # metadata (every part of one trace carries the same)
        self._lock, self.metadata = open_trace(self.path, self.metadata, graft.group_names, start_step=self._next_step,
                                               every=self.every, overwrite=overwrite, resume=resume)
        self._writer = _Writer(self.path, list(graft.group_names), self.metadata)
        self._writer.start()
        self._stats: Optional[Tensor] = None  # (flush_every, 3, G) device ring buffer
        self._step_of_row = np.zeros(self.flush_every, dtype=np.int64)
        self._rows = 0
        self._last_row: Optional[int] = None
        self._dev_cols: dict[str, Tensor] = {}
        self._host_cols: dict[str, np.ndarray] = {}
        self.rows_flushed = 0  # recorded steps handed to the writer
        self._closed = False
        self._lr: Any = None
        self._record_lr = bool(record_lr)
        self._waiting = False  # a flushed part the next post-hook waits for
        self._hooks = [graft.register_step_post_hook(self._on_step), graft.register_step_pre_hook(self._before_step),
                       before_checkpoint(graft, self.sync)]
        _OPEN.add(self)
        termination.watch()

    # -- metadata ---------------------------------------------------------------------------
    def _group_kinds(self, model: Optional[nn.Module], kinds: Overrides) -> list[GroupKind]:
        part = self.graft.partition
        modules: dict[str, nn.Module] = {}
        if isinstance(model, nn.Module):
            modules = _owners(model)
        per_param = classify_names(part.param_names, kinds, modules)
        out = []
        for gi, name in enumerate(part.group_names):
            members = [per_param[n] for n, k in zip(part.param_names, part.tensor_group) if k == gi]
            kind = group_kind(members)
            if isinstance(kinds, Mapping) and name in kinds and name not in per_param:
                kind = _as_kind(kinds[name], kind)  # a custom or global group named in the overrides
            out.append(kind)
        return out

    def _metadata(self, user: Mapping[str, Any]) -> dict[str, Any]:
        g = self.graft
        part = g.partition
        params = g.params
        groups = []
        for gi, (name, kind) in enumerate(zip(part.group_names, self.group_kinds)):
            idx = [i for i, k in enumerate(part.tensor_group) if k == gi]
            numel = int(sum(params[i].numel() for i in idx))
            shape = list(params[idx[0]].shape) if len(idx) == 1 else None
            groups.append(
                {"name": name, **to_dict(kind), "shape": shape, "numel": numel,
                 "members": [part.param_names[i] for i in idx]}
            )
        meta: dict[str, Any] = {
            "format": trace.FORMAT,
            "granularity": part.granularity,
            "groups": groups,
            "magnitude": describe(g.magnitude),
            "direction": describe(g.direction),
            "task": None,
            "batch_size": None,
            "seed": None,
            "device": str(params[0].device),
            "every": self.every,
            "flush_every": self.flush_every,
            "start_step": self._next_step,
            "versions": _versions(),
            "config": None,
        }
        reserved = {"format", "groups", "granularity"}
        clash = sorted(reserved & set(user))
        if clash:
            raise GraftlabError(f"metadata keys {', '.join(clash)} are set by the recorder")
        meta.update(user)
        return meta

    # -- recording (hot path: no host sync) ------------------------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._record_lr:
            self._lr = self.graft.magnitude.param_groups[0].get("lr")
        if self._rows == self.flush_every:
            # a full buffer goes now: log() has filled the last row, and the part is written while
            # this step computes; its post-hook waits for it
            self.flush()
            self._waiting = True

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self._next_step
        self._next_step += 1
        if self._waiting:
            self._wait()  # at most flush_every recorded steps are ever not on disk
        if self._rows == self.flush_every:
            self.flush()  # a step taken without the pre-hook (hooks bypassed)
            self._wait()
        if step % self.every:
            self._last_row = None
            return
        stats = self.graft.last_stats
        if self._stats is None:
            self._stats = torch.empty((self.flush_every, *stats.shape), dtype=stats.dtype, device=stats.device)
        r = self._rows
        self._stats[r].copy_(stats)
        self._step_of_row[r] = step
        self._rows = r + 1
        self._last_row = r
        if self._lr is not None:
            self.log(lr=self._lr)

    def log(self, **scalars: Union[Tensor, float, int]) -> None:
        """Attach per-step scalars (``loss=tensor``, ``lr=float``) to the step just taken.

        Call it after ``optimizer.step()``; on steps that are not recorded it does nothing. Tensors
        stay on their device until the next flush. Log the same keys from the first step on:
        ``pandas.read_parquet`` takes its columns from the first part file.
        """
        r = self._last_row
        if r is None or self._closed:
            return
        for key, value in scalars.items():
            if key in trace.REQUIRED:
                raise GraftlabError(f"cannot log {key!r}: it is a trace column")
            if isinstance(value, Tensor):
                col = self._dev_cols.get(key)
                if col is None:
                    col = self._new_device_col(key, value)
                col[r].copy_(value.detach().reshape(()))
            else:
                col = self._dev_cols.get(key)
                if col is not None:
                    col[r].fill_(float(value))
                    continue
                host = self._host_cols.get(key)
                if host is None:
                    host = self._host_cols[key] = np.full(self.flush_every, np.nan)
                host[r] = float(value)

    def _new_device_col(self, key: str, value: Tensor) -> Tensor:
        if value.numel() != 1:
            raise GraftlabError(f"logged {key!r} must be a scalar, got shape {tuple(value.shape)}")
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        col = torch.full((self.flush_every,), math.nan, dtype=dtype, device=value.device)
        old = self._host_cols.pop(key, None)
        if old is not None:  # a key that was a float before: keep the earlier rows
            col.copy_(torch.from_numpy(old).to(dtype))
        self._dev_cols[key] = col
        return col

    # -- flushing -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand the buffered rows to the writer: one device-to-host copy, written in the background."""
        with termination.deferred():
            self._flush()

    def _wait(self) -> None:
        with termination.deferred():
            self._writer.jobs.join()
        self._waiting = False
        self._raise_writer_error()

    def sync(self) -> None:
        """Flush and wait until every row recorded so far is in a part file on disk.

        A checkpoint of the Graft through :mod:`graftlab.distributed` calls it before the checkpoint
        is committed; call it before saving a checkpoint of your own (one host sync).
        """
        if self._closed:
            return
        self.flush()
        self._wait()

    def _flush(self) -> None:
        self._raise_writer_error()
        n = self._rows
        if n == 0 or self._stats is None:
            return
        stats = self._stats[:n].reshape(n, -1)
        dev_keys = list(self._dev_cols)
        if dev_keys:
            cols = [c[:n].to(device=stats.device, dtype=stats.dtype).unsqueeze(1) for c in self._dev_cols.values()]
            staging = torch.cat([stats, *cols], dim=1)
        else:
            staging = stats
        event = None
        if staging.device.type == "cuda":
            host = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=True)
            host.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = staging.to("cpu", copy=True)
        host_scalars = {k: v[:n].copy() for k, v in self._host_cols.items()}
        self._writer.jobs.put((self._step_of_row[:n].copy(), host, event, dev_keys, host_scalars))
        self.rows_flushed += n
        self._rows = 0
        self._last_row = None
        for col in self._dev_cols.values():
            col.fill_(math.nan)  # queued after the copy on the same stream
        for col in self._host_cols.values():
            col.fill(np.nan)

    def _raise_writer_error(self) -> None:
        err = self._writer.error
        if err is not None:
            raise GraftlabError(f"{self.path}: writing the trace failed ({err})") from err

    def close(self) -> None:
        """Flush, wait for the writer, release the trace, and detach from the optimizer. Safe to
        call twice."""
        if self._closed:
            return
        with termination.deferred():
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            _OPEN.discard(self)
            try:
                if self._writer.error is None:
                    self._flush()
            finally:
                self._writer.jobs.put(None)
                self._writer.join()
                self._lock.release()
                termination.unwatch()
        self._raise_writer_error()

    @property
    def next_step(self) -> int:
        """Number the next optimizer step will be recorded under."""
        return self._next_step

    @property
    def parts(self) -> list[Path]:
        """Part files written so far."""
        return list(self._writer.parts)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Recorder({str(self.path)!r}, groups={len(self.graft.group_names)}, every={self.every}, "
                f"flush_every={self.flush_every}, next_step={self._next_step})")
