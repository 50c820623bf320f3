"""The :class:`Recorder`: a training loop's hook that streams a Graft's per-group ratios to a trace.

The training loop changes only by creating and closing the recorder::

    opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
    with graftlab.Recorder(opt, "runs/trace", model=model, metadata={"task": "mine"}) as rec:
        for batch in loader:
            loss = model(batch); loss.backward(); opt.step(); opt.zero_grad(); sched.step()
            rec.log(loss=loss.detach())   # optional per-step scalars; column lr is recorded for you

The ``lr`` column (M's learning rate each step used) is recorded for you; under torch.distributed
the same lines run on every rank and rank 0 writes. The Recorder's parts: :mod:`graftlab.record.buffer`
(the device rows between flushes), :mod:`graftlab.record.writer` (the thread writing part files),
:mod:`graftlab.record.metadata`; whole runs of the built-in tasks that record: :mod:`graftlab.runs`.
"""
from __future__ import annotations

import atexit
import functools
import math
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from graftlab import trace

from graftlab.io import termination
from graftlab.distributed.checkpoints import before_checkpoint
from graftlab.errors import ClosedError, GraftlabError
from graftlab.record.arguments import MAX_FLUSH_EVERY, check_arguments  # noqa: F401 - MAX_FLUSH_EVERY: its name here too
from graftlab.graft.optimizer import Graft
from graftlab.record.grad_norms import GradNorms, precision_of
from graftlab.kinds import Overrides
from graftlab.record.buffer import Rows, check_fits
from graftlab.record.metadata import group_kinds, groups_meta, run_metadata
from graftlab.record.steps import StepLog, scalar
from graftlab.record.writer import GRAD_COLUMN, Writer, scalar_name_problem  # noqa: F401 - GRAD_COLUMN: its name here before
from graftlab.record.target import first_part_written, open_trace, release_trace

DEFAULT_FLUSH_EVERY = 100
DEFAULT_FLUSH_SECONDS = 30.0
DEFAULT_GRAD_EVERY = 10

_OPEN: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


@atexit.register
def _close_open_recorders() -> None:
    # An interpreter that exits without close() still gets its buffered rows written.
    for rec in list(_OPEN):
        try:
            rec.close()
        except Exception:  # noqa: BLE001 - nothing sensible to do at exit
            pass


