"""A faster ``read_trace``, prototyped outside the library to measure what it would gain.

``graftlab.trace.read_trace`` orders rows by (step, metadata group order) with
``df["group"].map(order)`` on a pandas ``str`` column; with pandas 3 that column is Arrow-backed and
``map`` runs one Python call per row. The prototype computes the group rank in Arrow
(``pyarrow.compute.index_in`` against the metadata's names: one hash lookup per row in C++), sorts
with ``numpy.lexsort`` on (rank, step) and converts to pandas once, already in order::

    python bench/proto_read.py [TRACE] [--stop 2000]

It checks that both return the same frame, then times them interleaved (each in this process).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402


def fast_read(path, steps=(None, None)) -> pd.DataFrame:
    path = Path(path)
    meta = trace.read_metadata(path)
    files = trace._files(path)
    start, stop = steps
    if path.is_dir():
        files = trace._prune(files, start, stop)
    schemas = [pq.read_schema(f) for f in files]
    schema = pa.unify_schemas(schemas) if len(schemas) > 1 else schemas[0]
    dataset = ds.dataset([str(f) for f in files], format="parquet", schema=schema)
    flt = None
    if start is not None:
        flt = ds.field("step") >= start
    if stop is not None:
        cond = ds.field("step") < stop
        flt = cond if flt is None else flt & cond
    tb = dataset.to_table(filter=flt)
    names = [g["name"] for g in meta.get("groups") or []]
    group = tb.column("group")
    if pa.types.is_dictionary(group.type):
        group = group.cast(pa.string())
    rank = pc.index_in(group, value_set=pa.array(names, pa.string())).fill_null(len(names)).to_numpy()
    order = np.lexsort((rank, tb.column("step").to_numpy()))
    tb = tb.set_column(tb.schema.get_field_index("group"), "group", group).take(pa.array(order))
    df = tb.to_pandas()
    df["group"] = df["group"].astype(str)
    df.attrs["graftlab"] = meta
    return df


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", type=Path, default=DATA / "synthetic-100000x400")
    ap.add_argument("--stop", type=int, default=2000, help="read steps [0, stop) (0: the whole trace)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    steps = (0, args.stop) if args.stop else (None, None)
    a = trace.read_trace(args.trace, steps=steps)
    b = fast_read(args.trace, steps)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    times = {"read_trace": [], "prototype": []}
    for r in range(args.repeats):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for k in order:
            t = time.perf_counter()
            (trace.read_trace if k == "read_trace" else fast_read)(args.trace, steps=steps)
            times[k].append(time.perf_counter() - t)
    ratios = [p / c for p, c in zip(times["prototype"], times["read_trace"])]
    rows = [[f"{len(a):,} rows (steps {steps[0]}..{steps[1]})", statistics.median(times["read_trace"]),
             statistics.median(times["prototype"]), f"{statistics.median(ratios):.2f}",
             f"{min(ratios):.2f}..{max(ratios):.2f}"]]
    tab = table(["read", "read_trace s", "prototype s", "prototype / read_trace", "spread"], rows)
    print(tab)
    write_result("proto_read", {"trace": str(args.trace), "steps": steps, "times": times, "tables": {"read": tab}},
                 False)
    return times


if __name__ == "__main__":
    main()
