"""The grafted meta-optimizer M#D (the paper's Section 3, Algorithm 1). See :class:`Graft`."""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from graftlab.graft import build, child_steps, state as graft_state
from graftlab.errors import GraftlabError, check_choice, check_flag
from graftlab.graft.norms import PlainNorms
from graftlab.graft.partition import GRANULARITIES, SPLITS, Granularity, Names, TensorNames
from graftlab.graft.slicing import slicing_of

PATHS = ("auto", "direct", "generic")


class Graft(Optimizer):
    r"""M#D: each step takes its size from ``magnitude`` and its direction from ``direction``, per group.

    For every group :math:`\rho` of a partition of the parameters (the paper's Section 3,
    Algorithm 1, with the granularities of Section 3.1), both children receive the same
    :math:`(w_t, g_t)` and keep their own state, and the grafted step is

    .. math::
        w_{t+1}^{(\rho)} = w_t^{(\rho)} + \frac{\|w_M^{(\rho)} - w_t^{(\rho)}\|}{\|w_D^{(\rho)} - w_t^{(\rho)}\|}
        \,(w_D^{(\rho)} - w_t^{(\rho)}), \qquad w_{t+1}^{(\rho)} = w_t^{(\rho)} \text{ where D's step is zero.}

    A#A behaves as A; M#D behaves as M when D differs from M only by its learning-rate schedule;
    at ``"coordinate"`` granularity SGD#AdaGrad behaves as SGD (Section 3).

    Args:
        magnitude: optimizer M over the model's parameters. Its learning rate is the step size.
        direction: optimizer D over the same tensors (its groups may be arranged differently).
        granularity: ``"layer"`` (default: one group per tensor), ``"global"`` (one group),
            ``"coordinate"`` (one group per element), ``"head"`` (as ``"layer"``, with attention
            Q/K/V weights and biases and the attention output weight one group per head:
            ``<name>[head 3]``, ``<name>[q head 3]`` for fused tensors), ``"vocab"`` (as ``"head"``,
            with the word embedding and output layer one group per ``row_block`` vocabulary rows:
            ``<name>[rows 0-99]``; :mod:`graftlab.graft.slicing`), or a function from parameter
            name to label.
        names: an ``nn.Module`` or ``(name, tensor)`` pairs naming the tensors (extra names, such
            as frozen layers, are allowed). Without it tensors are ``param.0``, ``param.1``, ...
        split: ``"fused"`` (default): at ``"layer"`` granularity a fused tensor graftlab
            recognises (GPT-2's ``attn.c_attn`` weight and bias: Q, K, V thirds of the output
            dimension; :func:`graftlab.graft.slicing.fused_layout`) is grafted as three groups
            ``<name>[q]``, ``<name>[k]``, ``<name>[v]``, each exactly as if it were its own tensor.
            ``None`` keeps whole tensors. Sharded (FSDP) parameters need ``None``.
        path: ``"auto"`` (default), ``"direct"`` or ``"generic"``. The direct path computes each
            child's step from its state without touching the weights (SGD, Adam, AdamW, Adagrad,
            RMSprop as exact classes; see :mod:`graftlab.graft.rules`), so tiny steps keep their
            digits. The generic path serves any optimizer (another Graft too): M steps, the step
            is measured, ``w_t`` is restored, D steps. ``"auto"`` takes the direct path where
            both children allow it and the generic one on steps with sparse gradients.
        heads: for ``"head"``/``"vocab"``: the number of attention heads (an int, or a mapping
            parameter name -> count); default: read from ``names`` (the module's or its config's
            ``num_heads``/``num_attention_heads``/``n_head``/``heads``).
        row_block: for ``"vocab"``: vocabulary rows per group (default 1).
        fused: run direct steps fused (:mod:`graftlab.graft.fused`; like torch.optim's ``fused=``): both
            children's steps and norms in one pass, one write of the weights, no buffer; the
            direct path's results up to rounding. The first step compiles (``torch.compile``,
            minutes for a BERT-sized model on a small CPU; bench/RESULTS.md), so it is off by
            default. Needs direct rules for both children and unsharded parameters.

    The optimizer contract holds as for any ``torch.optim`` optimizer:

    - ``param_groups`` ARE M's groups (the same list): ``param_groups[i]["lr"]`` reads and writes
      M's learning rate, so a scheduler built on the Graft (``LambdaLR(graft, f)``, HF Trainer,
      Lightning) drives the step size exactly as one built on M does. ``defaults`` are M's.
    - :meth:`add_param_group` adds a group to both children and grafts it; groups added to both
      children directly are picked up at the next step.
    - step hooks, state-dict hooks and load-state-dict hooks registered on the Graft fire; the
      children's own step hooks fire on both paths; ``copy.deepcopy`` and ``pickle`` work;
      ``torch.compile(graft.step)`` works from the first step (buffers exist from construction).
    - each child sees the same ``g_t``, and ``p.grad`` is left as the training loop set it: on
      the generic path a child whose ``step`` may edit gradients steps on its own copy.

    Parameters may have any shape and a floating (float16/bfloat16/float32/float64) or complex
    dtype; complex tensors count as pairs of reals, as in torch.optim. Memory: one
    parameter-sized buffer (two at coordinate granularity, one more on the generic path when a
    child's ``step`` comes from outside torch.optim and may edit gradients), allocated at
    construction (again, at the next step, for tensors cast, moved or swapped since); none with
    ``fused=True`` (until a step takes the generic path). A step does no
    host-device synchronisation and allocates nothing parameter-sized.

    Attributes:
        last_stats: ``(3, n_groups)`` tensor, rows ``norm_m``, ``norm_d``, ``ratio`` of the last
            step, on the parameters' device, float32 (float64 for float64 parameters). Norms are
            L2 norms of the steps in parameter units; ``ratio = norm_m / norm_d`` is
            dimensionless and not finite where D's step was zero (the weights are then kept).
        group_names: the names of the ``last_stats`` columns (parameter names at ``"layer"``
            and ``"coordinate"`` granularity, ``"global"``, or the labels of a function).
        steps: the number of grafted steps taken.

    Usage (only the optimizer changes in a training loop; the scheduler may sit on the Graft or
    on M), and ``state_dict()``, which holds both children in torch.optim's format::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Graft(torch.optim.Adam(model.parameters(), lr=1e-3),
        ...             torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names=model)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
        >>> opt.param_groups[0]["lr"]                 # M's lr
        0.001
        >>> model(torch.ones(3, 4)).sum().backward(); opt.step(); opt.zero_grad(); sched.step()
        >>> opt.param_groups is opt.magnitude.param_groups, opt.param_groups[0]["lr"]
        (True, 0.0005)
        >>> opt.last_stats.shape, opt.group_names
        (torch.Size([3, 2]), ('weight', 'bias'))
        >>> sd = opt.state_dict()
        >>> sd.keys()
        dict_keys(['magnitude', 'direction', 'graft'])
        >>> sorted(sd["magnitude"]["state"][0]), sorted(sd["direction"]["state"][0])
        (['exp_avg', 'exp_avg_sq', 'step'], ['momentum_buffer'])
        >>> sd["graft"]
        {'granularity': 'layer', 'groups': ['weight', 'bias'], 'steps': 1}

    Parameters changed after construction are followed, as a torch optimizer follows them:
    ``model.double()``, ``model.to(device)`` (dtype and device of the same Parameter objects: buffers,
    norm dtype, ``last_stats`` and the fused layout are rebuilt at the next step) and tensors swapped
    in the Graft's ``param_groups`` (accelerate, FSDP2: the swap is carried into D's groups, the
    new tensor keeps the old one's group name). The check reads tensor metadata only. A child
    whose state already lives on another device or dtype than its tensor is an error, as it is
    for torch.optim. ``train()``/``eval()`` reach the children that have them (schedule-free).

    Raises:
        GraftlabError: a child that is not an optimizer, a child whose ``step`` needs a closure
            (LBFGS; SAM-style optimizers), the same optimizer twice, children over
            different tensors, an unknown ``granularity`` or ``path``, names that miss an optimized
            tensor, ``path="direct"`` for a child without a direct rule, ``fused=True`` without the
            direct path or with sharded parameters, and at :meth:`step`
            gradients a child is known to refuse (sparse ones for Adam, dense ones for
            SparseAdam, sparse ones with ``path="direct"``); a refused step changes nothing. When
            a child's own ``step()`` raises on the generic path, the weights and ``p.grad`` are
            put back and the error propagates (what the child did to its own state is its own).
    """

    _keeps_gradients = True  # as another Graft's child: p.grad is left as it was found

    def __init__(
        self,
        magnitude: Optimizer,
        direction: Optimizer,
        *,
        granularity: Granularity = "layer",
        names: Names = None,
        path: str = "auto",
        split: Optional[str] = "fused",
        fused: bool = False,
        heads: Any = None,
        row_block: int = 1,
    ) -> None:
        for role, opt in (("magnitude", magnitude), ("direction", direction)):
            if not isinstance(opt, Optimizer):
                raise GraftlabError(f"{role} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        if magnitude is direction:
            raise GraftlabError("magnitude and direction must be two optimizer instances (each keeps its own state)")
        check_choice("path", path, PATHS)
        if not (callable(granularity) or isinstance(granularity, str) and granularity in GRANULARITIES):
            raise GraftlabError(f"{{granularity}} must be one of {', '.join(map(repr, GRANULARITIES))} or a function "
                                f"from parameter name to group label, got {granularity!r}", param="granularity")
        if names is not None and (isinstance(names, (str, bytes, Tensor)) or not isinstance(names, (nn.Module, Iterable))):
            raise GraftlabError("{names} must be the model (an nn.Module), its named_parameters() or None, got "
                                f"{type(names).__name__}", param="names")
        check_choice("split", split, SPLITS)
        check_flag("fused", fused)
        for role, opt in (("magnitude", magnitude), ("direction", direction)):
            if child_steps.needs_closure(opt):
                raise GraftlabError(
                    f"the {role} optimizer {type(opt).__name__} needs a closure in every step (it evaluates the "
                    "loss at weights of its own choosing, several times a step), which has no grafted "
                    "meaning: both children must step from the same (w_t, g_t); choose an optimizer whose "
                    "step takes the gradient as it is")
        self.magnitude = magnitude
        self.direction = direction
        self._granularity = granularity
        self._path_choice = path
        self._split = split
        self._fused_choice = bool(fused)
        self._names = TensorNames(names)
        # head counts and Conv1D layouts come from the module: kept, as the names are
        self._slicing = slicing_of(names, granularity, heads, row_block)
        # a CPU tensor, not an int: torch.compile (2.13) drops Python attribute updates on optimizers
        self._step_count = torch.zeros((), dtype=torch.int64)
        self._zero_grad_calls = 0  # the Recorder tells a skipped step from an accumulating micro-batch by it
        # torch.optim.Optimizer's own set-up minus its param_groups (the Graft's are M's): hooks,
        # the step wrapper that fires them, an (empty) per-parameter state
        Optimizer.__setstate__(self, {"state": defaultdict(dict)})
        self._params: list[Tensor] = []
        self._stats: Optional[Tensor] = None
        build.build(self)
        if self._names.generated and granularity != "global":
            # said now, not when a corrections file or a figure fails to find any layer by name
            warnings.warn(
                f"Graft built without names=: {self._names.generated} parameter tensor(s) are named param.0, "
                "param.1, ... in the groups, the trace and any corrections; pass names=model (or "
                "(name, tensor) pairs) to name them as model.named_parameters() does",
                stacklevel=2,
            )

    # -- the Graft's groups are M's groups ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.magnitude.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.magnitude.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.magnitude.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.magnitude.defaults = value

    # -- public read-only views ------------------------------------------------------------
    @property
    def path(self) -> str:
        """``"direct"`` or ``"generic"``: which path :meth:`step` takes (with dense gradients)."""
        return "generic" if self._rules is None else "direct"

    @property
    def fused(self) -> bool:
        """Whether direct steps run fused (``fused=True``; :mod:`graftlab.graft.fused`)."""
        return self._fused is not None

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.partition.group_names

    @property
    def params(self) -> list[Tensor]:
        """The grafted tensors, in M's order (``partition.param_names`` names them)."""
        return self._params

    @property
    def steps(self) -> int:
        """Number of grafted steps taken (restored by :meth:`load_state_dict`)."""
        return int(self._step_count)

    @property
    def _steps(self) -> int:
        return int(self._step_count)

    @_steps.setter
    def _steps(self, value: int) -> None:  # graftlab.distributed.checkpoints restores it
        self._step_count.fill_(int(value))

    @property
    def last_stats(self) -> Tensor:
        """``(3, n_groups)``: ``norm_m``, ``norm_d``, ``ratio`` of the last step (NaN before the first).

        The same tensor is updated in place every step (a new one when groups are added or the
        parameters are cast or moved).
        """
        return self._stats

    @property
    def _layout(self):
        """The :class:`~graftlab.graft.shards.ShardLayout` when parameters are sharded, else None."""
        return None if isinstance(self._norms, PlainNorms) else self._norms

    # -- optimizer protocol ----------------------------------------------------------------
    @torch._disable_dynamo
    def add_param_group(self, param_group: dict, *, direction: Optional[dict] = None) -> None:
        """Add ``param_group`` to both children and graft its tensors (progressive unfreezing).

        ``param_group`` goes to M as to any optimizer (its options, such as ``lr``, are M's; M's
        defaults fill the rest). D gets the same tensors with its own defaults, updated by the
        options in ``direction``. ``params`` may hold ``(name, tensor)`` pairs, which name new
        groups at layer granularity; a tensor without a name is ``param.<i>`` by its position
        ``i`` among the grafted tensors, as torch numbers them (with ``names=`` given as pairs;
        a module given as ``names=`` must name it). Raises GraftlabError for a malformed group or tensors the
        optimizers already hold; nothing changes then.
        """
        m_group, d_group = build.children_groups(self, param_group, direction or {})
        self.magnitude.add_param_group(m_group)
        try:
            self.direction.add_param_group(d_group)
        except BaseException:
            self.magnitude.param_groups.pop()
            raise
        try:
            build.build(self)
        except BaseException:
            self.magnitude.param_groups.pop()
            self.direction.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad`` (over M's groups: the same tensors as D's)."""
        self._zero_grad_calls = getattr(self, "_zero_grad_calls", 0) + 1
        super().zero_grad(set_to_none)

    def train(self) -> None:
        """Put the children that have a train mode in it (schedule-free optimizers: their step
        refuses to run otherwise), M first. accelerate's ``AcceleratedOptimizer`` and the HF Trainer
        call it when the optimizer they hold has it."""
        self._children_call("train")

    def eval(self) -> None:
        """Put the children that have an eval mode in it (schedule-free optimizers swap the weights
        to their averaged iterate), M first; :meth:`train` undoes it. Only one child should move
        the weights this way: both would move the same tensors from their own averages."""
        self._children_call("eval")

    def _children_call(self, method: str) -> None:
        for child in (self.magnitude, self.direction):
            fn = getattr(child, method, None)
            if callable(fn):
                fn()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One grafted step. A ``closure`` is evaluated once, before the children step, and the
        children step on the gradients it left (so ``step(closure)`` is ``closure(); step()``).
        Children that need a closure of their own (LBFGS, SAM) are refused at construction.

        Before stepping, the Graft checks from tensor metadata (no host sync) that its children's
        groups hold the tensors, dtypes and devices it was built for, and follows a change
        (:mod:`graftlab.graft.build`). Raises GraftlabError, before anything changes, for gradients
        a child is known to refuse or a change it cannot follow.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._grafted_step()
            self._step_count.add_(1)
        return loss

    def _grafted_step(self) -> None:
        """Child steps -> group norms -> combine: the one sequence of every path and layout."""
        if build.changed(self):
            build.build(self)
        direct = child_steps.takes_direct_path(self)
        if direct and self._fused is not None:
            return child_steps.fused(self)
        params = self._norms.locals(self._params)  # fetched per step: FSDP may swap local tensors
        if direct:
            part_m, part_d, step = self._child_norms(params, direct)
        else:
            grads = child_steps.save(self, params)
            try:
                part_m, part_d, step = self._child_norms(params, direct, grads)
            except BaseException:
                torch._foreach_copy_(params, self._buf)  # w_t
                raise
            finally:
                child_steps.restore_grads(self._params, grads)
        factors = self._factors(*self._norms.finish(part_m, part_d))
        self._combine(params, step, factors, direct)

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """``{"magnitude": M.state_dict(), "direction": D.state_dict(), "graft": {...}}`` (see the
        class docstring); state-dict pre- and post-hooks registered on the Graft fire."""
        return graft_state.state_dict(self)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both children and the step count; load-state-dict hooks on the Graft fire.

        Raises GraftlabError, before either child changes, for a dict that is not a Graft's or
        was saved with another partition or other parameter groups.
        """
        graft_state.load_state_dict(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return graft_state.getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)  # hooks are not copied, as for torch.optim optimizers
        self._params = []
        build.build(self)

    def __repr__(self) -> str:
        return (
            f"Graft({type(self.magnitude).__name__}#{type(self.direction).__name__}, "
            f"granularity={self.partition.granularity!r}, groups={len(self.group_names)}, path={self.path!r}"
            + (", fused=True)" if self.fused else ")")
        )

    # -- the step: child steps -> group norms -> combine ----------------------------------------
    def _child_norms(self, params: list[Tensor], direct: bool, grads=None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Both children's steps and their group norms; returns the partial norms and D's step."""
        real = child_steps.real_views if self._complex else list
        step = self._child_step(self.magnitude, 0, params, direct, grads)
        part_m = self._group_norms(real(step))
        if self.partition.elementwise:
            abs_m = real(self._abs_m)
            torch._foreach_copy_(abs_m, real(step))
            torch._foreach_abs_(abs_m)
        step = self._child_step(self.direction, 1, params, direct, grads)
        return part_m, self._group_norms(real(step)), step

    def _child_step(self, opt: Optimizer, which: int, params, direct: bool, grads) -> list[Tensor]:
        if direct:
            return child_steps.direct(self, opt, self._rules[which], self._buf)
        return child_steps.generic(self, opt, params, first=which == 0, grads=grads)

    def _group_norms(self, steps: list[Tensor]) -> Tensor:
        """What this process knows of each group's norm (the norm itself unless sharded); ``steps``
        has one tensor per parameter (slices of split tensors are taken by the norm seam)."""
        return self._norms.partial(steps)

    def _factors(self, norm_m: Tensor, norm_d: Tensor) -> Tensor:
        """Store the step's norms; ``(n_tensors,)``: each tensor's scale factor (0 where D's step is zero)."""
        self._stats[0].copy_(norm_m)
        self._stats[1].copy_(norm_d)
        torch.div(norm_m, norm_d, out=self._stats[2])
        factor = torch.where(norm_d > 0, self._stats[2], 0.0)
        return factor if self._index is None else factor[self._index]

    def _combine(self, params: list[Tensor], step: list[Tensor], factor: Tensor, direct: bool) -> None:
        """w_{t+1} = w_t + factor * D's step (per coordinate: |M's step| * sign(D's step)); ``factor``:
        ``(n_tensors,)`` or, for split tensors, ``(n_units,)``."""
        real = child_steps.real_views if self._complex else list
        plan = self._plan  # split tensors: one factor per unit (a head, a row block, a Q/K/V third)
        if plan is not None:
            if direct:
                plan.addcmul_(real(params), real(step), factor)
                return
            plan.mul_(real(step), factor)  # the units cover every tensor: the add is on whole tensors
            torch._foreach_add_(real(params), real(self._buf))
            return
        factors = list(factor.unbind())
        params, step = real(params), real(step)
        if self.partition.elementwise:
            torch._foreach_sign_(step)  # sign(0) == 0 keeps w_t where D does not move
            if direct:
                torch._foreach_addcmul_(params, step, real(self._abs_m))
                return
            torch._foreach_mul_(step, real(self._abs_m))
        elif direct:
            torch._foreach_addcmul_(params, step, factors)  # one pass over the weights
            return
        else:
            torch._foreach_mul_(step, factors)
        torch._foreach_add_(params, real(self._buf))  # generic: step lives in params, w_t in the buffer
