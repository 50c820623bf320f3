"""The fused direct grafted step: two passes over memory instead of two optimizer steps.

``M.step(); D.step()`` with torch's fused kernels reads the gradient twice and writes the weights
twice; the direct path of :class:`~graftlab.Graft` (see :mod:`graftlab.graft.rules`) builds each child's
step in a buffer with foreach ops, about 20 passes over parameter-sized memory for Adam#SGD. The
grafted step of the paper's Algorithm 1 needs much less::

    pass 1, per tensor: advance M's and D's state from the gradient and reduce ||step_M||^2 and
                        ||step_D||^2 (the steps themselves are never stored)
    between passes:     group norms, ratios and per-tensor factors (a few ops on G numbers)
    pass 2, per tensor: recompute D's step from its advanced state and write w += factor * step_D
                        (coordinate granularity: w += |step_M| * sign(step_D), Section 3.1)

so each state tensor is read and written once, the weights once, and no parameter-sized buffer is
needed at all. The per-tensor math below is plain tensor code, identical in result to
:mod:`graftlab.graft.rules` (same state keys, same step counters, float rounding aside). With
``compile=True`` each pass over a bucket of up to ``bucket_size`` tensors is one ``torch.compile``d
function (inductor: one C++ loop nest on CPU, Triton kernels on a GPU) with dynamic sizes, so the
one-off compile costs the same for any model size; a bucket is compiled once per distinct set of
optimizer flags (momentum, nesterov, amsgrad, ...), not per tensor. Hyperparameters (learning rates
from schedulers, bias corrections) enter as a small tensor of scalars, never as constants, so they
never trigger a recompile. Under an outer ``torch.compile`` the same code runs uncompiled and is
traced into the caller's graph.

Usage (what :class:`~graftlab.Graft` does with ``fused=True``)::

    fused = FusedDirect(adam, sgd, params)          # both children over the same ``params``
    sq = fused.squared_norms()                      # (2, n_tensors); advances both children's states
    factors = ...                                   # group norms, ratios: (n_tensors,) factors
    fused.apply(factors)                            # w += factor * step_D, in place
"""
from __future__ import annotations

import types
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor
from torch.optim import Optimizer

from graftlab.graft import rules as updates
from graftlab.errors import GraftlabError
from graftlab.graft.fused_rules import KINDS, RULES, Flags, flags_of, init_states, scalars, state_keys

# -- the two passes over a bucket of tensors --------------------------------------------------------
def _passes(fm: Flags, fd: Flags, norm_dtype: torch.dtype, elementwise: bool):
    rule_m, rule_d = RULES[fm.kind], RULES[fd.kind]

    def norms(gs, ps, gs_d, ps_d, sm, sd, scal_m, scal_d):
        # ``gs_d``, ``ps_d`` are second views of the gradients and weights. inductor fuses a child's
        # state write with the reduction of its step into one loop per tensor, but seeing both children
        # read one buffer it first merges their state writes into one loop and then keeps one child's
        # step in a parameter-sized temporary for its reduction. Read through distinct (aliasing,
        # read-only) inputs, each child gets its own loop and nothing parameter-sized is allocated.
        out_m = [rule_m(fm, g, p, s, r, True).to(norm_dtype).square().sum() for g, p, s, r in zip(gs, ps, sm, scal_m)]
        out_d = [rule_d(fd, g, p, s, r, True).to(norm_dtype).square().sum() for g, p, s, r in zip(gs_d, ps_d, sd, scal_d)]
        return torch.stack([torch.stack(out_m), torch.stack(out_d)])

    def write(gs, ps, sm, sd, scal_m, scal_d, factors):
        for i in range(len(gs)):
            step = rule_d(fd, gs[i], ps[i], sd[i], scal_d[i], False)
            if elementwise:  # per coordinate |dM| / |dD| * dD == |dM| * sign(dD); sign(0) == 0 keeps w_t
                step_m = rule_m(fm, gs[i], ps[i], sm[i], scal_m[i], False)
                ps[i].add_(step_m.abs() * step.sign())
            else:
                ps[i].add_(step * factors[i])

    return norms, write


