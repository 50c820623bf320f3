"""The paper's Figure 8: Figure 6's per-layer corrections split by parameter type, one panel per type.

Per run, a 2 x 4 grid: the six block panels (attention Q, K, V, out and the two feed-forward layers)
hold one line per transformer block, shaded by depth; "Embeddings" holds one line per embedding
table; "Others" holds everything else (biases, LayerNorms, the output head), coloured by layer kind::

    from graftlab import plots
    plots.figure8("sample_traces/bert-adam-sgd-bs16", "sample_traces/bert-adam-sgd-bs64",
                  steps=(2000, 500)).savefig("fig8.png")
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from graftlab.plots.common import (
    KIND_LABELS,
    MEDIAN_WIDTH,
    RATIO_LABEL,
    Trace,
    decade_axis,
    figure_title,
    filter_text,
    first_steps,
    kind_color,
    kind_handles,
    new_figure,
    run_label,
    span_text,
    style,
)
from graftlab.plots.layers import Steps, _per_trace, _traces, ratios
from graftlab.plots.lines import aggregated, band_text, plot_bands, x_span

# Figure 8's panels: (title, kind, ffn position); one line per transformer block in the first six.
# The paper titles the feed-forward panels "Attention FC1/FC2" (after the BERT layer that holds them);
# they are the block's feed-forward layers, and are titled so here.
PANELS = (
    ("Attention Q", "Q", None),
    ("Attention K", "K", None),
    ("Attention V", "V", None),
    ("Attention out", "attn_out", None),
    ("Feed-forward FC1", "ffn", "fc1"),
    ("Feed-forward FC2", "ffn", "fc2"),
    ("Embeddings", "embedding", None),
    ("Others", None, None),
)
_BLOCK_PANELS = 6
_MAX_BLOCK_ENTRIES = 8  # a deeper model's block legend lists evenly spaced blocks only
_MAX_EMBEDDING_ENTRIES = 8  # more embedding lines than this: their count in the title, no legend


def _block(value) -> Optional[int]:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def panel_groups(kinds: pd.DataFrame) -> dict[str, list[tuple[str, Optional[int]]]]:
    """Figure 8's assignment of groups to panels: ``{panel title: [(group, block), ...]}``.

    ``kinds`` is the group table :func:`graftlab.plots.ratios` returns. A block panel holds, for every
    block, that block's largest group of the panel's kind (the weight matrix, not its bias);
    embeddings hold every embedding group; everything else is in "Others".
    """
    out: dict[str, list[tuple[str, Optional[int]]]] = {title: [] for title, _, _ in PANELS}
    placed: set[str] = set()
    in_block = kinds["block"].notna()
    for title, kind, ffn in PANELS[:_BLOCK_PANELS]:
        sel = kinds[(kinds["kind"] == kind) & in_block]
        if ffn is not None:
            sel = sel[sel["ffn"] == ffn]
        numel = pd.to_numeric(sel["numel"], errors="coerce").fillna(0)
        for block, idx in sel.groupby(sel["block"].map(_block)).groups.items():
            group = numel.loc[idx].idxmax()
            out[title].append((group, block))
            placed.add(group)
        out[title].sort(key=lambda item: item[1])
    # the rest in one pass of whole columns: a model of 10^5 groups puts nearly all of them here
    rest = kinds[~kinds.index.isin(list(placed))]
    blocks = [_block(b) for b in rest["block"].tolist()]
    embedding = (rest["kind"] == "embedding").to_numpy()
    for key, mask in (("Embeddings", embedding), ("Others", ~embedding)):
        out[key] = [(g, b) for g, b, m in zip(rest.index, blocks, mask) if m]
    return out


def _embedding_label(group: str) -> str:
    # "bert.embeddings.word_embeddings.weight" -> "word"
    return str(group).removesuffix(".weight").split(".")[-1].removesuffix("_embeddings")


def _draw_run(sub, df: pd.DataFrame, *, width: Optional[int]) -> None:
    wide, kinds = ratios(df, width=width)
    panels = panel_groups(kinds)
    blocks = sorted({b for title, _, _ in PANELS[:_BLOCK_PANELS] for _, b in panels[title]})
    shades = dict(zip(blocks, sns.color_palette("viridis", max(len(blocks), 1))))
    axes = sub.subplots(2, 4, squeeze=False)
    other_labels: list[str] = []
    has_values = set(wide.columns[wide.notna().any(axis=0).to_numpy()])
    for ax, (title, kind, _) in zip(axes.flat, PANELS):
        items = [(g, b) for g, b in panels[title] if g in has_values]
        if aggregated(len(items)):  # a panel of more lines than a reader can tell apart: bands per kind
            drawn = plot_bands(ax, wide[[g for g, _ in items]], kinds)
            if kind is None:
                other_labels += drawn
            note = band_text(len(items), sep="\n")  # two short lines: a panel is a quarter of the figure wide
            ax.set_title(f"{title}: {note}", fontsize="medium")
            x_span(ax, wide.index)
            decade_axis(ax)
            continue
        distinct = sns.color_palette("Dark2", max(len(items), 1))
        # "Others": the kinds with the fewest lines on top, so a kind of two or three lines (the
        # attention-out biases) is not buried under a dozen LayerNorm and output lines
        count = pd.Series([kinds.at[g, "kind"] for g, _ in items]).value_counts()
        for i, (group, block) in enumerate(items):
            col = wide[group].dropna()
            z = 2.0
            if kind == "embedding":
                color, label = distinct[i], _embedding_label(group)
            elif kind is not None:
                color, label = shades[block], f"block {block}"
            else:
                color, label = kind_color(kinds.at[group, "kind"]), KIND_LABELS[kinds.at[group, "kind"]]
                other_labels.append(label)
                z = 2.0 + 1.0 / count[kinds.at[group, "kind"]]
            ax.plot(col.index.to_numpy(), col.to_numpy(), color=color, lw=1.1, label=label, gid=str(group),
                    zorder=z)
        many = kind == "embedding" and len(items) > _MAX_EMBEDDING_ENTRIES  # a legend taller than the panel
        ax.set_title(f"{title} ({len(items):,} groups)" if many else title, fontsize="medium")
        x_span(ax, wide.index)
        if items:
            decade_axis(ax)
        if kind == "embedding" and items and not many:
            ax.legend(fontsize="small", loc="best")
    for ax in axes[:, 0]:
        ax.set_ylabel(RATIO_LABEL, fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("Training iterations")
    # The two legends sit right beside the panels they explain: the block shades beside the last
    # panel of the top row, the layer kinds beside "Others" (the layout makes room for both).
    if blocks:
        step = max(1, int(np.ceil((len(blocks) - 1) / (_MAX_BLOCK_ENTRIES - 1))))
        shown = blocks[::step] if blocks[::step][-1] == blocks[-1] else blocks[::step] + [blocks[-1]]
        axes[0, -1].legend([Line2D([], [], color=shades[b], lw=2.5) for b in shown], [f"block {b}" for b in shown],
                           loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize="small",
                           title="Transformer\nblock", title_fontsize="small")
    if other_labels:
        handles, labels = kind_handles(other_labels)
        for h in handles:
            h.set_linewidth(2.5)
        axes[-1, -1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0,
                            fontsize="small", title='"Others":\nlayer kind', title_fontsize="small")


def figure8(trace: Trace, trace2: Optional[Trace] = None, *, steps: Steps = 2000,
            width: Optional[int] = MEDIAN_WIDTH, fig: Optional[Figure] = None) -> Figure:
    """Figure 8 (paper, Appendix): Figure 6 split by parameter type, one 2 x 4 grid of panels per run.

    Panels: attention Q, K, V, out and feed-forward FC1, FC2 (one line per transformer block: each
    block's weight matrix), embeddings, and everything else ("Others", coloured by layer kind). The
    y axes are the ratio ``||w_M - w_t|| / ||w_D - w_t||`` on log scales labelled in decades.
    ``steps`` is one count for both traces or one per trace; ``width`` is the median filter width
    (None or 1: unfiltered). Raises :class:`~graftlab.errors.GraftlabError` when ``steps`` does not
    give one count per trace.
    """
    traces = _traces(trace, trace2)
    counts = _per_trace(steps, len(traces))
    with style():
        fig = new_figure(fig, figsize=(13, 5.2 * len(traces) + 0.4))
        subfigs = fig.subfigures(len(traces), 1, squeeze=False)[:, 0]
        for i, (sub, run, n) in enumerate(zip(subfigs, traces, counts)):
            df = first_steps(run, n)
            _draw_run(sub, df, width=width)
            prefix = f"({'ab'[i]}) " if len(traces) > 1 else ""
            figure_title(sub, f"{prefix}{run_label(df)}: {span_text(df, n)}", fontsize="medium")
        figure_title(fig, f"Figure 8: per-layer learning-rate corrections by parameter type, {filter_text(width)}")
    return fig
