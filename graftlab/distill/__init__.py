"""Stage 4, distilling: a trace becomes corrections (Section 5 of the paper).

Takes in a trace (:mod:`graftlab.trace`: graftlab's own, or a table from another tool); hands on
:class:`~graftlab.corrections.Corrections`: static per-group multipliers (windowed medians, rounded
to powers of ten or to D_beta) or per-group schedules (medians over consecutive windows).

    >>> from graftlab.distill import distill
    >>> corr = distill("runs/t", window=2000, round="D500")

Modules, in the order a distill uses them: ``pipeline`` (:func:`distill`), ``analysis`` (group
kinds, rounding, summaries), ``medians`` (the (groups, steps) median engine), ``degenerate`` (groups
kept out of medians), ``divergence`` (steps after a divergence), ``notes`` (what distill tells the
user).
"""
from graftlab._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "distill": "graftlab.distill.pipeline",
    "default_output": "graftlab.distill.pipeline",
    "check_settings": "graftlab.distill.pipeline",
})
