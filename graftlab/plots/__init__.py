"""The paper's figures (Figures 4-8) and the distilled corrections, drawn from traces.

Every function takes a trace (a path, or the DataFrame :func:`graftlab.read_trace` returns) and an
optional Axes or Figure, and returns the matplotlib Figure::

    from graftlab import plots
    plots.figure5("sample_traces/bert-adam-sgd-bs32").savefig("figure5.png")
    plots.figure6("sample_traces/bert-adam-sgd-bs32", "sample_traces/bert-adam-sgd-bs128", steps=(2000, 500))

Ratios are drawn on log axes and coloured by layer kind (:data:`graftlab.kinds.KIND_LABELS`).
"""
from graftlab.plots.common import KIND_LABELS, LABEL_COLORS, LABEL_ORDER, MEDIAN_WIDTH, kind_color
from graftlab.plots.layers import PANELS, figure5, figure6, figure7, figure8, panel_groups, ratios
from graftlab.plots.schedule import figure4, schedule, steps_per_epoch

__all__ = [
    "KIND_LABELS", "LABEL_COLORS", "LABEL_ORDER", "MEDIAN_WIDTH", "PANELS",
    "figure4", "figure5", "figure6", "figure7", "figure8",
    "kind_color", "panel_groups", "ratios", "schedule", "steps_per_epoch",
]
from graftlab.plots.corrections import corrections_bars, corrections_table  # noqa: E402

__all__ += ["corrections_bars", "corrections_table"]
