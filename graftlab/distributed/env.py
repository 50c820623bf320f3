"""The process group, this process's place in it, and data-parallel model wrapping.

See :mod:`graftlab.distributed` for the usage in a torchrun script.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from graftlab.errors import GraftlabError

MODES = ("none", "ddp", "fsdp")
DEVICES = ("cpu", "cuda", "auto")

_AVAILABLE = torch.distributed.is_available()
if _AVAILABLE:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
else:  # builds without distributed support: nothing here can be sharded
    dist = None
    DTensor = ()  # isinstance(x, ()) is always False


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"`` (or None) -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a GraftlabError."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GraftlabError("device 'cuda' was asked for but PyTorch sees no CUDA GPU")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise GraftlabError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")


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
    want = resolve_device(device)
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
    group through :func:`current`. Outside torchrun it is :func:`resolve_device`.
    """
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
    """True on global rank 0: of the process group, or before one is joined, of the launcher's
    ``RANK`` (torchrun, accelerate launch); True for a plain one-process run."""
    if _AVAILABLE and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", "").strip()
    return not rank.isdigit() or int(rank) == 0


def main_only(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` on rank 0; a do-nothing stand-in elsewhere.

    ``with main_only(Recorder, graft, path): ...`` makes rank 0 the only writer: the other ranks
    attach no hook and pay nothing per step. Under DDP every rank's stats are equal, and under
    FSDP2 the all-reduce makes them equal, so rank 0's trace is the run's trace.
    """
    return factory(*args, **kwargs) if is_main() else _Nothing()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if _AVAILABLE and dist.is_initialized():
        dist.barrier()


