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
    with gd.main_only(Recorder, opt, "trace/"):   # rank 0 writes, the others get a no-op
        for x, y in batches:                      # the same global batch on every rank
            x, y = gd.local_rows(x, env), gd.local_rows(y, env)
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    gd.save_checkpoint("ckpt/step-1000", model, opt)   # torch.distributed.checkpoint
    gd.shutdown(env)

Without torchrun the same calls give a one-process run: ``init_from_env`` returns world size 1,
``wrap_model`` returns the model, ``main_only`` builds the recorder.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from graftlab.errors import GraftlabError

MODES = ("none", "ddp", "fsdp")
CHECKPOINT_FORMAT = "graftlab.checkpoint/1"
CHECKPOINT_META = "graftlab.json"

_AVAILABLE = torch.distributed.is_available()
if _AVAILABLE:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
else:  # builds without distributed support: nothing here can be sharded
    dist = None
    DTensor = ()  # isinstance(x, ()) is always False


# ---------------------------------------------------------------------------------------------
# process group and model wrapping
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, the ``backend``.

    ``backend`` is None for a plain one-process run.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on the rank that writes traces, checkpoints' metadata and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: Optional[str] = None, backend: Optional[str] = None) -> DistEnv:
    """Join the process group torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    ``device`` is ``"cpu"``, ``"cuda"`` (becomes ``cuda:<LOCAL_RANK>``) or None (CUDA when
    available). The backend defaults to NCCL on CUDA and gloo on CPU. Outside torchrun this joins
    nothing and returns a one-process :class:`DistEnv`.
    """
    auto = device in (None, "auto")
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu") if auto else torch.device(device)
    if want.type == "cuda" and not torch.cuda.is_available():
        raise GraftlabError("--device cuda was asked for but no CUDA device is available")
    if not launched_by_torchrun():
        return _set_current(DistEnv(device=want))
    if not _AVAILABLE:
        raise GraftlabError("this PyTorch build has no torch.distributed support")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if want.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GraftlabError(f"local rank {local} has no GPU: only {torch.cuda.device_count()} visible")
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    backend = backend or ("nccl" if want.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": want} if want.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
        atexit.register(_leave)
    return _set_current(DistEnv(rank, world, local, want, backend))


_CURRENT = DistEnv()


def _set_current(env: DistEnv) -> DistEnv:
    global _CURRENT
    _CURRENT = env
    return env


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """This process's device; under torchrun also joins the process group (once).

    The one call a training entry point needs before building its model: ``"auto"``/``"cuda"``
    become ``cuda:<LOCAL_RANK>`` under torchrun, and everything else in this module then sees the
    group through :func:`current`. Outside torchrun it is :func:`graftlab.tasks.resolve_device`.
    """
    from graftlab.tasks import resolve_device

    dev = resolve_device(device)
    if not launched_by_torchrun():
        return dev
    env = _CURRENT if _CURRENT.distributed else init_from_env(dev.type)
    return env.device


def current() -> DistEnv:
    """The :class:`DistEnv` of the last :func:`init_from_env` (one CPU process before any)."""
    return _CURRENT


def shutdown(env: Optional[DistEnv] = None) -> None:
    """Leave the process group joined by :func:`init_from_env` (a no-op for one process)."""
    env = env or _CURRENT
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _set_current(DistEnv())


def wrap_model(
    model: nn.Module,
    env: DistEnv,
    mode: str = "ddp",
    *,
    shard: Optional[Callable[[nn.Module], bool]] = None,
) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for data-parallel training.

    ``mode="ddp"``: ``DistributedDataParallel`` (parameters replicated, gradients all-reduced).
    ``mode="fsdp"``: FSDP2 ``fully_shard``, in place: every module for which ``shard(module)`` is
    true is sharded as one unit, then the root. By default the units are the root's children and
    the elements of any ``nn.ModuleList`` / ``nn.Sequential`` among them (transformer blocks).
    ``mode="none"`` or a one-process ``env`` returns ``model`` unchanged. Build the optimizers on
    the returned module's parameters, after wrapping.
    """
    if mode not in MODES:
        raise GraftlabError(f"unknown parallel mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none" or not env.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if env.device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm is GPU-only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # FSDP2 warns at every forward whose output is a view; graftlab's tasks never write into outputs
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    units = [m for m in model.modules() if m is not model and shard(m)] if shard else _default_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _default_units(model: nn.Module) -> list[nn.Module]:
    units = []
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            units.extend(c for c in child.children() if any(True for _ in c.parameters()))
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place: the module itself).

    Its ``named_parameters()`` names are the single-process names, which is what ``Graft(names=)``
    and the trace should carry.
    """
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def local_rows(batch: Any, env: DistEnv) -> Any:
    """This rank's contiguous share of a global batch (tensors split on dim 0; tuples, lists and
    dicts recursively). Every rank draws the same global batch and keeps its rows, so the run sees
    exactly the batches a one-process run with the same global batch size sees."""
    if not env.distributed or env.world_size == 1:
        return batch
    if isinstance(batch, Tensor):
        n = batch.shape[0]
        if n % env.world_size:
            raise GraftlabError(f"global batch size {n} is not divisible by the {env.world_size} processes")
        k = n // env.world_size
        return batch[env.rank * k : (env.rank + 1) * k]
    if isinstance(batch, (tuple, list)):
        return type(batch)(local_rows(b, env) for b in batch)
    if isinstance(batch, dict):
        return {k: local_rows(v, env) for k, v in batch.items()}
    return batch


def distribute_task(task: Any, mode: str = "ddp", env: Optional[DistEnv] = None) -> nn.Module:
    """Make a built-in task (:mod:`graftlab.tasks`) data-parallel, in place; returns the user's module.

    ``task.model`` becomes the wrapped model (build the optimizers on it after this call) and
    ``task.train_batches()`` yields this rank's rows of the same global batches, so the run sees
    what a one-process run with ``task.batch_size`` sees. Name groups and kinds after the returned
    module (``Graft(..., names=distribute_task(task))``). A one-process env changes nothing.
    """
    env = env or _CURRENT
    inner = unwrap(task.model)
    if mode == "none" or not env.distributed:
        wrap_model(inner, env, mode)  # validates mode
        return inner
    if task.batch_size % env.world_size:
        raise GraftlabError(f"batch size {task.batch_size} is not divisible by the {env.world_size} processes")
    task.model = wrap_model(inner, env, mode)
    global_batches = task.train_batches

    def train_batches():
        for b in global_batches():
            yield local_rows(b, env)

    task.train_batches = train_batches
    return inner


def global_mean(value: Tensor, env: Optional[DistEnv] = None) -> Tensor:
    """Mean over ranks of a per-rank tensor (local losses): one all-reduce, no host sync.
    With equal local batch sizes this is the global-batch mean. Every rank must call it."""
    env = env or _CURRENT
    if not env.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out.div_(env.world_size)


class _Nothing(contextlib.AbstractContextManager):
    """Stands in for a recorder on ranks that record nothing."""

    def __exit__(self, *exc: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def is_main() -> bool:
    """True on global rank 0, or when no process group is running."""
    return not (_AVAILABLE and dist.is_initialized()) or dist.get_rank() == 0


def main_only(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` on rank 0; a do-nothing stand-in elsewhere.

    ``with main_only(Recorder, graft, path): ...`` makes rank 0 the only writer: the other ranks
    attach no hook and pay nothing per step. Under DDP every rank's stats are equal, and under
    FSDP2 the all-reduce makes them equal, so rank 0's trace is the run's trace.
    """
    return factory(*args, **kwargs) if is_main() else _Nothing()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    _barrier()


# ---------------------------------------------------------------------------------------------
# sharded parameters inside Graft
# ---------------------------------------------------------------------------------------------
def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class ShardLayout:
    """How a :class:`~graftlab.Graft`'s tensors are spread over ranks, and their whole norms.

    ``Graft`` builds one when any parameter is a ``DTensor``. Every rank squares the norms of its
    local pieces, sums them per group, and one all-reduce of the stacked ``(2, n_groups)`` M and D
    sums gives every rank the squared norms of the whole groups. A tensor replicated along a mesh
    dimension (a plain tensor, or a ``Replicate`` placement) contributes only on coordinate 0 of
    that dimension, so it is counted once.
    """

    def __init__(self, params: Sequence[Tensor], tensor_group: Sequence[int], n_groups: int, dtype: torch.dtype):
        meshes: list = []
        for p in params:  # equal meshes may be distinct objects (one per fully_shard call)
            if isinstance(p, DTensor) and not any(p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
        if len(meshes) != 1:
            raise GraftlabError("all sharded parameters of one Graft must live on one device mesh")
        mesh = meshes[0]
        coords = mesh.get_coordinate()
        if coords is None:
            raise GraftlabError("this rank is not part of the parameters' device mesh")
        if mesh.ndim == 1:
            self.group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            self.group = None  # the whole world is the mesh
        else:
            raise GraftlabError("a multi-dimensional device mesh must span all ranks")
        own = []
        for p in params:
            if isinstance(p, DTensor):
                if any(pl.is_partial() for pl in p.placements):
                    raise GraftlabError("a parameter with a Partial placement cannot be grafted")
                own.append(all(c == 0 or pl.is_shard() for c, pl in zip(coords, p.placements)))
            else:
                own.append(all(c == 0 for c in coords))
        device = _local(params[0]).device
        self.mesh = mesh
        self.dtype = dtype
        self.n_groups = n_groups
        self.grouped = list(tensor_group) != list(range(len(params)))
        self.index = torch.tensor(list(tensor_group), device=device)
        self.mask = None if all(own) else torch.tensor(own, dtype=dtype, device=device)

    @staticmethod
    def locals(tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's local piece (the tensor itself when it is not a DTensor); in-place ops on
        a piece update the DTensor."""
        return [_local(t) for t in tensors]

    def group_sq(self, steps: Sequence[Tensor]) -> Tensor:
        """Per-group sums of this rank's squared local norms of ``steps`` (local tensors)."""
        per = torch.stack(torch._foreach_norm(steps, 2, dtype=self.dtype))
        per = per * per
        if self.mask is not None:
            per.mul_(self.mask)
        if not self.grouped:
            return per
        sq = torch.zeros(self.n_groups, device=per.device, dtype=self.dtype)
        return sq.index_add_(0, self.index, per)

    def norms(self, sq_m: Tensor, sq_d: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-group norms of M's and D's steps: ONE all-reduce of ``2 x n_groups`` values."""
        both = torch.stack((sq_m, sq_d))
        dist.all_reduce(both, group=self.group)
        both.sqrt_()
        return both[0], both[1]

    def run_rule(
        self,
        rule: Callable,
        group: dict,
        params: list[Tensor],
        states: list[dict],
        out: list[Tensor],
        scratch: Callable[[], list[Tensor]],
    ) -> None:
        """Run a direct update rule (:mod:`graftlab.updates`) on local pieces.

        The rule sees local parameters, gradients and state; state it creates is stored back as
        DTensors placed like their parameter, as ``torch.optim`` keeps it, so state dicts (and
        ``torch.distributed.checkpoint``) see the same thing on the direct and generic paths.
        """
        local_states = [{k: _local(v) if isinstance(v, Tensor) else v for k, v in s.items()} for s in states]
        rule(group, self.locals(params), self.locals([p.grad for p in params]), local_states, out, scratch)
        for p, s, ls in zip(params, states, local_states):
            for k, v in ls.items():
                old = s.get(k)
                if v is old or (isinstance(old, DTensor) and old._local_tensor is v):
                    continue  # updated in place
                if isinstance(p, DTensor) and isinstance(v, Tensor) and k != "step":
                    v = DTensor.from_local(
                        v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                s[k] = v


def shard_layout(params: Sequence[Tensor], tensor_group: Sequence[int], n_groups: int, dtype: torch.dtype):
    """A :class:`ShardLayout` when any of ``params`` is a DTensor, else None (the plain path)."""
    if not _AVAILABLE or not any(isinstance(p, DTensor) for p in params):
        return None
    return ShardLayout(params, tensor_group, n_groups, dtype)


def step_communication(graft: Any) -> dict[str, Any]:
    """What one ``graft.step()`` sends between ranks, on top of the model's own collectives.

    >>> step_communication(opt)
    {'collectives': 1, 'op': 'all_reduce', 'numel': 24, 'bytes': 96, 'dtype': 'torch.float32'}

    Replicated parameters (DDP or one process) need nothing: ``collectives`` is 0.
    """
    graft.last_stats  # the layout is built with the buffers
    layout = getattr(graft, "_layout", None)
    if layout is None:
        return {"collectives": 0, "op": None, "numel": 0, "bytes": 0, "dtype": None}
    numel = 2 * layout.n_groups
    size = torch.empty((), dtype=layout.dtype).element_size()
    return {"collectives": 1, "op": "all_reduce", "numel": numel, "bytes": numel * size, "dtype": str(layout.dtype)}


# ---------------------------------------------------------------------------------------------
# checkpoints through torch.distributed.checkpoint
# ---------------------------------------------------------------------------------------------
PathLike = Union[str, os.PathLike]


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.optim.Optimizer], Optional[dict]]:
    from graftlab.graft import Graft

    if isinstance(optimizer, Graft):
        for role, child in (("magnitude", optimizer.magnitude), ("direction", optimizer.direction)):
            if isinstance(child, Graft):
                raise GraftlabError(f"checkpoints of a Graft whose {role} is itself a Graft are not supported")
        meta = optimizer.state_dict()["graft"]
        return {"magnitude": optimizer.magnitude, "direction": optimizer.direction}, meta
    return {"optimizer": optimizer}, None


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` and ``optimizer`` (a :class:`~graftlab.Graft` or any optimizer) to the
    directory ``path`` with ``torch.distributed.checkpoint``; every rank calls it.

    Each rank writes its own shards, replicated tensors are written once, and the checkpoint loads
    on any number of processes (:func:`load_checkpoint`), one included. ``extra`` (JSON: step,
    scheduler state, config) goes to ``graftlab.json`` beside the shards, written by rank 0.
    An existing ``path`` is an error unless ``overwrite``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    if is_main() and path.exists():
        if not overwrite:
            raise GraftlabError(f"checkpoint {path} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _barrier()
    model = unwrap(model)
    children, graft_meta = _optimizer_parts(optimizer)
    state = {"model": get_model_state_dict(model)}
    for role, child in children.items():
        state[role] = get_optimizer_state_dict(model, child)
    if extra is not None:
        try:
            extra_json = json.dumps(extra)
        except TypeError as e:
            raise GraftlabError(f"checkpoint extra must be JSON-serializable: {e}") from None
    with _one_process_quiet():
        dcp.save(state, checkpoint_id=str(path))
    if is_main():
        world = dist.get_world_size() if _AVAILABLE and dist.is_initialized() else 1
        meta = {"format": CHECKPOINT_FORMAT, "world_size": world, "graft": graft_meta, "parts": sorted(state)}
        if extra is not None:
            meta["extra"] = json.loads(extra_json)
        tmp = path / (CHECKPOINT_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / CHECKPOINT_META)  # a checkpoint is complete once this file exists
    _barrier()
    return path


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``), in place.

    The model and optimizer may be wrapped or sharded differently and run on a different number of
    processes than when saved. Returns the checkpoint's metadata (``extra`` holds what was saved
    with it). Every rank calls it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    meta_file = path / CHECKPOINT_META
    if not meta_file.is_file():
        raise GraftlabError(f"{path} is not a complete graftlab checkpoint (no {CHECKPOINT_META})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise GraftlabError(f"unreadable checkpoint metadata {meta_file}: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise GraftlabError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    model = unwrap(model)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    children, graft_meta = ({}, None) if optimizer is None else _optimizer_parts(optimizer)
    if optimizer is not None:
        if set(children) != set(meta["parts"]) - {"model"}:
            raise GraftlabError(
                f"{path} holds optimizer parts {sorted(set(meta['parts']) - {'model'})}, "
                f"the optimizer given has {sorted(children)}"
            )
        if graft_meta is not None and (
            meta["graft"]["granularity"] != graft_meta["granularity"] or meta["graft"]["groups"] != graft_meta["groups"]
        ):
            raise GraftlabError(f"{path} was saved with a different grafting partition (granularity or groups)")
    for role, child in children.items():
        state[role] = get_optimizer_state_dict(model, child)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    for role, child in children.items():
        set_optimizer_state_dict(model, child, state[role])
    if graft_meta is not None:
        optimizer._steps = int(meta["graft"]["steps"])
    return meta


def _barrier() -> None:
    if _AVAILABLE and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _one_process_quiet():
    """A one-process save or load is intended here: silence DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class Checkpoints:
    """Periodic checkpoints of a run in ``directory/step-<8 digits>``, and resuming from the newest.

    Usage in a training loop (every rank makes the same calls)::

        ckpt = Checkpoints("runs/ckpt", model, opt, scheduler, every=500)
        start = ckpt.resume() if resume else 0     # steps already done (0: nothing to resume)
        for step in range(start, steps):
            ...; opt.step(); scheduler.step()
            ckpt.maybe_save(step + 1)

    The scheduler (a ``LambdaLR`` or any scheduler that derives the lr from ``last_epoch``) is put
    back at the saved step; the optimizer's learning rates come back with its state. Only the
    ``keep`` newest checkpoints are kept. A checkpoint saved by N processes resumes on any number.
    """

    def __init__(
        self,
        directory: PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        every: int = 0,
        keep: int = 2,
    ) -> None:
        if every < 0 or keep < 1:
            raise GraftlabError(f"checkpoint every must be >= 0 and keep >= 1, got {every} and {keep}")
        self.directory = Path(directory)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.keep = int(every), int(keep)

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*") if (p / CHECKPOINT_META).is_file())

    def latest(self) -> Optional[Path]:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, extra: Optional[dict] = None) -> Path:
        last_epoch = getattr(self.scheduler, "last_epoch", None)
        path = save_checkpoint(
            self.path(step), self.model, self.optimizer,
            extra={"step": int(step), "scheduler_last_epoch": last_epoch, **(extra or {})}, overwrite=True,
        )
        if is_main():
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return path

    def maybe_save(self, done: int, last: bool = False) -> Optional[Path]:
        """Save when ``done`` (steps completed) is a multiple of ``every``, or on the ``last`` step."""
        if (self.every and done % self.every == 0) or last:
            return self.save(done)
        return None

    def resume(self, path: Optional[PathLike] = None) -> int:
        """Load ``path`` (default: the newest checkpoint) and return the steps it had done; 0 when
        there is nothing to resume from."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            return 0
        meta = load_checkpoint(path, self.model, self.optimizer)
        extra = meta.get("extra") or {}
        step = int(extra.get("step", 0))
        last_epoch = extra.get("scheduler_last_epoch")
        if self.scheduler is not None and last_epoch is not None:
            self.scheduler.last_epoch = int(last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]
        return step


def checkpoints_for(config: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None):
    """``(Checkpoints or None, steps already done)`` for a run configured with ``checkpoint_dir``,
    ``checkpoint_every`` and ``resume`` (the fields of ``TrainConfig`` / ``RecordConfig``); loads
    the newest checkpoint when resuming. Without ``checkpoint_dir``: ``(None, 0)``."""
    directory = getattr(config, "checkpoint_dir", None)
    every = int(getattr(config, "checkpoint_every", 0) or 0)
    resume = bool(getattr(config, "resume", False))
    if directory is None:
        if every or resume:
            raise GraftlabError("--checkpoint-every and --resume need --checkpoint-dir")
        return None, 0
    ckpt = Checkpoints(directory, model, optimizer, scheduler, every=every)
    first = ckpt.resume() if resume else 0
    steps = getattr(config, "steps", None)
    if steps is not None and first >= steps:
        raise GraftlabError(f"{ckpt.latest()} has done {first} steps already: the run asks for {steps}")
    return ckpt, first


def resume_step(config: Any) -> int:
    """Steps done by the newest checkpoint a resumed run would load (0 when not resuming or none);
    reads only ``graftlab.json``, so a recorder can be opened at the right step before the run."""
    directory = getattr(config, "checkpoint_dir", None)
    if directory is None or not getattr(config, "resume", False):
        return 0
    latest = Checkpoints(directory, None, None).latest()
    if latest is None:
        return 0
    return int((json.loads((latest / CHECKPOINT_META).read_text()).get("extra") or {}).get("step", 0))
