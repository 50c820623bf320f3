"""Stage 1, the optimizer: M#D grafting (Sections 2-3 of the paper).

Takes in two ordinary ``torch.optim`` optimizers over the same parameters (M gives each group's step
size, D its direction) and a partition of the parameters; hands on a :class:`Graft`, itself a
``torch.optim.Optimizer``, whose per-group norms ``||w_M - w_t||`` and ``||w_D - w_t||`` the
:mod:`graftlab.record` stage streams to a trace.

Modules: ``optimizer`` (:class:`Graft`), ``state`` (its state dict), ``build`` (slots, buffers and
norm layouts), ``child_steps`` (stepping M and D from the same ``(w_t, g_t)``), ``rules`` and
``fused_rules`` (the direct and fused update rules), ``fused`` (the fused path), ``norms`` (per-group
norms, foreach), ``partition`` (granularities and group names), ``schedules`` (lr schedules as pure
functions, which corrections and runs share), ``optimizers`` (optimizers by name).
"""
from graftlab._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Graft": "graftlab.graft.optimizer",
    "Partition": "graftlab.graft.partition",
    "GRANULARITIES": "graftlab.graft.partition",
    "make_partition": "graftlab.graft.partition",
    "make_optimizer": "graftlab.graft.optimizers",
    "parse_hparams": "graftlab.graft.optimizers",
})
