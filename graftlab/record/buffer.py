"""The :class:`~graftlab.Recorder`'s buffer: the recorded steps kept on the device between two
flushes, and their one batched copy to the host.

Recording a step and logging a tensor only copy into preallocated device tensors, so the training
loop never waits on the device; :meth:`Rows.to_host` moves everything in one copy per flush
(pinned memory and ``non_blocking`` on CUDA, completed by the writer thread through an event).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from graftlab.errors import GraftlabError
from graftlab.record.grad_norms import GradNorms


# bytes a buffered row holds per group (3 stats and a gradient norm, float32) on the device, and the
# same again in the pinned host copy a flush makes; plus its step (int64)
_ROW_BYTES_PER_GROUP = 2 * 4 * 4


def memory_bytes() -> Optional[int]:
    """The machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(rows: int, groups: int = 1) -> None:
    """GraftlabError when ``rows`` buffered steps of ``groups`` groups cannot fit in this machine's
    memory (``flush_every=10**11``): refused before a trace is touched, not a MemoryError later."""
    need = int(rows) * (8 + _ROW_BYTES_PER_GROUP * max(int(groups), 1))
    have = memory_bytes()
    if have is not None and need > have // 2:
        raise GraftlabError(f"flush_every={rows} buffers {need / 2**30:.3g} GiB of rows between flushes, more than "
                            f"half of this machine's {have / 2**30:.3g} GiB of memory; flush more often")


class Rows:
    """Up to ``size`` recorded steps: the Graft's stats, gradient norms and logged scalars."""

    def __init__(self, size: int) -> None:
        self.size = size
        check_fits(size)
        self.n = 0  # rows filled since the last flush
        self.stats: Optional[Tensor] = None  # (size, 3, G) device ring buffer
        self.grads: Optional[Tensor] = None  # (size, G) gradient norms, NaN where not taken
        self.steps = np.zeros(size, dtype=np.int64)
        self.keys: dict[str, None] = {}  # logged keys in first-logged order: the column order
        self.dev_cols: dict[str, Tensor] = {}  # values logged as tensors, on their device
        self.host_cols: dict[str, np.ndarray] = {}  # values logged as numbers (float64)

    def fits(self, stats: Tensor) -> bool:
        """Whether ``stats`` has the groups, dtype and device of the rows buffered so far (a model
        cast or moved after the Graft was built changes the latter two)."""
        held = self.stats
        return held is None or (stats.shape == held.shape[1:] and stats.dtype == held.dtype
                                and stats.device == held.device)

    def regroup(self) -> None:
        """Start over with other groups (after a flush): the stats buffers are sized anew."""
        self.stats = None
        self.grads = None

    def add(self, stats: Tensor, step: int, grad_norms: Optional[GradNorms]) -> int:
        """Copy a step's ``(3, G)`` stats (and its gradient norms when taken) into the next row; its index."""
        if self.stats is None:
            self.stats = torch.empty((self.size, *stats.shape), dtype=stats.dtype, device=stats.device)
        r = self.n
        self.stats[r].copy_(stats)
        if grad_norms is not None:
            if self.grads is None:
                self.grads = torch.full((self.size, stats.shape[1]), math.nan, dtype=stats.dtype,
                                        device=stats.device)
            grad_norms.write(self.grads, r, step)
        self.steps[r] = step
        self.n = r + 1
        return r

    def put(self, row: int, key: str, value: Any) -> None:
        """Set logged scalar ``key`` of ``row``: a tensor stays on its device, a number on the host.

        Raises GraftlabError for a tensor of more than one element or a value that is not a number.
        """
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise GraftlabError(f"logged {key!r} must be a scalar, got shape {tuple(value.shape)}")
            col = self.dev_cols.get(key)
            if col is None:
                col = self._new_device_col(key, value)
            col[row].copy_(value.detach().reshape(()))
            host = self.host_cols.get(key)
            if host is not None:
                host[row] = math.nan  # the tensor is this row's value
            return
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise GraftlabError(f"logged {key!r} must be a number or a one-element tensor, "
                                f"got {type(value).__name__}") from None
        host = self.host_cols.get(key)
        if host is None:
            self.keys.setdefault(key, None)
            host = self.host_cols[key] = np.full(self.size, np.nan)
        host[row] = number

    def _new_device_col(self, key: str, value: Tensor) -> Tensor:
        # float32 unless the value is float64: the device may lack float64 (MPS); the trace
        # column is float64 either way
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        col = torch.full((self.size,), math.nan, dtype=dtype, device=value.device)
        self.keys.setdefault(key, None)
        self.dev_cols[key] = col
        return col

    def to_host(self) -> tuple:
        """The filled rows copied to the host, as the writer's job ``(steps, stats, device columns,
        event, keys, device keys, host columns)``; the event (CUDA only) marks the copy's end."""
        n = self.n
        stats = self.stats[:n].reshape(n, -1)
        if self.grads is not None:
            stats = torch.cat([stats, self.grads[:n]], 1)  # the writer splits off norm_g
        dev_keys = list(self.dev_cols)
        cols = None
        if dev_keys:
            wide = any(c.dtype == torch.float64 for c in self.dev_cols.values())
            dtype = torch.float64 if wide else torch.float32
            cols = torch.stack([c[:n].to(device=stats.device, dtype=dtype) for c in self.dev_cols.values()], 1)
        event = None
        if stats.device.type == "cuda":
            host_stats = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host_stats.copy_(stats, non_blocking=True)
            host_cols = None
            if cols is not None:
                host_cols = torch.empty(cols.shape, dtype=cols.dtype, pin_memory=True)
                host_cols.copy_(cols, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host_stats = stats.to("cpu", copy=True)
            host_cols = None if cols is None else cols.to("cpu", copy=True)
        host_scalars = {k: v[:n].copy() for k, v in self.host_cols.items()}
        return (self.steps[:n].copy(), host_stats, host_cols, event, list(self.keys), dev_keys, host_scalars)

    def clear(self) -> None:
        """Empty the rows once handed over; every logged value starts as NaN again."""
        self.n = 0
        for col in self.dev_cols.values():
            col.fill_(math.nan)  # queued after the copy on the same stream
        if self.grads is not None:
            self.grads.fill_(math.nan)
        for col in self.host_cols.values():
            col.fill(np.nan)