class Recorder:
    """Record ``graft``'s per-group step norms and their ratio, every ``every``-th step, to a trace.

    The ratio is the one grafting transfers (paper, Section 3, Algorithm 1), per group of the
    partition (Section 3.1: a tensor for ``granularity="layer"``, the model for ``"global"``):
    ``ratio = ||w_M - w_t|| / ||w_D - w_t||``. Recorded over a grafted run (Section 4), it is what
    Section 5 distills into a learning-rate correction for D alone (:func:`graftlab.distill.pipeline`).

    ``path`` becomes a trace directory (:mod:`graftlab.trace`, format ``graftlab.trace/2``) with
    ``G = len(graft.group_names)`` rows per recorded step; the run metadata (optimizers, groups with
    kinds/shapes/sizes, task, seed, versions) is written once, to the directory's ``_graftlab.json``
    (each part's footer holds only a marker pointing to it). Stored columns:

    ``step`` int64: the 0-based optimizer step; ``group`` string: ``Graft.group_names``;
    ``norm_m``, ``norm_d`` float32: L2 norms of M's and D's proposed steps on the group, in
    parameter units; ``lr`` float64: M's learning rate (first param group) the step used;
    ``norm_g`` float32: the group's gradient norm (see ``grad_every``); any scalar given to
    :meth:`log` (``loss``, ...), repeated on the step's rows. ``ratio`` (float32, ``norm_m /
    norm_d``, dimensionless, not finite where D's step was zero) is not stored:
    :func:`graftlab.read_trace` computes it on read, bit-identical to the Graft's. Reading the
    files with pandas, polars or DuckDB: README, "Versions and contracts".

    Free per step: a step post-hook copies ``graft.last_stats`` (shape ``(3, G)``, on the
    parameters' device) into a preallocated ``(flush_every, 3, G)`` device buffer, with no host
    sync. When ``flush_every`` recorded steps are buffered, the next step's pre-hook hands them in
    one batched copy (pinned, ``non_blocking`` on CUDA) to a background thread that writes one
    Parquet part, renamed into place when complete, while that step computes; its post-hook waits
    for the part (once per flush, usually done by then). So a process killed at any moment
    (SIGKILL) leaves a readable trace lacking at most the last ``flush_every`` recorded steps.
    SIGTERM is handled like Ctrl-C while a Recorder is open (:mod:`graftlab.io.termination`): the
    process exits with status 143 after the buffered rows are written.

    Only one process writes a trace: the Recorder holds an exclusive lock on ``path`` (a hidden
    ``.graftlab.lock``) until :meth:`close`, and a second writer gets a GraftlabError. A
    :func:`graftlab.distributed.save_checkpoint` of ``graft`` first waits until every step recorded
    so far is on disk (:meth:`sync`), so resuming from a checkpoint never leaves a gap; call
    :meth:`sync` yourself before saving a checkpoint of your own.

    Args:
        graft: the :class:`~graftlab.Graft` optimizer to watch (through a step post-hook), or a
            wrapper around one that keeps it as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``)
            or ``._optimizer`` (Lightning's ``LightningOptimizer``).
        path: trace directory to create (see :mod:`graftlab.trace`).
        every: record steps whose number is a multiple of ``every``.
        flush_every: recorded steps per part file at most.
        flush_seconds: also flush at the first step that finds the oldest buffered row older than
            this many seconds (wall clock, read on the host: no device sync), so a slow run killed
            at any moment loses at most about this much; None: only the step bound.
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
        record_lr: add column ``lr``: the magnitude optimizer's learning rate (first param group)
            that each recorded step used, read just before the step (after it an LR scheduler has
            moved on). This column wins: ``log(lr=...)`` is then an error; pass
            ``record_lr=False`` to log ``lr`` yourself.
        on_flush: callables ``f(table, metadata)`` run in the writer thread after each part file is
            written, with the part as a ``pyarrow.Table`` (the trace columns, ``ratio`` included) and the run metadata;
            e.g. :class:`graftlab.integrations.tensorboard.TensorBoardView`. An exception in one
            stops the recording and is raised on the training thread at the next flush. Those with
            a ``close()`` method are closed with the Recorder.
        grad_every: add column ``norm_g``, each group's gradient norm, on every ``grad_every``-th
            recorded step (NaN on the others; 0: no column). It tells groups whose gradient is float
            noise (:mod:`graftlab.distill.degenerate`) from large real corrections; a few samples per
            window suffice, and sparse NaN runs cost almost nothing on disk. Not taken for sharded
            (DTensor) parameters, whose norms would need collectives on every rank.

    Under ``torch.distributed`` (torchrun, DDP, FSDP2, accelerate, Lightning) create the Recorder
    on every rank, as the training script does for one process: only global rank 0 (of the process
    group, or torchrun's ``RANK`` before one exists) records and writes; on the other ranks it
    attaches no hook, never touches ``path``, and :meth:`log`/:meth:`flush`/:meth:`close` do
    nothing (``active`` is False). The ratios are the same on every rank (DDP replicates them,
    FSDP2's all-reduce makes them equal), so rank 0's trace is the run's trace.

    Raises:
        GraftlabError: ``graft`` is not a Graft; ``every``/``flush_every`` < 1, ``grad_every`` < 0 or
            ``start_step`` < 0;
            ``metadata`` sets ``format``, ``groups`` or ``granularity``; ``path`` exists without
            ``overwrite``/``resume``, is a file, lies inside another trace, holds something other
            than a trace, or is being written by another process; a resume that
            :mod:`graftlab.record.target` refuses; :meth:`log` gets a trace column (``norm_g``
            included; or ``lr`` while ``record_lr``) or a non-scalar tensor; writing failed (raised at the next flush,
            :meth:`sync` or :meth:`close`).

    Example::

        opt = graftlab.Graft(adam, sgd, granularity="layer", names=model)
        with graftlab.Recorder(opt, "runs/trace", model=model, metadata={"task": "mine"}) as rec:
            for batch in loader:
                loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()
                rec.log(loss=loss.detach())            # optional per-step scalars, stay on the device
        df = graftlab.read_trace("runs/trace")        # with ratio and df.attrs["graftlab"] metadata
    """

    def __init__(
        self,
        graft: Graft,
        path: Union[str, Path],
        *,
        every: int = 1,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        flush_seconds: Optional[float] = DEFAULT_FLUSH_SECONDS,
        metadata: Optional[Mapping[str, Any]] = None,
        model: Optional[nn.Module] = None,
        kinds: Overrides = None,
        overwrite: bool = False,
        start_step: Optional[int] = None,
        resume: bool = False,
        record_lr: bool = True,
        on_flush: Union[Callable[[Any, dict], None], Sequence[Callable[[Any, dict], None]], None] = None,
        grad_every: int = DEFAULT_GRAD_EVERY,
    ) -> None:
        graft = self._find_graft(graft)
        every, flush_every, grad_every, start_step = check_arguments(
            path, every=every, flush_every=flush_every, grad_every=grad_every, start_step=start_step,
            flush_seconds=flush_seconds, metadata=metadata, model=model,
            flags={"overwrite": overwrite, "resume": resume, "record_lr": record_lr})
        callbacks = [] if on_flush is None else [on_flush] if callable(on_flush) else list(on_flush)
        if not all(callable(c) for c in callbacks):
            raise GraftlabError("{on_flush} must be a callable f(table, metadata) or a list of them", param="on_flush")
        self.graft = graft
        self.path = Path(path)
        self.every = int(every)
        self.flush_every = int(flush_every)
        self.flush_seconds = None if flush_seconds is None else float(flush_seconds)
        self.record_lr = bool(record_lr)
        self._next_step = graft.steps if start_step is None else int(start_step)
        self.group_kinds = group_kinds(graft, model, kinds)
        self.metadata = run_metadata(graft, self.group_kinds, metadata or {}, self.path, every=self.every,
                                     flush_every=self.flush_every, start_step=self._next_step)
        self.rows_flushed = 0  # recorded steps handed to the writer
        self._closed = False
        self._hooks: list[Any] = []
        from graftlab.distributed import is_main

        self.active = is_main()
        if not self.active:  # another rank records: touch nothing, hook nothing
            self._writer = None
            return

        # checks, then the lock, then the old trace replaced or truncated; a resumed trace keeps its
        # metadata (every part of one trace carries the same)
        check_fits(self.flush_every, len(graft.group_names))  # a buffer beyond memory: refused before the trace
        self._created = not self.path.exists()  # removed again if nothing gets recorded (close)
        self._lock, self.metadata = open_trace(self.path, self.metadata, graft.group_names, start_step=self._next_step,
                                               every=self.every, overwrite=overwrite, resume=resume)

        self._model, self._kinds = model, kinds  # to name the kinds of groups added later
        self._derived = self._where()  # metadata the recorder derived, kept current unless the user set it
        self._groups = list(graft.group_names)  # the groups the buffer holds, in its column order
        self._writer = Writer(self.path, callbacks, after_first=functools.partial(first_part_written, self.path))
        self._writer.start()
        self._buffer = Rows(self.flush_every)
        self._grad_every = int(grad_every)
        self._grads = self._grad_norms()
        self._deadline = math.inf  # monotonic time by which the buffered rows must be flushed
        self._steps = StepLog(graft)  # which step a logged value belongs to
        self._lr: Any = None
        self._waiting = False  # a part handed to the writer that the next post-hook waits for
        # host-side bookkeeping (counters, the buffer, the flush clock): under torch.compile(graft.step)
        # the hooks run as plain Python, not traced (no graph break warning, no recompile per step)
        host = torch.compiler.disable
        self._hooks += [graft.register_step_post_hook(host(self._on_step)),
                        graft.register_step_pre_hook(host(self._before_step)), before_checkpoint(graft, self.sync)]
        _OPEN.add(self)
        termination.watch(self)

    @staticmethod
    def _find_graft(opt: Any) -> Graft:
        seen = opt
        for _ in range(4):  # accelerate, Lightning and DeepSpeed-style wrappers keep the optimizer inside
            inner = getattr(opt, "optimizer", None)
            if not isinstance(inner, torch.optim.Optimizer):
                inner = getattr(opt, "_optimizer", None)
            if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
                # unwrap first: Lightning's wrapper is itself a Graft subclass holding a copy of the
                # Graft's attributes, so what the Graft rebuilds later (its stats tensor when groups
                # are added or the parameters cast or moved) the copy never sees
                opt = inner
                continue
            if isinstance(opt, Graft):
                return opt
            break
        raise GraftlabError(f"Recorder needs a graftlab.Graft optimizer, got {type(seen).__name__}")

    # -- recording (hot path: no host sync) ------------------------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._steps.before_step()
        if self.record_lr:
            self._lr = self.graft.magnitude.param_groups[0].get("lr")
        # a full (or old) buffer goes now, log() having filled its last row: the part is written
        # while this step computes, and its post-hook waits for it. The clock is the host's, so the
        # time bound costs no device sync.
        if self._due():
            self.flush()
            self._waiting = True

    def _due(self) -> bool:
        n = self._buffer.n
        if n == self.flush_every:
            return True
        return bool(n and self.flush_seconds is not None and time.monotonic() >= self._deadline)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self._next_step
        self._next_step += 1
        if self._buffer.n == self.flush_every:  # a step taken without the pre-hook (hooks bypassed)
            self.flush()
            self._waiting = True
        if self._waiting:
            self._wait()  # so no more than flush_every recorded steps are ever off the disk
        if step % self.every:
            self._steps.stepped(None)
            return
        stats = self.graft.last_stats
        if not self._buffer.fits(stats):
            self._regroup()
        if self._buffer.n == 0 and self.flush_seconds is not None:
            self._deadline = time.monotonic() + self.flush_seconds
        row = self._buffer.add(stats, step, self._grads)
        if self._lr is not None:
            self._buffer.put(row, "lr", self._lr)
        for key, value in self._steps.stepped(row).items():  # accumulated micro-batches' means
            self._buffer.put(row, key, value)

    def _regroup(self) -> None:
        """The Graft gained groups (``add_param_group``), or its stats changed dtype or device (the
        model was cast or moved): write the rows buffered so far, then record every group from this
        step on; later parts and the sidecar carry the grown group list in their metadata."""
        self.flush()
        self._groups = list(self.graft.group_names)
        self.group_kinds = group_kinds(self.graft, self._model, self._kinds)
        derived = self._where()
        moved = {k: v for k, v in derived.items() if self.metadata.get(k) == self._derived.get(k)}
        self.metadata = {**self.metadata, **moved, "groups": groups_meta(self.graft, self.group_kinds)}
        self._derived = derived
        trace.write_sidecar(self.path, self.metadata)
        self._buffer.regroup()
        self._grads = self._grad_norms()

    def _where(self) -> dict[str, Any]:
        return {"device": str(self.graft.params[0].device), "precision": precision_of(self.graft.params)}

    def _grad_norms(self) -> Optional[GradNorms]:
        if not self._grad_every:
            return None
        norms = GradNorms(self.graft, self._grad_every * self.every)
        return norms if norms.usable else None

    def log(self, **scalars: Union[Tensor, float, int]) -> None:
        """Attach per-step scalars (``loss=tensor``, ``tokens=4096``) to the step just taken.

        Call it after ``optimizer.step()`` (and ``zero_grad()``) for every batch; on steps that are
        not recorded it does nothing, and so it does on ranks other than 0. A value belongs to the
        step it was computed for (:mod:`graftlab.record.steps`): after a step that did not happen
        (GradScaler skipped it; its gradients were then zeroed) it is dropped, and no row is written
        for that step; under gradient accumulation the values of a step's micro-batches are
        averaged into its row (the mean micro-batch loss, as the HF Trainer logs it). A value logged
        twice for one step keeps the last. Tensors (one element,
        any device) stay on their device until the next flush, so logging costs no host sync.
        Every logged column is float64 in the trace whether its values came as Python numbers or
        tensors. Earlier parts of the trace are widened with nulls when a key is first logged
        later, so every part has one schema. Names are checked here, on every call, so that a bad
        one never reaches the writer thread. ``restart`` is the divergence mark graftlab's own restart code logs
        (:mod:`graftlab.runs`): :func:`graftlab.distill.pipeline` reads it (:mod:`graftlab.distill.divergence`) as the
        number of restarts after a divergence before this step ran, and refuses windows from the
        first nonzero one on, so log it only with that meaning.

        Raises:
            ClosedError: the Recorder is closed (a GraftlabError and a RuntimeError).
            GraftlabError: the key is a trace column (``step``, ``group``, ``norm_m``, ``norm_d``,
                ``ratio``, or ``norm_g``, the per-group gradient norm), is not valid UTF-8 text
                (a Parquet column name), or is ``lr`` while ``record_lr`` records it; the value is
                not a number or a one-element tensor.
        """
        if self._closed:  # on every rank: the value would be dropped without a word
            raise ClosedError(f"{self.path}: the Recorder is closed; call log() before close()")
        for key in scalars:  # checked on every rank, so that every rank fails alike
            problem = scalar_name_problem(key)
            if problem:
                raise GraftlabError(f"cannot log {key!r}: {problem}")
            if key == "lr" and self.record_lr:
                raise GraftlabError(
                    "cannot log 'lr': the recorder writes the lr each step used (record_lr=True); "
                    "log it under another name or create the Recorder with record_lr=False")
        values = {key: scalar(key, value) for key, value in scalars.items()}
        if not self.active:
            return
        placed = self._steps.place(values)
        if self._steps.row is not None:
            for key, value in placed.items():
                self._buffer.put(self._steps.row, key, value)

    # -- flushing -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand the buffered rows to the writer: device-to-host copies, written in the background.

        Raises GraftlabError when an earlier write (or an ``on_flush`` callback) failed.
        """
        if not self.active:
            return
        with termination.deferred():  # SIGTERM never cuts a flush in half
            self._flush()

    def sync(self) -> None:
        """Flush and wait until every row recorded so far is in a part file on disk.

        A checkpoint of the Graft through :mod:`graftlab.distributed` calls it before the checkpoint
        is committed; call it before saving a checkpoint of your own (one host sync).
        """
        if not self.active or self._closed:
            return
        self.flush()
        self._wait()

    def _wait(self) -> None:
        with termination.deferred():
            self._writer.jobs.join()
        self._waiting = False
        self._raise_writer_error()

    def _flush(self) -> None:
        self._raise_writer_error()
        n = self._buffer.n
        if n == 0 or self._buffer.stats is None:
            return
        self._writer.jobs.put((*self._buffer.to_host(), self._groups, self.metadata))
        self.rows_flushed += n
        self._buffer.clear()
        self._deadline = math.inf
        self._steps.flushed()

    def _raise_writer_error(self) -> None:
        err = self._writer.error
        if err is not None:
            raise GraftlabError(f"{self.path}: writing the trace failed ({err})") from err

    def close(self) -> None:
        """Flush, wait for the writer, release the trace, and detach from the optimizer. Safe to
        call twice; :meth:`flush` and :meth:`sync` do nothing after it, :meth:`log` raises. A Recorder closed before it recorded a step leaves no trace: the folder it
        created is removed (an existing folder is kept, without the trace's files)."""
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        with termination.deferred():
            for hook in self._hooks:
                hook.remove()
            _OPEN.discard(self)
            try:
                if self._writer.error is None:
                    self._flush()
            finally:
                self._writer.jobs.put(None)
                self._writer.join()
                release_trace(self.path, self._lock, self._created)
                termination.unwatch(self)
                for callback in self._writer.on_flush:
                    if callable(getattr(callback, "close", None)):
                        callback.close()
        self._raise_writer_error()

    @property
    def next_step(self) -> int:
        """Number the next optimizer step will be recorded under (on rank 0; elsewhere the start)."""
        return self._next_step

    @property
    def parts(self) -> list[Path]:
        """Part files written so far (none on ranks other than 0)."""
        return list(self._writer.parts) if self._writer is not None else []

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Recorder({str(self.path)!r}, groups={len(self.graft.group_names)}, every={self.every}, "
                f"flush_every={self.flush_every}, flush_seconds={self.flush_seconds}, "
                f"next_step={self._next_step}, active={self.active})")
