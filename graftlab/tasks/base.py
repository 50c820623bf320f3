"""What every built-in task provides: a model, seeded batches, a loss and a held-out evaluation."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from torch import Tensor, nn

from graftlab.errors import GraftlabError

S = TypeVar("S")

# The held-out evaluation set is drawn with its own fixed seed, so runs with different training seeds
# are scored on exactly the same examples and masks.
EVAL_SEED = 20240607


class Task:
    """A model on a device plus its data.

    Attributes: ``name``, ``size``, ``model`` (``nn.Module`` on ``device``), ``device``, ``batch_size``,
    ``seed``, ``steps_per_epoch``, ``default_schedule`` (``poly``/``step``/...), ``default_warmup``.

    Usage::

        batches = task.train_batches()
        for step in range(n):
            loss = task.loss(task.model, next(batches))
            ...
        task.evaluate(task.model)   # {"loss": ..., "accuracy": ...}
    """

    name: str = ""
    size: str = ""
    model: nn.Module
    device: torch.device
    batch_size: int
    seed: int
    steps_per_epoch: int
    default_schedule: str = "constant"
    default_warmup: float = 0.0
    # Learning rates that train each task sensibly with each optimizer when the user gives none.
    default_lrs: dict[str, float] = {}

    def train_batches(self) -> Iterator[Any]:
        """A seeded, infinite iterator of training batches on ``device`` (one epoch = one permutation)."""
        gen = torch.Generator().manual_seed(self.seed)
        n = self.num_train
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                yield self.make_batch(order[start : start + self.batch_size], gen)

    def to_device(self, t: Tensor) -> Tensor:
        """Copy a fresh CPU tensor to ``device`` without making the host wait for the GPU."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def default_lr(self, optimizer: str) -> float:
        return self.default_lrs.get(optimizer, 1e-3)

    # Subclasses implement these.
    num_train: int

    # Set-up steps every task's __init__ takes.
    def _start(self, sizes: Mapping[str, S], size: str, batch_size: int, seed: int, device: torch.device) -> S:
        """Keep the run settings; ``sizes[size]``. Raises GraftlabError for a size not in ``sizes``."""
        if size not in sizes:
            raise GraftlabError(f"unknown {self.name} size {size!r}: choose one of {', '.join(sizes)}")
        self.size, self.batch_size, self.seed, self.device = size, batch_size, seed, device
        return sizes[size]

    def _set_train_size(self, num_train: int, what: str) -> None:
        """``num_train`` training examples (``what``: "sequences", "images"), ``steps_per_epoch`` from
        them. Raises GraftlabError when one batch needs more examples than there are."""
        self.num_train = num_train
        if num_train < self.batch_size:
            raise GraftlabError(f"batch size {self.batch_size} exceeds the {num_train} training {what}")
        self.steps_per_epoch = num_train // self.batch_size

    def _seeded_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """``build()`` under the run's seed (the global RNG is left as it was), on ``device``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build()
        return model.to(self.device)

    def make_batch(self, index: Tensor, gen: torch.Generator) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_batches(self) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def correct(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        """Summed loss, number of correct predictions and number of predictions, as device tensors."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out ``loss`` (mean cross-entropy) and ``accuracy``; one host sync at the end."""
        was_training = model.training
        model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self.eval_batches():
            loss_sum, correct, count = self.correct(model, batch)
            total += torch.stack([loss_sum.double(), correct.double(), count.double()])
        model.train(was_training)
        loss_sum, correct, count = total.tolist()
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def info(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
