"""The paper's figures (Figures 4-8) and the distilled corrections, drawn from traces.

Every function takes a trace (a path, or the DataFrame :func:`graftlab.read_trace` returns) and an
optional Axes or Figure, and returns the matplotlib Figure::

    from graftlab import plots
    plots.figure5("sample_traces/bert-adam-sgd-bs16").savefig("figure5.png")
    plots.figure6("sample_traces/bert-adam-sgd-bs16", "sample_traces/bert-adam-sgd-bs64", steps=(2000, 500))
    plots.figure4("sample_traces/resnet-sgd-adagrad-global")

(the traces in ``sample_traces/``: layer-wise Adam#SGD on ``bert`` at batch sizes 16 and 64, and global
SGD#AdaGrad on ``resnet``). Ratios are drawn on log axes labelled in decades and coloured by layer
kind (:data:`graftlab.kinds.KIND_LABELS`); each figure is titled with its number and what it shows
(filtered or not, which iterations). Past :data:`graftlab.plots.lines.MANY_GROUPS` groups the per-layer
figures draw each kind's median over its groups and a 10-90% band instead of one line per group,
and say so in their titles.
"""
from graftlab.plots.common import KIND_LABELS, LABEL_COLORS, LABEL_ORDER, MEDIAN_WIDTH, kind_color
from graftlab.plots.layers import figure5, figure6, figure7, ratios
from graftlab.plots.panels import PANELS, figure8, panel_groups
from graftlab.plots.schedule import figure4, schedule, steps_per_epoch

__all__ = [
    "KIND_LABELS", "LABEL_COLORS", "LABEL_ORDER", "MEDIAN_WIDTH", "PANELS",
    "figure4", "figure5", "figure6", "figure7", "figure8",
    "kind_color", "panel_groups", "ratios", "schedule", "steps_per_epoch",
]
from graftlab.plots.corrections import corrections_bars, corrections_table  # noqa: E402

__all__ += ["corrections_bars", "corrections_table"]
from graftlab.plots.rows import row_ratios, rows_figure, token_frequency  # noqa: E402

__all__ += ["row_ratios", "rows_figure", "token_frequency"]
