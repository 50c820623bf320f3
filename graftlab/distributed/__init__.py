"""Grafting under ``torch.distributed``: replicated (DDP) and sharded (FSDP2) parameters.

Under DDP every rank holds whole, identical parameters and averaged gradients, so :class:`Graft`
runs unchanged and every rank computes the same per-group ratios; only rank 0 records. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) each rank holds a shard of every tensor as a ``DTensor``;
``Graft`` then does its foreach math on the local shards and gets the norms of the WHOLE tensors
from one all-reduce per step of the squared local norms (``2 x n_groups`` values), so the ratios
are the ones a single process would compute.

Usage in a training script started with ``torchrun --nproc-per-node 2 train.py``::

    from graftlab import distributed as gd

    env = gd.init_from_env()                       # process group from torchrun's variables
    model = gd.wrap_model(build_model().to(env.device), env, mode="fsdp")   # or "ddp"
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = graftlab.Graft(adam, sgd, names=gd.unwrap(model))
    with Recorder(opt, "trace/"):                 # on every rank: rank 0 writes, the others record nothing
        for x, y in batches:                      # the same global batch on every rank
            x, y = gd.local_rows(x, env), gd.local_rows(y, env)
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    gd.save_checkpoint("ckpt/step-1000", model, opt)   # torch.distributed.checkpoint
    gd.shutdown(env)

Without torchrun the same calls give a one-process run: ``init_from_env`` returns world size 1,
``wrap_model`` returns the model, and the recorder writes.

A run of a built-in task (:mod:`graftlab.runs`) sets up one :class:`Runtime` at its start and asks it
for everything distributed: wrapping the task, whether this rank writes, the mean loss over ranks,
checkpoints.

Modules: :mod:`~graftlab.distributed.env` (device, process group, wrapping),
:mod:`~graftlab.graft.shards` (FSDP2 norm math), :mod:`~graftlab.distributed.checkpoints`
(DCP save/load/resume), :mod:`~graftlab.distributed.runtime` (a run's :class:`Runtime`).
"""
from graftlab.distributed.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_META,
    Checkpoints,
    checkpoint_step,
    checkpoints_for,
    load_checkpoint,
    resume_step,
    save_checkpoint,
)
from graftlab.distributed.env import (
    DEVICES,
    MODES,
    DistEnv,
    barrier,
    current,
    distribute_task,
    global_mean,
    init_from_env,
    is_main,
    launched_by_torchrun,
    local_rows,
    main_only,
    resolve_device,
    setup,
    shutdown,
    unwrap,
    wrap_model,
)
from graftlab.distributed.runtime import Runtime
from graftlab.graft.shards import ShardLayout, shard_layout, step_communication

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_META", "Checkpoints", "checkpoint_step", "checkpoints_for", "load_checkpoint", "resume_step",
    "save_checkpoint", "DEVICES", "MODES", "DistEnv", "barrier", "current", "distribute_task", "global_mean",
    "init_from_env", "is_main", "launched_by_torchrun", "local_rows", "main_only", "resolve_device", "setup",
    "shutdown", "unwrap", "wrap_model", "Runtime", "ShardLayout", "shard_layout", "step_communication",
]
