"""Trace size: bytes per row on disk, formats ``graftlab.trace/1`` and ``/2``, and what ``/2`` costs on read.

Rows are (step, group) pairs. The table splits each trace's bytes by column (compressed column chunks
from the Parquet footers) and names the rest (footers: schema, marker or run metadata, statistics).
The shipped sample traces are ``/1``; each is also re-encoded as ``/2`` (same rows, checked lossless:
norms bit for bit, and the ratio ``/2`` computes on read against the one ``/1`` stored). A fresh bert
recording is ``/2``. Then the price of not storing ``ratio``: ``read_trace`` of the same synthetic
rows in both formats, interleaved::

    python bench/trace_size.py            # sample traces + a 200-step bert tiny recording + reads
    python bench/trace_size.py --quick    # a 20-step recording and small reads

Target (issue 13): at most 7.5 bytes per row, lossless, as ``graftlab.trace/2``.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, quantiles, table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402

TARGET = 7.5


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
    from graftlab.runs import RecordConfig
    from graftlab.runs import record

    cfg = RecordConfig(task="bert", size="tiny", steps=steps, batch_size=batch_size, device="cpu",
                       granularity="layer", eval_every=0, eval_size=eval_size, out=str(out))
    record(cfg, progress=False)
    return out


def convert(src: Path, dst: Path, fmt: str) -> Path:
    """Re-encode the trace directory ``src`` as ``fmt`` in ``dst`` with the library's writer (same rows)."""
    meta = {**trace.read_metadata(src), "format": fmt}
    dst.mkdir(parents=True)
    trace.write_sidecar(dst, meta)
    for part in trace.part_files(src):
        tb, _ = trace.read_table(part)  # ratio as read_trace gives it (stored /1, computed /2)
        if fmt != trace.FORMAT_1:
            tb = tb.drop_columns(["ratio"])
        tb = tb.replace_schema_metadata({trace.METADATA_KEY: trace.metadata_bytes(meta)})
        trace.write_part(dst, tb)
    return dst


def lossless(v1: Path, v2: Path) -> dict:
    """Norms identical bit for bit; how many ratios /2 computes differ from those /1 stored."""
    a, b = trace.read_trace(v1), trace.read_trace(v2)
    same = {c: bool(np.array_equal(a[c].to_numpy(), b[c].to_numpy(), equal_nan=True)) for c in ("norm_m", "norm_d")}
    ra, rb = a["ratio"].to_numpy(), b["ratio"].to_numpy()
    differ = int(np.sum(~((ra == rb) | (np.isnan(ra) & np.isnan(rb)))))
    return {"norms_identical": all(same.values()), "ratios_differing": differ, "rows": len(a)}


