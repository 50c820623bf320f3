"""Stage 2, recording: a :class:`Recorder` hooks a :class:`~graftlab.graft.Graft` and streams one row
per (step, group) to a Parquet trace.

Takes in a Graft (and optionally the model, for group kinds, and values the loop logs); hands on a
trace folder in the format :mod:`graftlab.trace` defines (part files plus ``_graftlab.json``).

Modules: ``recorder`` (:class:`Recorder`), ``buffer`` (rows kept on the device between flushes),
``writer`` (the background thread that writes parts), ``metadata`` (what the sidecar says of the run),
``grad_norms`` (optional per-group gradient norms), ``target`` (opening a trace folder to write:
lock, overwrite, resume).
"""
from graftlab._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Recorder": "graftlab.record.recorder",
    "DEFAULT_FLUSH_EVERY": "graftlab.record.recorder",
    "open_trace": "graftlab.record.target",
})