def _fresh_code(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo keeps its compile cache (and its recompile
    limit) per code object, and every flag combination is a different program."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# inductor: a value read by several consumers (an advanced state, the step) is realized once, which
# lets the state write and the norm reduction share one loop instead of re-reading every input
# (size asserts: dynamo's guards already check every input; the asserts cost ~1 us per input and call)
_INDUCTOR = {"realize_reads_threshold": 1, "size_asserts": False}
_compiled: dict[tuple, tuple[Callable, Callable]] = {}
COMPILE = True  # FusedDirect's default for ``compile``: tests turn it off to check the math cheaply


def _kernels(fm: Flags, fd: Flags, norm_dtype: torch.dtype, elementwise: bool, compile: bool, dynamic: bool = True):
    key = (fm, fd, norm_dtype, elementwise, compile, dynamic)
    if key not in _compiled:
        fns = _passes(fm, fd, norm_dtype, elementwise)
        if compile:
            tag = f"{len(_compiled)}"
            fns = tuple(
                torch.compile(_fresh_code(fn, tag), dynamic=dynamic, fullgraph=True, options=_INDUCTOR) for fn in fns
            )
        _compiled[key] = fns
    return _compiled[key]


def _flat(t: Tensor, like: Tensor) -> Optional[Tensor]:
    """A 1-D view of ``t`` in memory order, or None when its layout differs from ``like``'s.

    Elementwise math and sums do not depend on the order of elements, so any dense layout works as
    long as every tensor of one parameter shares it.
    """
    if t.is_contiguous() and like.is_contiguous():
        return t.view(-1)
    if t.stride() == like.stride() and t.shape == like.shape and _dense(t):
        return t.as_strided((t.numel(),), (1,))
    return None


def _real(tensors: tuple) -> tuple:
    return tuple(torch.view_as_real(t) for t in tensors)


def _dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill one block of memory without gaps or overlaps (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


Unit = tuple[int, Optional[tuple[int, int, int]]]  # (tensor index, (dim, start, stop) or None: whole)


def _unit(t: Tensor, sl: Optional[tuple[int, int, int]]) -> Tensor:
    return t if sl is None else t.narrow(sl[0], sl[1], sl[2] - sl[1])


class _Bucket(NamedTuple):
    """Units stepped by one call of the passes (one flag combination; at most ``bucket_size``)."""

    key: tuple  # (flags of M, flags of D, dtype, compilable)
    index: list[int]  # unit positions (the columns of the norms and factors)
    units: list[Unit]
    ps: list[Tensor]
    ps_d: list[Tensor]  # second views of ``ps``, for D (see _passes)
    sm: list[tuple]  # M's state tensors per unit (in state_keys order)
    sd: list[tuple]
    order: Tensor  # ``index`` on the parameters' device
    flat: bool  # 1-D views (dynamic sizes)
    plain: bool  # the gradients go in as they are (no slice, real view or flattening)


class FusedDirect:
    """Both children's direct steps, their norms and the grafted write, in two fused passes.

    Args:
        magnitude, direction: the children, each an exact SGD, Adam, AdamW, Adagrad or RMSprop
            (without fused / capturable / differentiable) over the same tensors as ``params``.
        params: the parameter tensors (``Graft.params``).
        units: what the norms and factors are per, in order: ``(tensor index, slice)`` pairs, the
            slice ``(dim, start, stop)`` or None for the whole tensor (``Graft.partition``'s units:
            Q, K, V thirds of a fused tensor are units of their own). Default: one unit per tensor.
        elementwise: coordinate granularity (``w += |step_M| * sign(step_D)``).
        norm_dtype: accumulation dtype of the norms (float32, or float64 for float64 weights).
        compile: ``torch.compile`` the passes; False runs the same code eagerly (slow: for tests).
            None (the default) takes the module's ``COMPILE`` (True). Under an outer
            ``torch.compile`` the passes always run uncompiled: the outer compile traces them.
        bucket_size: tensors per compiled call; None (the default) steps all tensors that share
            their optimizer flags in one call.
        dynamic: compile with dynamic sizes (tensors flattened to 1-D): one compile per bucket length
            whatever the model, at a few microseconds more per tensor and step than static sizes,
            whose compile time grows with the number of tensors. Use with a ``bucket_size``.

    Raises:
        GraftlabError: a child has no direct rule, or ``bucket_size < 1``.
    """

    def __init__(
        self,
        magnitude: Optimizer,
        direction: Optimizer,
        params: Sequence[Tensor],
        *,
        units: Optional[Sequence[Unit]] = None,
        elementwise: bool = False,
        norm_dtype: torch.dtype = torch.float32,
        compile: Optional[bool] = None,
        bucket_size: Optional[int] = None,
        dynamic: bool = False,
    ) -> None:
        for role, opt in (("magnitude", magnitude), ("direction", direction)):
            if type(opt) not in KINDS or updates.rule_for(opt) is None:
                raise GraftlabError(
                    f"fused grafting has no rule for the {role} optimizer {type(opt).__name__}: it supports "
                    f"{', '.join(c.__name__ for c in KINDS)} without fused/capturable/differentiable "
                    "and with float hyperparameters"
                )
        if bucket_size is not None and bucket_size < 1:
            raise GraftlabError(f"bucket_size must be >= 1, got {bucket_size}")
        self.magnitude, self.direction = magnitude, direction
        self.params = list(params)
        self.elementwise, self.norm_dtype = elementwise, norm_dtype
        self.compile = COMPILE if compile is None else compile
        self.bucket_size, self.dynamic = bucket_size, dynamic
        self._units = list(units) if units is not None else [(i, None) for i in range(len(self.params))]
        self._slot = {id(p): i for i, p in enumerate(self.params)}
        self._signature: Optional[tuple] = None
        self._buckets: list[_Bucket] = []
        self._pending: list[tuple[_Bucket, list[Tensor], Tensor, Tensor]] = []  # pass 1's inputs, for pass 2

    # -- public ---------------------------------------------------------------------------------
    def squared_norms(self) -> Tensor:
        """Advance both children's states by one step and return ``(2, n_units)``: the squared L2
        norms of M's and D's step per unit (0 for tensors without a gradient), in ``norm_dtype`` on
        the parameters' device. Must be followed by :meth:`apply` before the next call.

        Raises:
            GraftlabError: a gradient is sparse.
        """
        rows = self._advance()
        device = self.params[0].device
        out = torch.zeros((2, len(self._units)), dtype=self.norm_dtype, device=device)
        self._pending = []
        for bucket in self._buckets:
            norms, _, compiled = self._pass_fns(bucket.key)
            if bucket.plain:
                gs = [self.params[i].grad for i, _ in bucket.units]
            else:
                gs = [self._grad(i, sl, bucket.flat) for i, sl in bucket.units]
            scal_m, scal_d = self._tables(bucket, rows, device)
            gs_d = [g.view(g.shape) for g in gs] if compiled else gs  # second views, for D: see _passes
            sq = self._call(norms, compiled, gs, bucket.ps, gs_d, bucket.ps_d, bucket.sm, bucket.sd, scal_m, scal_d)
            out.index_copy_(1, bucket.order, sq)
            self._pending.append((bucket, gs, scal_m, scal_d))
        return out

    def apply(self, factors: Tensor) -> None:
        """``w += factors[u] * step_D`` for every unit ``u`` whose tensor had a gradient (``factors``:
        ``(n_units,)`` on the parameters' device; unused at coordinate granularity)."""
        for bucket, gs, scal_m, scal_d in self._pending:
            _, write, compiled = self._pass_fns(bucket.key)
            f = factors.index_select(0, bucket.order)
            self._call(write, compiled, gs, bucket.ps, bucket.sm, bucket.sd, scal_m, scal_d, f)
        self._pending = []

    # -- internals ------------------------------------------------------------------------------
    def _advance(self) -> dict[int, tuple[list[float], list[float]]]:
        """Advance both children's step counters, create missing state, and return this step's
        scalars per tensor with a gradient; rebuilds the buckets when flags, the set of tensors
        with gradients or the state tensors changed."""
        per_child = []
        for opt in (self.magnitude, self.direction):
            info: dict[int, tuple[Flags, tuple, list[float]]] = {}
            for group in opt.param_groups:
                ps = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
                if not ps:
                    continue
                if any(p.grad.is_sparse for p in ps):
                    raise GraftlabError("sparse gradients need path='generic'")
                f = flags_of(opt, group)
                states = [opt.state[p] for p in ps]
                fresh = init_states(f, group, ps, states)
                steps = updates._advance(states) if f.kind != "sgd" else [0.0] * len(ps)
                keys = state_keys(f)
                for p, s, row in zip(ps, states, scalars(f, group, steps, fresh)):
                    info[self._slot[id(p)]] = (f, tuple(s[k] for k in keys), row)
            per_child.append(info)
        info_m, info_d = per_child
        signature = tuple(
            (i, info_m[i][0], info_d[i][0], *map(id, info_m[i][1]), *map(id, info_d[i][1])) for i in sorted(info_m)
        )
        if signature != self._signature:
            self._build(info_m, info_d)
            self._signature = signature
        return {i: (info_m[i][2], info_d[i][2]) for i in info_m}

    def _build(self, info_m: dict, info_d: dict) -> None:
        by_key: dict[tuple, list[tuple]] = {}
        for u, (i, sl) in enumerate(self._units):
            if i not in info_m:
                continue
            (fm, sm, _), (fd, sd, _) = info_m[i], info_d[i]
            p = _unit(self.params[i].detach(), sl)
            sm, sd = tuple(_unit(t, sl) for t in sm), tuple(_unit(t, sl) for t in sd)
            if p.is_complex():  # pairs of reals, as in torch.optim
                p, sm, sd = torch.view_as_real(p), _real(sm), _real(sd)
            ok = True
            if self.dynamic:
                # one graph for all sizes needs 1-D tensors; one element would specialise the size;
                # the others run uncompiled
                flat = [_flat(t, p) for t in (p, *sm, *sd)]
                ok = p.numel() > 1 and all(t is not None for t in flat)
                if ok:
                    p, sm, sd = flat[0], tuple(flat[1 : 1 + len(sm)]), tuple(flat[1 + len(sm) :])
            by_key.setdefault((fm, fd, p.dtype, ok), []).append((u, (i, sl), p, sm, sd))
        device = self.params[0].device
        self._buckets = []
        for key, members in by_key.items():
            size = self.bucket_size or len(members)
            for start in range(0, len(members), size):
                part = members[start : start + size]
                index, units, ps = [m[0] for m in part], [m[1] for m in part], [m[2] for m in part]
                flat = self.dynamic and key[3]
                plain = not flat and all(sl is None and not self.params[i].is_complex() for i, sl in units)
                self._buckets.append(_Bucket(
                    key, index, units, ps, [q.view(q.shape) for q in ps], [m[3] for m in part], [m[4] for m in part],
                    torch.tensor(index, dtype=torch.long, device=device), flat, plain,
                ))

    def _grad(self, i: int, sl: Optional[tuple[int, int, int]], flat: bool) -> Tensor:
        p, g = _unit(self.params[i], sl), _unit(self.params[i].grad, sl)
        if p.is_complex():
            p, g = torch.view_as_real(p), torch.view_as_real(g)
        if not flat:
            return g  # static sizes: any layout (another one than last step's compiles again)
        view = _flat(g, p)
        if view is None:  # a gradient laid out unlike its parameter (rare): a copy in the parameter's layout
            view = _flat(torch.empty_like(p).copy_(g), p)
        return view

    def _tables(self, bucket: _Bucket, rows: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        dtype = bucket.ps[0].dtype
        sdtype = dtype if dtype == torch.float64 else torch.float32
        out = []
        for k in (0, 1):
            t = torch.tensor([rows[i][k] for i, _ in bucket.units], dtype=sdtype)
            # pinned + non_blocking: the copy is queued on the stream and the host does not wait
            out.append(t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True))
        return out[0], out[1]

    def _pass_fns(self, key: tuple):
        fm, fd, _, ok = key
        compiled = self.compile and ok and not torch.compiler.is_compiling()
        return (*_kernels(fm, fd, self.norm_dtype, self.elementwise, compiled, self.dynamic), compiled)

    def _call(self, fn: Callable, compiled: bool, *args):
        if not (compiled and self.dynamic):
            return fn(*args)
        # one size symbol per tensor: with duck sizing, tensors of equal size would share a symbol and
        # every bucket with another pattern of equal sizes would compile again
        with fx_config.patch(use_duck_shape=False):
            return fn(*args)
