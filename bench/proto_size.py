"""What would bring traces under 6 bytes/row: re-encode a trace's rows with variants of the writer.

    python bench/proto_size.py [TRACE]      # default: sample_traces/bert-adam-sgd-bs16

All variants write the same rows, 100 steps per part, with the library's float encoding
(byte-stream-split + zstd 3) and report bytes per row (this is the exploration that led to
``graftlab.trace/2``, which is "metadata once + no ratio column"; ``bench/trace_size.py`` measures it):
- as ``graftlab.trace/1`` writes it (metadata JSON in every part footer),
- metadata in the first part only (the sidecar holds it anyway),
- without the ``ratio`` column (it is ``norm_m / norm_d``, recomputable on read),
- norms rounded to 12 mantissa bits (relative error < 1.3e-4; lossy, for medians of noisy ratios).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    drop = 23 - bits
    u = ((u + (1 << (drop - 1))) >> drop) << drop  # round half up on the dropped bits
    return u.view(np.float32)


def write_variant(tb: pa.Table, out: Path, *, meta_every_part: bool, ratio: bool, bits: int = 23) -> int:
    out.mkdir(parents=True)
    steps = tb.column("step").to_numpy()
    firsts = np.unique(steps // 100)
    size = 0
    for i, k in enumerate(firsts):
        part = tb.filter(pa.compute.equal(pa.compute.divide(tb.column("step"), 100), k))
        if not ratio:
            part = part.drop_columns(["ratio"])
        if bits < 23:
            for c in ("norm_m", "norm_d", "ratio"):
                if c in part.column_names:
                    j = part.column_names.index(c)
                    part = part.set_column(j, c, pa.array(_round_mantissa(part.column(c).to_numpy(), bits)))
        if not (meta_every_part or i == 0):
            part = part.replace_schema_metadata(None)
        path = out / trace.part_name(int(k) * 100)
        trace.write_table(part, path)
        size += path.stat().st_size
    return size


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", type=Path, default=ROOT / "sample_traces" / "bert-adam-sgd-bs16")
    args = ap.parse_args(argv)
    # the rows as read_trace gives them (ratio included), re-encoded in the /1 layout and its variants
    tb, meta = trace.read_table(args.trace)
    meta = trace.metadata_bytes({**meta, "format": trace.FORMAT_1})
    tb = tb.replace_schema_metadata({trace.METADATA_KEY: meta})
    tb = tb.set_column(tb.column_names.index("group"), "group", tb.column("group").cast(pa.string()).dictionary_encode())
    rows = tb.num_rows
    variants = [
        ("as written", dict(meta_every_part=True, ratio=True)),
        ("metadata in the first part only", dict(meta_every_part=False, ratio=True)),
        ("+ no ratio column", dict(meta_every_part=False, ratio=False)),
        ("+ norms rounded to 12 mantissa bits", dict(meta_every_part=False, ratio=False, bits=12)),
        ("metadata once, ratio kept, 12-bit mantissas", dict(meta_every_part=False, ratio=True, bits=12)),
    ]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw) in enumerate(variants):
            out.append([name, write_variant(tb, Path(tmp) / str(i), **kw) / rows])
    tab = table(["variant", "bytes/row"], out)
    print(f"{args.trace}: {rows:,} rows\n" + tab)
    write_result("proto_size", {"trace": str(args.trace), "rows": rows, "variants": out, "tables": {"size": tab}}, False)
    return {"variants": out}


if __name__ == "__main__":
    main()
