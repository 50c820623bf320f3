"""Live view: the per-kind median ratio of each flushed part, written to TensorBoard.

The Recorder calls the view from its writer thread once per flush (never per step), with the part
just written::

    from graftlab.integrations.tensorboard import TensorBoardView
    rec = graftlab.Recorder(graft, "runs/trace", on_flush=TensorBoardView("runs/tb"))

For every group kind (Q, K, V, attention out, feedforward, ...; :mod:`graftlab.kinds`) it writes
scalar ``<tag>/<kind>``: the median over the kind's groups of each group's median finite ratio
``||w_M - w_t|| / ||w_D - w_t||`` over the part's steps (the statistic of ``kind_summary``, per
flush window), at the part's last step. Groups flagged by :func:`graftlab.distill.degenerate.flag_groups`
(no finite ratio, zero M step, degenerate such as the attention K bias) are left out, as in the
summaries. Ranks other than 0 record nothing, so the view is never called there and, given a log
directory, creates nothing.
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from graftlab.integrations import require

DEFAULT_TAG = "graftlab/ratio_median"


def kind_medians(table: Any, meta: dict) -> dict[str, float]:
    """Per kind, the median over unflagged groups of each group's median finite ratio in ``table``.

    ``table``: a trace part (pyarrow Table or DataFrame with ``group`` and ``ratio``); ``meta``: the
    run metadata (its ``groups`` give each group's kind; groups missing there are ``other``).
    Kinds whose groups are all flagged are left out.
    """
    from graftlab.distill.degenerate import flag_window

    have = table.columns if isinstance(table, pd.DataFrame) else table.column_names
    cols = [c for c in ("step", "group", "ratio", "norm_g") if c in have]
    df = table[cols].copy() if isinstance(table, pd.DataFrame) else table.select(cols).to_pandas()
    df["group"] = df["group"].astype(str)
    ratio = df["ratio"].to_numpy(dtype=np.float64)
    finite = df[np.isfinite(ratio)]
    names = [g["name"] for g in meta.get("groups") or []] or list(dict.fromkeys(df["group"]))
    medians = finite.groupby("group", sort=False)["ratio"].median().reindex(names)
    kinds = {g["name"]: g.get("kind") or "other" for g in meta.get("groups") or []}
    # the same degenerate-group rule as distill
    flags, _, _ = flag_window(df, medians, kinds, precision=meta.get("precision"))
    ok = medians[flags == ""]
    by_kind = ok.groupby([kinds.get(g, "other") for g in ok.index], sort=False).median()
    return {str(k): float(v) for k, v in by_kind.items()}


class TensorBoardView:
    """An ``on_flush`` callback for :class:`graftlab.Recorder` that writes per-kind median ratios.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``, such as
            Lightning's ``TensorBoardLogger.experiment``), or a log directory: a SummaryWriter is
            then created there at the first flush, on the rank that records.
        tag: prefix of the scalar names (``<tag>/<kind>``).

    Raises ImportError (naming the ``tensorboard`` extra) when given a directory without the
    ``tensorboard`` package installed.
    """

    def __init__(self, writer: Union[str, Any], *, tag: str = DEFAULT_TAG) -> None:
        self._given = writer if hasattr(writer, "add_scalar") else None
        self._logdir = None if self._given is not None else str(writer)
        if self._given is None:
            require("torch.utils.tensorboard", "tensorboard", "TensorBoardView")  # fail at construction
        self._writer: Optional[Any] = self._given
        self._lock = threading.Lock()
        self.tag = tag.rstrip("/")

    @property
    def writer(self) -> Any:
        with self._lock:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(self._logdir)
            return self._writer

    def __call__(self, table: Any, meta: dict) -> None:
        medians = kind_medians(table, meta)
        if not medians:
            return
        step = int(np.max(table.column("step").to_numpy())) if hasattr(table, "column") else int(table["step"].max())
        writer = self.writer
        for kind, value in medians.items():
            writer.add_scalar(f"{self.tag}/{kind}", value, global_step=step)
        writer.flush()  # a live view: visible now, not at the writer's own flush interval

    def close(self) -> None:
        """Close the SummaryWriter if this view created it (the Recorder calls this on close)."""
        with self._lock:
            if self._given is None and self._writer is not None:
                self._writer.close()
                self._writer = None
