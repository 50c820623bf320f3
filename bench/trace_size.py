"""Trace size: bytes per row on disk, for the traces in ``sample_traces/`` and a fresh bert recording.

Rows are (step, group) pairs. The table also splits each trace's bytes by column (compressed column
chunks from the Parquet footers) and names the rest (footers: schema, run metadata, statistics)::

    python bench/trace_size.py            # sample traces + a 200-step bert tiny recording
    python bench/trace_size.py --quick    # a 20-step recording only

Target: under 6 bytes per row.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402

TARGET = 6.0


def trace_bytes(path: Path) -> dict:
    """Rows, bytes and per-column compressed bytes of a trace directory or file."""
    files = [path] if path.is_file() else sorted(path.glob(trace.PART_GLOB))
    rows, total, cols = 0, 0, defaultdict(int)
    for f in files:
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        total += f.stat().st_size
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                cols[col.path_in_schema] += col.total_compressed_size
    sidecar = path / trace.SIDECAR if path.is_dir() else None
    side = sidecar.stat().st_size if sidecar is not None and sidecar.exists() else 0
    data = sum(cols.values())
    return {
        "trace": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "parts": len(files),
        "rows": rows,
        "bytes": total,
        "sidecar_bytes": side,
        "bytes_per_row": total / rows if rows else float("nan"),
        "data_bytes_per_row": data / rows if rows else float("nan"),
        "columns_bytes_per_row": {k: v / rows for k, v in cols.items()} if rows else {},
        "footer_bytes_per_part": (total - data) / len(files) if files else 0,
    }


def record_fresh(out: Path, steps: int, batch_size: int, eval_size=None) -> Path:
    from graftlab.config import RecordConfig
    from graftlab.runs import record

    cfg = RecordConfig(task="bert", size="tiny", steps=steps, batch_size=batch_size, device="cpu",
                       granularity="layer", eval_every=0, eval_size=eval_size, out=str(out))
    record(cfg, progress=False)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="steps of the fresh recording (default 200; quick 20)")
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_traces")
    args = ap.parse_args(argv)
    steps = args.steps or (20 if args.quick else 200)

    rows = []
    if args.samples.is_dir() and not args.quick:
        for p in sorted(args.samples.iterdir()):
            if p.is_dir() and any(p.glob(trace.PART_GLOB)) or (p.is_file() and p.suffix == ".parquet"):
                rows.append(trace_bytes(p))
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        fresh = trace_bytes(record_fresh(Path(tmp) / "bert-tiny", steps, 4 if args.quick else 32,
                                         4 if args.quick else None))
        fresh["trace"] = f"fresh: graftlab record --task bert --size tiny --steps {steps} (layer)"
        rows.append(fresh)

    tab = table(
        ["trace", "parts", "rows", "bytes/row", "column data bytes/row", "step+group", "norm_m", "norm_d", "ratio",
         "other columns", "footer bytes/part", "target < 6"],
        [[r["trace"], r["parts"], r["rows"], r["bytes_per_row"], r["data_bytes_per_row"],
          r["columns_bytes_per_row"].get("step", 0) + r["columns_bytes_per_row"].get("group", 0),
          r["columns_bytes_per_row"].get("norm_m", 0), r["columns_bytes_per_row"].get("norm_d", 0),
          r["columns_bytes_per_row"].get("ratio", 0),
          sum(v for k, v in r["columns_bytes_per_row"].items() if k not in trace.REQUIRED),
          r["footer_bytes_per_part"], "ok" if r["bytes_per_row"] < TARGET else "MISSED"] for r in rows],
    )
    print(tab)
    path = write_result("trace_size", {"traces": rows, "target_bytes_per_row": TARGET, "tables": {"size": tab}},
                        args.quick)
    print(f"\nwrote {path}")
    return {"traces": rows}


if __name__ == "__main__":
    main()
