"""The Recorder's arguments checked up front, torch.optim style: each wrong type or value is one
:class:`~graftlab.errors.GraftlabError` naming its parameter, before the trace folder is touched
(``every=None``, ``every='x'`` and ``flush_every=2.5`` are refused, never converted)."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

from torch import nn

from graftlab.errors import GraftlabError, check_flag, check_whole

MAX_FLUSH_EVERY = 10**6  # recorded steps one part holds on the device before it is written


def check_arguments(path: Any, *, every: Any, flush_every: Any, grad_every: Any, start_step: Any,
                    flush_seconds: Any, metadata: Any, model: Any,
                    flags: Mapping[str, Any]) -> tuple[int, int, int, Optional[int]]:
    """``(every, flush_every, grad_every, start_step)`` as ints once every argument is checked.

    Raises:
        GraftlabError: with ``param`` the argument's name.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise GraftlabError(f"{{path}} must be a folder name (str or os.PathLike), got {path!r}", param="path")
    every, grad_every = check_whole("every", every, ge=1), check_whole("grad_every", grad_every, ge=0)
    # a part's rows are held on the device until written: a bound that fits any run's memory
    flush_every = check_whole("flush_every", flush_every, ge=1, le=MAX_FLUSH_EVERY)
    start_step = check_whole("start_step", start_step, ge=0, optional=True)
    for name, flag in flags.items():
        check_flag(name, flag)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise GraftlabError(f"{{metadata}} must be a mapping (a dict) or None, got {type(metadata).__name__}",
                            param="metadata")
    if model is not None and not isinstance(model, nn.Module):
        raise GraftlabError(f"{{model}} must be a torch.nn.Module or None, got {type(model).__name__}", param="model")
    if flush_seconds is not None and (isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float))
                                      or not 0 < flush_seconds < math.inf):
        raise GraftlabError(f"{{flush_seconds}} must be a positive number of seconds or None, got {flush_seconds!r}",
                            param="flush_seconds")
    return every, flush_every, grad_every, start_step