def read_cost(tmp: Path, steps: int, groups: int, repeats: int) -> dict:
    """read_trace of the same rows as /1 (ratio stored) and /2 (ratio computed), interleaved."""
    from distill_cost import make_trace

    v2 = make_trace(tmp / "read-v2", steps, groups)
    v1 = convert(v2, tmp / "read-v1", trace.FORMAT_1)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    runs: dict[str, list[tuple[float, float]]] = {"/1": [], "/2": []}
    for r in range(repeats):
        for name, path in ([("/1", v1), ("/2", v2)] if r % 2 == 0 else [("/2", v2), ("/1", v1)]):
            t, c = time.perf_counter(), cpu()
            df = trace.read_trace(path)
            runs[name].append((time.perf_counter() - t, cpu() - c))
            del df
    size = {k: sum(f.stat().st_size for f in p.glob(trace.PART_GLOB)) / (steps * groups) for k, p in
            (("/1", v1), ("/2", v2))}
    return {"rows": steps * groups, "bytes_per_row": size,
            "wall": {k: quantiles([w for w, _ in v]) for k, v in runs.items()},
            "cpu": {k: quantiles([c for _, c in v]) for k, v in runs.items()},
            "wall_ratio": quantiles([b[0] / a[0] for a, b in zip(runs["/1"], runs["/2"])]),
            "cpu_ratio": quantiles([b[1] / a[1] for a, b in zip(runs["/1"], runs["/2"])])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="steps of the fresh recording (default 200; quick 20)")
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_traces")
    ap.add_argument("--read-steps", type=int, help="steps x 400 groups of the read comparison (default 10000; quick 200)")
    ap.add_argument("--repeats", type=int, help="interleaved reads of each format (default 7; quick 1)")
    args = ap.parse_args(argv)
    steps = args.steps or (20 if args.quick else 200)
    read_steps = args.read_steps or (200 if args.quick else 10_000)
    repeats = args.repeats or (1 if args.quick else 7)

    rows, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        tmp = Path(tmp)
        if args.samples.is_dir() and not args.quick:
            for p in sorted(args.samples.iterdir()):
                if p.is_dir() and any(p.glob(trace.PART_GLOB)):
                    fmt = trace.trace_info(p)["format"]
                    rows.append({**trace_bytes(p), "format": fmt})
                    if fmt == trace.FORMAT_1:
                        v2 = convert(p, tmp / p.name, trace.FORMAT)
                        row = trace_bytes(v2)
                        row["trace"] = f"{rows[-1]['trace']} re-encoded"
                        rows.append({**row, "format": trace.FORMAT})
                        checks[rows[-2]["trace"]] = lossless(p, v2)
        fresh = trace_bytes(record_fresh(tmp / "bert-tiny", steps, 4 if args.quick else 32,
                                         4 if args.quick else None))
        fresh["trace"] = f"fresh: graftlab record --task bert --size tiny --steps {steps} (layer)"
        rows.append({**fresh, "format": trace.trace_info(tmp / "bert-tiny")["format"]})
        cost = read_cost(tmp, read_steps, 400 if not args.quick else 40, repeats)

    tab = table(
        ["trace", "format", "parts", "rows", "bytes/row", "column data bytes/row", "step+group", "norm_m", "norm_d",
         "ratio", "other columns", "footer bytes/part", f"target <= {TARGET}"],
        [[r["trace"], r["format"].rsplit(".", 1)[-1], r["parts"], r["rows"], r["bytes_per_row"], r["data_bytes_per_row"],
          r["columns_bytes_per_row"].get("step", 0) + r["columns_bytes_per_row"].get("group", 0),
          r["columns_bytes_per_row"].get("norm_m", 0), r["columns_bytes_per_row"].get("norm_d", 0),
          r["columns_bytes_per_row"].get("ratio", 0),
          sum(v for k, v in r["columns_bytes_per_row"].items() if k not in trace.REQUIRED),
          r["footer_bytes_per_part"], "ok" if r["bytes_per_row"] <= TARGET else "MISSED"] for r in rows],
    )
    lossless_tab = table(["re-encoded as /2", "rows", "norms bit-identical", "ratios differing from /1's"],
                         [[k, v["rows"], "yes" if v["norms_identical"] else "NO", v["ratios_differing"]]
                          for k, v in checks.items()])
    q = lambda d: f"{d['median']:.3g} ({d['min']:.3g}..{d['max']:.3g})"  # noqa: E731
    read_tab = table(["format", "bytes/row", "read_trace wall s", "read_trace CPU s"],
                     [[k, cost["bytes_per_row"][k], q(cost["wall"][k]), q(cost["cpu"][k])] for k in ("/1", "/2")]
                     + [["/2 over /1 (per repeat)", "", q(cost["wall_ratio"]), q(cost["cpu_ratio"])]])
    print(tab, lossless_tab, f"read_trace of {cost['rows']:,} rows in each format ({repeats} interleaved repeats):",
          read_tab, sep="\n\n")
    path = write_result("trace_size", {"traces": rows, "lossless": checks, "read_cost": cost,
                                       "target_bytes_per_row": TARGET,
                                       "tables": {"size": tab, "lossless": lossless_tab, "read": read_tab}},
                        args.quick)
    print(f"\nwrote {path}")
    return {"traces": rows, "lossless": checks, "read_cost": cost}


if __name__ == "__main__":
    main()
