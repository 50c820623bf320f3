"""Steps where M took no step at all: kept out of medians.

A step whose ratio is 0 in every group (``norm_m == 0`` everywhere while D moved) is a step where M's
learning rate was 0: the Hugging Face Trainer's linear warmup, and most warmups written as
``lr * t / warmup``, start there. Its ratios say nothing about the correction D needs, and a median
over a short window would be pulled towards 0 by them, so :func:`graftlab.distill.pipeline.distill`
treats them as not finite (left out, counted in ``n_nonfinite``) and says so in one note; the figures
leave them off their log axes the same way.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def idle_steps(df: pd.DataFrame) -> np.ndarray:
    """The steps of a long ``step, group, ratio`` table where every finite ratio is 0, sorted."""
    if df.empty:
        return np.array([], np.int64)
    r = df["ratio"].to_numpy(dtype=np.float64)
    frame = pd.DataFrame({"step": df["step"].to_numpy(), "zero": r == 0, "moved": np.isfinite(r) & (r != 0)})
    agg = frame.groupby("step", sort=True)[["zero", "moved"]].any()
    return agg.index[agg["zero"].to_numpy() & ~agg["moved"].to_numpy()].to_numpy(np.int64)


def without_idle(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """``df`` with the ratios of its idle steps (:func:`idle_steps`) set to NaN, and those steps."""
    steps = idle_steps(df)
    if len(steps) == 0:
        return df, steps
    df = df.copy()
    df.loc[df["step"].isin(steps).to_numpy(), "ratio"] = np.nan
    return df, steps


def grid_without_idle(values: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same for a ``(groups, steps)`` grid of ratios (NaN where not recorded): a copy with the
    idle steps' columns set to NaN (or ``values`` itself when there is none), and those steps."""
    if values.size == 0:
        return values, np.array([], np.int64)
    zero = (values == 0).any(axis=0)
    moved = (np.isfinite(values) & (values != 0)).any(axis=0)
    idle = zero & ~moved
    if not idle.any():
        return values, np.array([], np.int64)
    values = values.copy()
    values[:, idle] = np.nan
    return values, np.asarray(steps)[idle].astype(np.int64)


def note(steps: np.ndarray) -> str:
    """One line on the idle steps left out."""
    shown = ", ".join(str(int(s)) for s in steps[:5]) + (", ..." if len(steps) > 5 else "")
    return (f"{len(steps)} step(s) where M took no step in any group (ratio 0 everywhere: M's lr was 0, as at "
            f"the start of a warmup from 0) are left out of the medians: step(s) {shown}")
