"""Bit flips in trace parts: how many damaged files does reading catch, and how many read back altered?

One part of a fresh ``graftlab.trace/2`` trace (100 steps x 59 groups, the Recorder's default part),
one random bit flipped per copy, read with :func:`graftlab.read_trace`. Each copy ends as ``error``
(a GraftlabError: page checksum, footer check), ``same`` (the bit is one no reader uses: statistics,
padding, an unused header field) or ``altered`` (rows differ from the original with no error: the
failure this measures). The same is done without page checksums, as ``/1`` parts were written::

    python bench/bitflip.py            # 1000 flipped copies of each
    python bench/bitflip.py --quick    # 100
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result  # noqa: E402

from graftlab import trace  # noqa: E402
from graftlab.errors import GraftlabError  # noqa: E402

GROUPS = 59
STEPS = 100


def make_part(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    names = [f"encoder.layer.{i // 16}.p{i}.weight" for i in range(GROUPS)]
    meta = {"format": trace.FORMAT, "granularity": "layer",
            "groups": [{"name": n, "kind": "other", "ffn": None, "block": None, "shape": None, "numel": 1,
                        "members": [n]} for n in names]}
    directory.mkdir()
    trace.write_sidecar(directory, meta)
    steps = np.arange(STEPS)
    norm_d = np.exp(rng.normal(-3, 0.5, (STEPS, GROUPS)))
    norm_m = norm_d * np.exp(rng.normal(0, 1, (STEPS, GROUPS)))
    stats = np.stack([norm_m, norm_d, norm_m / norm_d], axis=1).astype(np.float32)
    return trace.write_part(directory, trace.build_table(steps, names, stats, {"lr": np.full(STEPS, 1e-3)}, meta))


def flips(part: Path, n: int, seed: int) -> dict:
    raw = part.read_bytes()
    ref = trace.read_trace(part.parent)
    rng = np.random.default_rng(seed)
    out = {"error": 0, "same": 0, "altered": 0, "altered_at": []}
    for _ in range(n):
        pos = int(rng.integers(len(raw)))
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << int(rng.integers(8))
        part.write_bytes(bytes(damaged))
        try:
            df = trace.read_trace(part.parent)
        except GraftlabError:
            out["error"] += 1
            continue
        if df.equals(ref) and list(df.columns) == list(ref.columns):
            out["same"] += 1
        else:
            out["altered"] += 1
            out["altered_at"].append(pos)
    part.write_bytes(raw)
    out["bytes"] = len(raw)
    out["altered_at"] = out["altered_at"][:20]  # the first byte offsets, for a look with a hex editor
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, help="flipped copies per variant (default 1000; quick 100)")
    args = ap.parse_args(argv)
    n = args.n or (100 if args.quick else 1000)
    results = {}
    with tempfile.TemporaryDirectory(prefix="graftlab-bench-") as tmp:
        part = make_part(Path(tmp) / "t")
        results["checksums (as written)"] = flips(part, n, 1)
        # the same part without page checksums: what a reader can catch from structure alone
        table_ = pq.read_table(part)
        pq.write_table(table_, part, compression="zstd", column_encoding={"norm_m": "BYTE_STREAM_SPLIT",
                       "norm_d": "BYTE_STREAM_SPLIT"}, use_dictionary=["step", "group", "lr"], write_page_checksum=False)
        results["no page checksums"] = flips(part, n, 1)
    tab = table(["part written with", "file bytes", "flipped copies", "read error", "same rows", "altered, no error"],
                [[k, v["bytes"], n, v["error"], v["same"], v["altered"]] for k, v in results.items()])
    print(tab)
    path = write_result("bitflip", {"n": n, "results": results, "tables": {"bitflip": tab}}, args.quick)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
