"""Which optimizer step a value given to :meth:`graftlab.Recorder.log` belongs to.

A logged value belongs to the step it was computed for, and a step that did not happen is never
another step's row. In the documented loop (``loss.backward(); opt.step(); opt.zero_grad();
rec.log(loss=...)``) three things can come between two steps:

- the step ran: the values logged after it go to its row (a value logged twice keeps the last),
  until the gradients change (another backward, a ``zero_grad``): later values are another batch's;
- the step was skipped and its gradients discarded (``GradScaler`` found inf/NaN and did not call
  ``step()``; the loop then called ``zero_grad``, or the gradients are gone): the values logged for
  it are dropped. No row is written for a step that did not happen;
- the gradients were kept for the next step (gradient accumulation: accelerate's non-sync
  micro-batches, where its ``step()`` and ``zero_grad()`` do nothing, or a loop that steps every
  k-th batch): the values wait, and the step they accumulate into gets their mean together with the
  value logged after it. For a loss that is the mean loss over the step's micro-batches: the loss
  of the batch whose mean gradient the step took, and what the HF Trainer logs for the step.

Telling these apart costs no host sync: ``Graft.zero_grad`` counts its calls, a backward pass
bumps the version counter of the gradient it accumulates into, and whether any grafted tensor still
has a gradient is read from ``p.grad is None``.
"""
from __future__ import annotations

from typing import Any, Optional

from graftlab.errors import GraftlabError


def scalar(key: str, value: Any) -> Any:
    """``value`` as the Recorder keeps it: a one-element tensor (detached, 0-d) or a float.

    Raises GraftlabError for a tensor of more than one element or a value that is not a number.
    """
    if hasattr(value, "numel") and hasattr(value, "detach"):
        if value.numel() != 1:
            raise GraftlabError(f"logged {key!r} must be a scalar, got shape {tuple(value.shape)}")
        return value.detach().reshape(())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GraftlabError(f"logged {key!r} must be a number or a one-element tensor, "
                            f"got {type(value).__name__}") from None


def _mean(values: list) -> Any:
    total = values[0]
    for v in values[1:]:
        total = total + v  # a tensor stays on its device: no host sync
    return total / len(values) if len(values) > 1 else total


class StepLog:
    """The Recorder's bookkeeping of logged values between steps (see the module docstring)."""

    def __init__(self, graft: Any) -> None:
        self.graft = graft
        self.row: Optional[int] = None  # the buffer row of the last step (None: not recorded)
        self.open = False  # values logged now belong to the last step
        self.logged = False  # something was logged for the last step
        self.carried: dict[str, list] = {}  # micro-batch values the last step took over
        self.pending: dict[str, list] = {}  # micro-batch values waiting for the next step
        self._zero_grads = self._calls()
        self._pending_zero_grads = self._zero_grads
        self._token = self._gradient_token()

    def _calls(self) -> int:
        return getattr(self.graft, "_zero_grad_calls", 0)

    def _gradient_token(self) -> Optional[tuple[int, int]]:
        """Which gradient the first grafted tensor with one holds, and its version: another backward
        pass changes it (accumulating in place bumps the version)."""
        g = next((p.grad for p in self.graft.params if p.grad is not None), None)
        return None if g is None else (id(g), getattr(g, "_version", 0))

    def _gradients_gone(self) -> bool:
        return all(p.grad is None for p in self.graft.params)

    def before_step(self) -> None:
        """A step is about to run: values waiting since gradients were discarded are not its own."""
        if self.pending and self._calls() != self._pending_zero_grads:
            self.pending = {}

    def stepped(self, row: Optional[int]) -> dict[str, Any]:
        """A step ran (recorded in ``row``, or not recorded: None); returns the means of the
        micro-batch values it takes over, to put in its row."""
        self.row, self.open, self.logged = row, True, False
        self.carried, self.pending = self.pending, {}
        return {k: _mean(v) for k, v in self.carried.items()}

    def flushed(self) -> None:
        """The buffer was handed to the writer: the last step's row is no longer there."""
        self.row = None

    def place(self, scalars: dict[str, Any]) -> dict[str, Any]:
        """Where ``scalars`` (checked with :func:`scalar`) go: returns the values to put in
        :attr:`row` now (empty when they wait for the next step or are dropped)."""
        calls, token = self._calls(), self._gradient_token()
        changed = calls != self._zero_grads or token != self._token
        self._token = token
        if not self.open or (self.logged and changed):  # another batch than the step's own
            self.open = False
            if calls != self._zero_grads or self._gradients_gone():  # its step was skipped: drop
                self.pending = {}
            else:  # accumulating into the next step
                for k, v in scalars.items():
                    self.pending.setdefault(k, []).append(v)
                self._pending_zero_grads = calls
            self._zero_grads = calls
            return {}
        self._zero_grads = calls
        self.logged = True
        return {k: _mean([*self.carried.get(k, ()), v]) for k, v in scalars.items()}
