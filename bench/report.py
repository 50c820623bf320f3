"""Write the result tables of README.md and bench/RESULTS.md from the committed bench/results/*.json.

    python bench/report.py            # rewrite the marked regions of both files
    python bench/report.py --check    # exit 1 when the committed text differs from what it would write

Only the text between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` is rewritten. Each row
of a summary table is the figure, its spread, the target, met or missed, and the date, machine and
load of the run that measured it; nothing in these tables is typed by hand. The rows are the
entries of ``ROWS`` (a result file, what it measures, how to read the figure, the target) and the
detailed sections those of ``SECTIONS`` (a result file's own ``tables``): a new result file becomes
a row or a section with one entry.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

RESULTS = ROOT / "bench" / "results"
README, RESULTS_MD = ROOT / "README.md", ROOT / "bench" / "RESULTS.md"


# ------------------------------------------------------------------------------------- figures

@dataclass(frozen=True)
class Figure:
    text: str  # the figure as quoted
    spread: str  # its spread (min..max over repeats, or over configurations), "-" for a count
    met: Optional[bool]  # None: reported, no target


def at(res: dict, path: str):
    """``res["a"]["b"]`` for ``"a.b"``; list items by index (``-1``) or by ``key=value`` parts."""
    for part in path.split("."):
        if isinstance(res, list) and part.lstrip("-").isdigit():
            res = res[int(part)]
        elif "=" in part and isinstance(res, list):
            key, value = part.split("=", 1)
            res = next(r for r in res if str(r.get(key)) == value)
        else:
            res = res[part]
    return res


def num(x: float, unit: str = "") -> str:
    if unit == "x":
        return f"{x:.2f}x"
    if unit == "s":
        return f"{x:.2f} s" if x < 10 else f"{x:.1f} s" if x < 100 else f"{x:.0f} s"
    if unit == "MB":
        return f"{x:,.0f} MB"
    return f"{x:.3g}{(' ' + unit) if unit else ''}"


def check(value: float, op: Optional[str], limit: Optional[float]) -> Optional[bool]:
    if op is None:
        return None
    return {"<=": value <= limit, "<": value < limit, "==": value == limit, ">=": value >= limit}[op]


def edge(value: float, unit: str, limit: Optional[float]) -> str:
    """``num(value)``, with more digits when rounding would make a missed target read as met."""
    text = num(value, unit)
    if limit is not None and unit == "x" and text == num(limit, unit) and value != limit:
        text = f"{value:.4f}x"
    return text


def summary(path: str, unit: str, op: Optional[str] = None, limit: Optional[float] = None,
            note: str = "") -> Callable[[dict], Figure]:
    """The median of the quantiles at ``path`` (``{median, min, max}``) against ``op limit``."""
    def read(res: dict) -> Figure:
        q = at(res, path)
        spread = f"{num(q['min'], unit)}..{num(q['max'], unit)}" if q["min"] != q["max"] else "one run"
        return Figure(edge(q["median"], unit, limit) + note, spread, check(q["median"], op, limit))
    return read


def value(path: str, unit: str, op: Optional[str] = None, limit: Optional[float] = None,
          note: str = "") -> Callable[[dict], Figure]:
    """One measured value (a count, a size) at ``path``."""
    def read(res: dict) -> Figure:
        v = at(res, path)
        return Figure((f"{v:,}" if isinstance(v, int) else num(v, unit)) + note, "-", check(v, op, limit))
    return read


def over(rows: str, where: dict, path: str, unit: str, op: Optional[str] = None, limit: Optional[float] = None,
         label: Callable[[dict], str] = lambda r: f"{r['pair']} {r['granularity']}") -> Callable[[dict], Figure]:
    """A range over configurations: the medians at ``path`` of every item of list ``rows`` matching
    ``where``; met when every median meets the target. The spread is min..max over all repeats."""
    def read(res: dict) -> Figure:
        items = [r for r in res[rows] if all(r.get(k) == v for k, v in where.items())]
        meds = [at(r, path)["median"] for r in items]
        lo, hi = min(meds), max(meds)
        text = f"{num(lo, unit)}-{num(hi, unit)}" if num(lo, unit) != num(hi, unit) else num(lo, unit)
        fails = [label(r) for r, m in zip(items, meds) if check(m, op, limit) is False]
        text += f" over {len(items)} configurations"
        if fails:
            text += "; all over the target" if len(fails) == len(items) else \
                f"; {len(fails)} over the target ({', '.join(fails)})"
        spread = f"{num(min(at(r, path)['min'] for r in items), unit)}..{num(max(at(r, path)['max'] for r in items), unit)}"
        return Figure(text, spread, None if op is None else not fails)
    return read


def values_over(rows: str, where: dict, key: str, unit: str, op: Optional[str] = None,
                limit: Optional[float] = None) -> Callable[[dict], Figure]:
    """A range of one value (no repeats) over the items of ``rows`` matching ``where``."""
    def read(res: dict) -> Figure:
        vals = [at(r, key) for r in res[rows] if all(r.get(k) == v for k, v in where.items())]
        lo, hi = min(vals), max(vals)
        text = f"{num(lo, unit)}-{num(hi, unit)}" if num(lo, unit) != num(hi, unit) else num(lo, unit)
        return Figure(text, "-", None if op is None else all(check(v, op, limit) for v in vals))
    return read


# ---------------------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class Row:
    table: str  # the marked region it goes to: "performance" or "reliability"
    result: str  # bench/results/<result>.json
    what: str
    figure: Callable[[dict], Figure]
    target: str  # as quoted; "reported" where there is none


P, R = "performance", "reliability"
STEP = "`Graft(M, D).step()`, 26.3M parameters in 138 tensors"
ROWS: list[Row] = [
    Row(P, "step_cost", f"{STEP}, direct path / `M.step(); D.step()` with torch's default (per-tensor) children",
        over("timing", {"path": "direct"}, "ratio_vs.default", "x", "<=", 1.25), "<= 1.25x"),
    Row(P, "step_cost", "the same, direct path / the strongest `M.step(); D.step()` (torch's `fused=True` children)",
        over("timing", {"path": "direct"}, "ratio", "x"), "reported"),
    Row(P, "step_cost", "the same, `Graft(M, D, fused=True)` / the strongest `M.step(); D.step()`",
        over("timing", {"path": "fused"}, "ratio", "x", "<=", 0.9), "<= 0.9x"),
    Row(P, "step_cost", "one-off compile of the fused path (its first step), wall",
        values_over("compile", {}, "wall_s", "s"), "reported"),
    Row(P, "step_cost", "recorded / unrecorded fused step (Adam#SGD layer, 138 groups), process CPU time",
        summary("record.ratio", "x", "<=", 1.02), "<= 1.02x"),
    Row(P, "step_cost", "memory beyond both children's states, direct path (parameter-sized buffers, peak)",
        values_over("memory", {"path": "direct"}, "graft_peak", "", "<=", 1.05), "<= 1 buffer (+5% allocator slack)"),
    Row(P, "step_cost", "the same, fused path",
        values_over("memory", {"path": "fused"}, "graft_peak", "", "<=", 0.05), "no buffer"),
    Row(P, "record_cost", "bert tiny training step recording every step / not recording, process CPU time",
        summary("result.ratio", "x", "<=", 1.02), "<= 1.02x"),
    Row(P, "divergence_check", "bert tiny training step with the per-step divergence check / without, Adam#SGD",
        summary("results.optimizer=Adam#SGD.ratio", "x", "<=", 1.01), "<= 1.01x"),
    Row(P, "divergence_check", "the same, plain SGD (one 2-norm pass over the gradients)",
        summary("results.optimizer=SGD.ratio", "x", "<=", 1.01), "<= 1.01x"),
    Row(P, "distill_cost", "`distill --window 2000` (library call), 100,000-step x 400-group trace (40M rows)",
        summary("results.window_long", "s", "<", 2.0), "< 2 s"),
    Row(P, "distill_cost", "the same / on a 2000-step trace (per repeat)",
        summary("results.window_ratio", "x", "<=", 3.0), "<= 3x"),
    Row(P, "distill_cost", "`distill --schedule --filter 51`, whole 40M-row trace / `pyarrow.parquet.read_table`, wall",
        summary("results.schedule_ratio", "x", "<", 5.0), "< 5x"),
    Row(P, "distill_cost", "the same, peak RSS",
        value("results.schedule.max_rss_mb", "MB", "<", 2048), "< 2 GB"),
    Row(P, "distill_cost", "`read_trace`, whole 40M-row trace / `read_table`, wall",
        summary("results.read_ratio", "x", "<=", 1.5), "<= 1.5x"),
    Row(P, "trace_size", "trace size, `graftlab.trace/2`: a fresh 200-step bert tiny recording",
        lambda r: Figure(f"{at(r, 'traces.-1.bytes_per_row'):.2f} bytes/row ({at(r, 'traces.-1.parts')} parts of "
                         f"{at(r, 'traces.-1.rows') / at(r, 'traces.-1.parts'):,.0f} rows)", "-",
                         at(r, "traces.-1.bytes_per_row") <= 7.5), "<= 7.5 bytes/row"),
    Row(P, "distill_cost", "trace size, `graftlab.trace/2`: the 40M-row trace",
        value("bytes_per_row", "bytes/row", "<=", 7.5), "<= 7.5 bytes/row"),
    Row(P, "cli_start", "`graftlab info` on a sample trace, wall (start to exit)",
        summary("results.graftlab info.wall", "s", "<", 1.0), "< 1 s"),
    Row(P, "cli_start", "`graftlab distill --window 500` on a sample trace, wall",
        summary("results.graftlab distill --window 500.wall", "s", "<", 1.0), "< 1 s"),
    Row(P, "cli_start", "`graftlab info` / `python -c pass` in the same run, wall (per repeat)",
        summary("results.graftlab info.ratio_to_python", "x"), "reported"),
    Row(P, "cli_start", "`graftlab info` / `python -c \"import pandas, pyarrow.parquet\"`, wall (per repeat)",
        summary("results.graftlab info.ratio", "x"), "reported"),
    Row(P, "cli_start", "`python -c \"import torch\"` (what a command that trains pays first), wall",
        summary("results.python -c \"import torch\".wall", "s"), "reported"),
    Row(P, "foreign_scale", "a table from another tool (one Parquet file, 100,000 steps x 400 groups, no graftlab "
        "metadata): `distill --window 2000`, wall", summary("results.window_long", "s", "<", 2), "< 2 s"),
    Row(P, "foreign_scale", "the same / the same command on a 2,000-step file", summary("results.window_ratio", "x", "<=", 3),
        "<= 3x"),
    Row(P, "foreign_scale", "the same table: `distill --schedule --window 2000 --filter 51` / pyarrow `read_table` of it",
        summary("results.schedule_ratio", "x", "<=", 5), "<= 5x"),
    Row(P, "foreign_scale", "the same schedule: peak memory", value("results.schedule.max_rss_mb", "MB", "<", 2048),
        "< 2 GB"),
    *(Row(P, "foreign_scale", f"100,000 groups x 20 steps: `graftlab {command}`, wall",
          summary(f"results.{key}_many", "s", "<=", 15), "<= 15 s")
      for command, key in (("info", "info"), ("distill", "distill"), ("plot --figure 5", "plot5"))),
    *(Row(P, "foreign_scale", f"100,000 groups x 20 steps: `graftlab {command}`, peak memory",
          value(f"results.{key}_many.max_rss_mb", "MB", "<", 2048), "< 2 GB")
      for command, key in (("info", "info"), ("distill", "distill"), ("plot --figure 5", "plot5"))),
    *(Row(P, "foreign_scale", f"1,000,000 groups x 1 step: `graftlab {command}`, wall",
          summary(f"results.{key}_million", "s", "<=", 60), "<= 60 s")
      for command, key in (("info", "info"), ("distill", "distill"), ("plot --figure 5", "plot5"))),
    Row(R, "kill_suite", "`graftlab record` killed (SIGKILL, SIGTERM; at chosen steps, at random moments, during "
        "checkpoints, again while resuming), then resumed: most steps lost to SIGKILL (`--flush-every 5`)",
        value("lost_sigkill", "", "<=", 5, note=" steps"), "<= one flush interval (5)"),
    Row(R, "kill_suite", "the same: kills checked", value("kills", ""), "reported"),
    Row(R, "kill_suite", "the same: steps lost to SIGTERM", value("lost_sigterm", "", "==", 0), "0"),
    Row(R, "kill_suite", "the same: steps missing after `--resume`", value("gaps_after_resume", "", "==", 0), "0"),
    Row(R, "bad_inputs", "bad inputs over every command (typos, bad values, outputs that are inputs or inside a "
        "trace, paths under a file, malformed traces and corrections files): cases passed, each one `error:` line, "
        "exit 2, no file created or changed", lambda r: Figure(f"{r['passed']:,} of {r['cases']:,} cases", "-", r["passed"] == r["cases"]), "every case"),
    Row(R, "fuzz", "`read_trace` and `load_corrections` fuzzed with hypothesis (arbitrary bytes, JSON, near-valid "
        "files, malformed parts and folders): examples run, each a valid result or one `GraftlabError`",
        value("total", ""), "reported"),
    Row(R, "bitflip", "a bit flipped in a trace part: parts read back altered, without an error",
        value("results.checksums (as written).altered", "", "==", 0, note=" of 1,000"), "0"),
]
STATUS = {True: "met", False: "**missed**", None: "reported"}


def load(name: str) -> Optional[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_of(res: dict) -> str:
    """When and where a result was measured: its date, CPU (GPU), cores and load average."""
    m = res.get("machine") or {}
    load = m.get("load_avg") or []
    where = m.get("cuda") or f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores"
    return (f"{res.get('written') or 'undated'}, {where}, load {load[0]:.1f}" if load else
            f"{res.get('written') or 'undated'}, {where}")


def rows_table(table: str) -> str:
    reliability = table == R
    head = ["what", "figure", "spread", "target", "status", "run (date, machine, load)"]
    if reliability:
        head.insert(5, "command")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in (r for r in ROWS if r.table == table):
        res = load(row.result)
        if res is None:
            cells = [row.what, "not measured", "-", row.target, f"no bench/results/{row.result}.json", "-"]
        else:
            fig = row.figure(res)
            cells = [row.what, fig.text, fig.spread, row.target, STATUS[fig.met], run_of(res)]
        if reliability:  # the command that measured it, as its result file records it
            cells.insert(5, f"`{res['command']}`" if res and res.get("command") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sections

def _notes_step_cost(res: dict) -> str:
    return (f"{res.get('parameters', 0) / 1e6:.1f}M parameters in {res.get('tensors')} tensors, {res.get('device')}, "
            f"{res.get('threads')} torch thread(s), {res.get('repeats')} interleaved repeats x "
            f"{res.get('steps_per_block')} steps; ratio clock: {(res.get('timing') or [{}])[0].get('clock', '?')}.")


STEP_COST_CAPTIONS = {
    "baselines": "The baseline forms, median ms per `M.step(); D.step()` (children without a fused kernel keep "
                 "their foreach form in the fused column):",
    "compile": "One-off cost of the fused path: its first step (inductor compile, fresh cache), per pair; "
               "later pairs with the same optimizer flags reuse the compiled passes:",
    "record": "A fused step with a Recorder (every step; flushes every 50 steps) against the same step without:",
    "memory": "Memory beyond parameters, gradients and both children's states, in parameter-sized buffers (peak "
              "RSS; fused: a step after the compile):",
}


@dataclass(frozen=True)
class Section:
    result: str
    title: str
    tables: Sequence[str]  # keys of the result's "tables", in order
    notes: Callable[[dict], str] = lambda res: ""
    captions: dict = None
    render: Optional[Callable[[dict], str]] = None  # a table built from the result's rows, not stored in it


def _slice_rows(res: dict) -> str:
    """Recording per head and per row: the recorder timed alone (this result) beside the interleaved
    end-to-end ratio and the trace sizes (``slice_record_cost.interleaved``)."""
    inter = load("slice_record_cost.interleaved") or {"rows": []}
    ratio = {(r["granularity"], r["every"]): r for r in inter["rows"]}
    head = ["granularity", "groups", "every", "grafted step ms (CPU)", "graft / plain Adam", "recorder alone, us/step",
            "1 + recorder / step", "interleaved recorded / unrecorded (median, spread)", "trace bytes per recorded step",
            "bytes/row", "sidecar bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        i = ratio.get((r["granularity"], r["every"]))
        inter_cell = f"{i['ratio']:.3f} ({i['spread']})" if i else "-"
        lines.append("| " + " | ".join([
            r["granularity"], str(r["groups"]), str(r["every"]), f"{r['graft_ms']:.1f}", f"{r['graft_vs_adam']:.2f}",
            f"{r['recorder_us_per_step']:.0f}", f"{r['estimated_ratio']:.4f}", inter_cell,
            f"{r['bytes_per_recorded_step']:,.0f}", f"{r['bytes_per_row']:.2f}", f"{r['metadata_bytes_per_trace']:,}",
        ]) + " |")
    when = f" Interleaved run: `{inter.get('command', '-')}` ({run_of(inter)})." if inter.get("rows") else ""
    return ("\"recorder alone\" fires the Recorder's step hooks as a step does and closes it (the writer thread's "
            "encoding included); \"1 + recorder / step\" sets it against the median grafted step. The interleaved "
            "ratio is the end-to-end check; under load its spread is wider than the effect it measures." + when
            + "\n\n" + "\n".join(lines))


SECTIONS: list[Section] = [
    Section("step_cost", "Step cost: `Graft(M, D).step()` / the strongest `M.step(); D.step()`",
            ["timing", "baselines", "compile", "record", "memory"], _notes_step_cost, STEP_COST_CAPTIONS),
    Section("record_cost", "Recording cost: bert training steps with / without a Recorder", ["record"],
            lambda r: f"{r.get('repeats')} interleaved repeats x {r.get('block')} steps."),
    Section("divergence_check", "Divergence check cost: bert training steps with / without the per-step check",
            ["check"], lambda r: f"{r.get('repeats')} interleaved repeats x {r.get('block')} steps, batch "
                                 f"{r.get('batch_size')}, {r.get('device')}; ratio clock: {r.get('clock')}."),
    Section("distill_cost", "Distill cost on a 100,000-step x 400-group trace (40M rows)", ["distill"],
            lambda r: f"{r.get('trace_bytes', 0) / 1e6:.0f} MB on disk ({r.get('bytes_per_row', 0):.2f} bytes/row); "
                      f"{r.get('repeats')} interleaved repeats of the window distills, {r.get('slow_repeats', 3)} of "
                      "the whole-trace schedule and reads, 1 of the schedule command; each in a fresh process."),
    Section("median_engines", "Exact per-group medians: engines compared (in memory, no file reading)", ["engines"],
            lambda r: f"{r.get('steps', 0):,} steps x {r.get('groups')} groups, median of {r.get('repeats')} "
                      "interleaved repeats; window 2000, filter width 51; differences against float64 references "
                      "computed with numpy.nanmedian."),
    Section("trace_size", "Trace size on disk, and what not storing `ratio` costs on read",
            ["size", "lossless", "read"]),
    Section("cli_start", "Command start-up against `python -c \"import pandas, pyarrow.parquet\"`, "
                         "`python -c pass` and `python -c \"import torch\"`", ["cli_start"]),
    Section("bitflip", "One flipped bit per part file: caught, harmless, or altered data", ["bitflip"]),
    Section("slice_record_cost", "Recording per head and per vocabulary row: gpt tiny", [],
            lambda r: f"batch {r.get('batch_size')}, one thread, Adam#SGD; clock: {r.get('clock')}.",
            render=_slice_rows),
]


def sections() -> str:
    out = []
    for s in SECTIONS:
        res = load(s.result)
        out += [f"### {s.title}", ""]
        if res is None:
            out += [f"not measured (no bench/results/{s.result}.json)", ""]
            continue
        out += [f"`{res.get('command', '')}` ({run_of(res)})", ""]
        note = s.notes(res)
        if note:
            out += [note, ""]
        if s.render is not None:
            out += [s.render(res), ""]
        for key in s.tables:
            tab = (res.get("tables") or {}).get(key)
            if tab:
                if s.captions and key in s.captions:
                    out += [s.captions[key], ""]
                out += [tab, ""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------------- rewriting

REGIONS = {README: {"performance": lambda: rows_table(P), "reliability": lambda: rows_table(R)},
           RESULTS_MD: {"summary": lambda: rows_table(P) + "\n\n" + rows_table(R), "tables": sections}}


def rewrite(text: str, name: str, body: str, where: str) -> str:
    begin, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"error: {where} needs exactly one {begin} ... {end} region")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def rendered() -> dict[Path, tuple[str, str]]:
    """path -> (committed text, text this script writes)."""
    out = {}
    for path, regions in REGIONS.items():
        old = path.read_text()
        new = old
        for name, body in regions.items():
            new = rewrite(new, name, body(), str(path.relative_to(ROOT)))
        out[path] = (old, new)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a file differs from what would be written")
    args = ap.parse_args(argv)
    stale = []
    for path, (old, new) in rendered().items():
        if old == new:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(new)
            print(f"rewrote the result tables of {path.relative_to(ROOT)}")
    if stale:
        print(f"error: {', '.join(stale)} differ from bench/results/*.json; run `python bench/report.py`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
