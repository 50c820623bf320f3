"""graftlab: learning-rate grafting (M#D) as a toolkit.

The pipeline, one module per stage::

    graft.py (M#D optimizer) -> record.py (Recorder) -> trace/ (the trace contract)
      -> distill.py (trace -> corrections) -> corrections/ (the corrections contract) -> runs/ (record and train runs)

The command line (``graftlab.cli``, kept in ``cli/`` of the source tree) only parses options and
calls these.
"""
__version__ = "0.1.0"

from graftlab.corrections import Applied, Corrections, GroupSource, apply, load_corrections, save  # noqa: E402
from graftlab.distill import distill  # noqa: E402
from graftlab.errors import GraftlabError  # noqa: E402
from graftlab.graft import Graft  # noqa: E402
from graftlab.partition import Partition  # noqa: E402
from graftlab.record import Recorder  # noqa: E402
from graftlab.trace import read_metadata, read_trace  # noqa: E402

__all__ = [
    "Applied",
    "Corrections",
    "Graft",
    "GraftlabError",
    "GroupSource",
    "Partition",
    "Recorder",
    "__version__",
    "apply",
    "distill",
    "load_corrections",
    "read_metadata",
    "read_trace",
    "save",
]
