"""Write traces in the trace contract's format (graftlab.trace) from arrays, for tests and benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graftlab.trace import FORMAT, FORMAT_1, METADATA_KEY, SCHEMA, SIDECAR, part_marker, part_name


def metadata(groups: Sequence[dict[str, Any]], *, granularity: str = "layer", d_lr: float = 0.1, every: int = 1,
             **extra: Any) -> dict[str, Any]:
    """Run metadata with every contract key; ``groups`` entries need ``name`` (kind/block optional)."""
    full = []
    for g in groups:
        full.append({"name": g["name"], "kind": g.get("kind", "other"), "ffn": g.get("ffn"),
                     "block": g.get("block"), "shape": g.get("shape", [1]), "numel": g.get("numel", 1),
                     "members": g.get("members", [g["name"]])})
    meta = {
        "format": FORMAT,
        "granularity": granularity,
        "groups": full,
        "magnitude": {"class": "Adam", "hyperparameters": {"lr": 1e-3}},
        "direction": {"class": "SGD", "hyperparameters": {"lr": d_lr, "momentum": 0.9}},
        "task": "synthetic", "batch_size": 8, "seed": 0, "device": "cpu", "every": every,
        "versions": {"graftlab": "0.1.0", "torch": "x"}, "config": {},
    }
    meta.update(extra)
    return meta


def write_trace(path: Path, meta: dict[str, Any], steps: np.ndarray, ratios: np.ndarray, *,
                part_steps: int = 500, row_group_steps: int = 100, norm_d: Optional[np.ndarray] = None,
                drop: Sequence[str] = (), fmt: str = FORMAT_1) -> Path:
    """Write a trace directory: ``ratios`` is (n_steps, n_groups) in metadata group order.

    ``norm_m = ratio * norm_d`` (``norm_d`` defaults to 1; 0 where the ratio is not finite, as a
    zero D step gives). ``drop`` leaves columns out (to build malformed traces). ``fmt`` is the trace
    format: ``/1`` (default) stores ``ratios`` exactly as given; ``/2`` stores the norms only (with
    the default ``norm_d`` of 1 the ratios read back exactly too).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    meta = {**meta, "format": fmt}
    (path / SIDECAR).write_text(json.dumps(meta))
    names = [g["name"] for g in meta["groups"]]
    n_steps, n_groups = ratios.shape
    if norm_d is None:
        norm_d = np.where(np.isfinite(ratios), 1.0, 0.0)
    norm_m = np.where(np.isfinite(ratios), np.nan_to_num(ratios, posinf=0.0) * norm_d, 1.0)
    key = json.dumps(meta).encode() if fmt == FORMAT_1 else part_marker(fmt)
    schema = SCHEMA.with_metadata({METADATA_KEY: key})
    keep = [f.name for f in schema if f.name not in drop and (fmt == FORMAT_1 or f.name != "ratio")]
    schema = pa.schema([schema.field(c) for c in keep], metadata=schema.metadata)
    for lo in range(0, n_steps, part_steps):
        hi = min(lo + part_steps, n_steps)
        cols = {
            "step": pa.array(np.repeat(steps[lo:hi], n_groups).astype(np.int64)),
            "group": pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(n_groups, dtype=np.int32), hi - lo)),
                                                    pa.array(names)),
            "norm_m": pa.array(norm_m[lo:hi].ravel().astype(np.float32)),
            "norm_d": pa.array(norm_d[lo:hi].ravel().astype(np.float32)),
            "ratio": pa.array(ratios[lo:hi].ravel().astype(np.float32)),
        }
        table = pa.table({c: cols[c] for c in keep}, schema=schema)
        pq.write_table(table, path / part_name(int(steps[lo])), row_group_size=row_group_steps * n_groups,
                       write_page_checksum=True)
    return path
