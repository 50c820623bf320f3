"""The corrections contract: the file ``graftlab distill`` writes and ``graftlab train`` reads.

A corrections file is JSON::

    {"format": "graftlab.corrections/1",
     "multipliers": {"encoder.0.attn.q.weight": 500.0, ...},      # static factors per group
     "schedule": {"global": [[0, 0.02], [2000, 0.05]]},           # piecewise-constant factors
     "source": {"trace": "...", "window": 2000, "round": "D500", "direction_lr": 0.1, ...,
                "groups": {"encoder.0.attn.q.weight": {"kind": "Q", "median": 525.5, ...}, ...}}}

Factors multiply the learning rate D had when the trace was recorded (``source["direction_lr"]``).
A group named ``global`` applies to every parameter. A file holds ``multipliers``, ``schedule`` or
both. ``source["groups"]`` holds one :class:`GroupSource` per group: how its factor was found.

Usage in a training loop (what ``graftlab train`` does)::

    corr = load_corrections("run.corrections.json")
    applied = apply(corr, list(model.named_parameters()), base_lr=0.1)
    opt = torch.optim.SGD(applied.param_groups, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, applied.lr_lambda(run_schedule))
    for step in range(steps):
        ...; opt.step(); sched.step()       # the factor at step t applies to update t

``compare(file_a, file_b)`` puts files side by side (factors, medians, drift per group or kind;
what ``graftlab show`` prints).

``run_schedule`` is the run's own ``step -> factor`` schedule (warmup, decay), or None.
"""
from __future__ import annotations

from graftlab.corrections.applying import Applied, apply
from graftlab.corrections.compare import compare
from graftlab.corrections.files import FORMAT, GLOBAL, Corrections, load_corrections, save
from graftlab.corrections.group_sources import GroupSource

__all__ = ["FORMAT", "GLOBAL", "Applied", "Corrections", "GroupSource", "apply", "compare", "load_corrections",
           "save"]
