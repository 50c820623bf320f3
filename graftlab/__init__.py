"""graftlab: learning-rate grafting (M#D) as a toolkit.

The pipeline, one module per stage::

    graft.py (M#D optimizer) -> record.py (Recorder) -> trace.py (the trace contract)
      -> distill.py (trace -> corrections) -> corrections.py (the corrections contract) -> train.py
"""
from graftlab.errors import GraftlabError
from graftlab.graft import Graft
from graftlab.partition import Partition

__version__ = "0.1.0"

__all__ = ["Graft", "GraftlabError", "Partition", "__version__"]
