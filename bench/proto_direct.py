"""A faster direct path, prototyped outside the library to measure what it would gain.

Three changes to the direct path of :class:`graftlab.Graft`, each keeping the same optimizer state
(so state dicts stay interchangeable) and the same steps up to float rounding:

1. Fewer passes over memory in the rules (``graftlab/updates.py``): read the gradients in place
   instead of copying them into the step buffer when there is no weight decay or ``maximize``;
   ``torch.sqrt(x, out=buf)`` / ``torch.div(a, buf, out=buf)`` per tensor instead of
   ``copy_ + sqrt_`` and ``reciprocal_ + mul_`` (each out-of-place op writes the buffer once,
   where a copy followed by an in-place op reads and writes it twice). On CUDA, where a
   per-tensor loop costs one kernel launch per tensor, the foreach forms stay.
2. One fused update of the weights (``graftlab/graft.py``): ``w += factor * step`` as one
   ``_foreach_addcmul_`` with the per-tensor factors as 0-dim tensors, instead of
   ``_foreach_mul_(step, factors)`` then ``_foreach_add_(w, step)``.
3. Momentum SGD as the direction (the paper's main case, X#SGD): D's step is ``-lr * buf``, so
   its norm is ``lr * ||buf||`` and the update is ``w += (-lr * factor) * buf``; D's step is
   never written to the buffer at all.

Usage::

    python bench/proto_direct.py            # equivalence check, then interleaved timings
    python bench/proto_direct.py --quick
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ratio_summary, table, write_result  # noqa: E402
from layouts import PRESETS, bert_shapes, make_params  # noqa: E402
from step_cost import _block, _pairs  # noqa: E402

from graftlab import Graft, updates  # noqa: E402


def _plain(group: dict) -> bool:
    return group.get("weight_decay", 0.0) == 0 and not group.get("maximize", False)


def _per_tensor(out: list[Tensor]) -> bool:
    return out[0].device.type == "cpu"


def _sqrt_into(out, src):
    if _per_tensor(out):
        for o, s in zip(out, src):
            torch.sqrt(s, out=o)
    else:
        torch._foreach_copy_(out, src)
        torch._foreach_sqrt_(out)


def _div_into(out, num):
    """out <- num / out."""
    if _per_tensor(out):
        for o, n in zip(out, num):
            torch.div(n, o, out=o)
    else:
        torch._foreach_reciprocal_(out)
        torch._foreach_mul_(out, num)


def sgd(group, params, grads, state, out, scratch) -> None:
    momentum, dampening = group["momentum"], group["dampening"]
    if momentum == 0 or not _plain(group):
        return updates.sgd(group, params, grads, state, out, scratch)
    old = [i for i, s in enumerate(state) if s.get("momentum_buffer") is not None]
    if old:
        bufs = [state[i]["momentum_buffer"] for i in old]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
    for s, g in zip(state, grads):
        if s.get("momentum_buffer") is None:
            s["momentum_buffer"] = g.detach().clone()
    bufs = [s["momentum_buffer"] for s in state]
    if group.get("nesterov", False):
        torch._foreach_copy_(out, grads)
        torch._foreach_add_(out, bufs, alpha=momentum)
        torch._foreach_mul_(out, -group["lr"])
    elif _per_tensor(out):
        for o, b in zip(out, bufs):
            torch.mul(b, -group["lr"], out=o)
    else:
        torch._foreach_copy_(out, bufs)
        torch._foreach_mul_(out, -group["lr"])


def adagrad(group, params, grads, state, out, scratch) -> None:
    if not _plain(group):
        return updates.adagrad(group, params, grads, state, out, scratch)
    lr, lr_decay, eps = group["lr"], group["lr_decay"], group["eps"]
    for s, p in zip(state, params):
        if "sum" not in s:
            s["sum"] = torch.full_like(p, group.get("initial_accumulator_value", 0.0), memory_format=torch.preserve_format)
    steps = updates._advance(state)
    sums = [s["sum"] for s in state]
    torch._foreach_addcmul_(sums, grads, grads, value=1)
    _sqrt_into(out, sums)
    torch._foreach_add_(out, eps)
    _div_into(out, grads)
    torch._foreach_mul_(out, [-lr / (1 + (k - 1) * lr_decay) for k in steps])


def adam(group, params, grads, state, out, scratch, *, decoupled=None) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if decoupled is None:
        decoupled = bool(group.get("decoupled_weight_decay", False))
    amsgrad = group.get("amsgrad", False)
    for s, p in zip(state, params):
        if "exp_avg" not in s:
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = updates._advance(state)
    exp_avgs = [s["exp_avg"] for s in state]
    exp_avg_sqs = [s["exp_avg_sq"] for s in state]
    g = grads
    if group.get("maximize", False) or (wd != 0 and not decoupled):
        torch._foreach_copy_(out, grads)
        if group.get("maximize", False):
            torch._foreach_neg_(out)
        if wd != 0 and not decoupled:
            torch._foreach_add_(out, params, alpha=wd)
        g = out
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    second = exp_avg_sqs
    if amsgrad:
        second = [s["max_exp_avg_sq"] for s in state]
        torch._foreach_maximum_(second, exp_avg_sqs)
    _sqrt_into(out, second)
    torch._foreach_div_(out, [(1 - beta2**k) ** 0.5 for k in steps])
    torch._foreach_add_(out, eps)
    _div_into(out, exp_avgs)
    torch._foreach_mul_(out, [-lr / (1 - beta1**k) for k in steps])
    if wd != 0 and decoupled:
        torch._foreach_add_(out, params, alpha=-lr * wd)


def adamw(group, params, grads, state, out, scratch) -> None:
    adam(group, params, grads, state, out, scratch, decoupled=True)


FAST = {updates.sgd: sgd, updates.adagrad: adagrad, updates.adam: adam, updates.adamw: adamw}


class FastGraft(Graft):
    """:class:`Graft` with the prototype direct path (see the module docstring)."""

    def __init__(self, *a, linear_sgd: bool = True, **k):
        super().__init__(*a, **k)
        if self._rules is not None:
            self._rules = tuple(FAST.get(r, r) for r in self._rules)
        self._linear_sgd = linear_sgd

    def _factor_tensor(self, norm_m: Tensor, norm_d: Tensor) -> Tensor:
        self._stats[0].copy_(norm_m)
        self._stats[1].copy_(norm_d)
        torch.div(norm_m, norm_d, out=self._stats[2])
        factor = torch.where(norm_d > 0, self._stats[2], torch.zeros_like(norm_d))
        return factor if self.partition.one_tensor_per_group else factor[self._index]

    def _linear_direction(self):
        """D's momentum buffers and lr when D's step is exactly ``-lr * buf`` for every tensor."""
        d = self.direction
        if not self._linear_sgd or type(d) is not torch.optim.SGD or len(d.param_groups) != 1:
            return None
        group = d.param_groups[0]
        if group["momentum"] == 0 or group.get("nesterov") or not _plain(group):
            return None
        if self.partition.elementwise or any(p.grad is None for p in self.params):
            return None
        return group

    def _step_direct(self) -> None:
        params, step = self.params, self._buf
        self._child_step(self.magnitude, self._rules[0], step)
        norm_m = self._group_norms(step)
        if self.partition.elementwise:
            torch._foreach_copy_(self._abs_m, step)
            torch._foreach_abs_(self._abs_m)
        group = self._linear_direction()
        if group is not None:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            state = [self.direction.state[p] for p in params]
            grads = [p.grad for p in params]
            old = [i for i, s in enumerate(state) if s.get("momentum_buffer") is not None]
            if old:
                bufs = [state[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
            for s, g in zip(state, grads):
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = g.detach().clone()
            bufs = [s["momentum_buffer"] for s in state]
            self.direction._opt_called = True
            norm_d = self._group_norms(bufs) * lr
            factor = self._factor_tensor(norm_m, norm_d) * -lr
            torch._foreach_addcmul_(params, bufs, list(factor.unbind()))
            return
        self._child_step(self.direction, self._rules[1], step)
        norm_d = self._group_norms(step)
        factor = self._factor_tensor(norm_m, norm_d)
        if self.partition.elementwise:
            torch._foreach_sign_(step)
            torch._foreach_mul_(step, self._abs_m)
            torch._foreach_add_(params, step)
        else:
            torch._foreach_addcmul_(params, step, list(factor.unbind()))


def check_equivalence(steps: int = 5) -> list[dict]:
    """FastGraft and Graft take the same steps (float64 parameters, so rounding differences are tiny)."""
    rows = []
    shapes = bert_shapes(**PRESETS["tiny"])
    for pair, (make_m, make_d) in _pairs().items():
        for gran in ("global", "layer", "coordinate"):
            named_a = make_params(shapes, dtype=torch.float64, seed=1)
            named_b = make_params(shapes, dtype=torch.float64, seed=1)
            pa, pb = [p for _, p in named_a], [p for _, p in named_b]
            ga = Graft(make_m(pa), make_d(pa), granularity=gran, names=named_a, path="direct")
            gb = FastGraft(make_m(pb), make_d(pb), granularity=gran, names=named_b, path="direct")
            gen = torch.Generator().manual_seed(2)
            for _ in range(steps):
                for a, b in zip(pa, pb):
                    g = torch.randn(a.shape, generator=gen, dtype=torch.float64) * 1e-2
                    a.grad, b.grad = g.clone(), g.clone()
                ga.step()
                gb.step()
            err = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item() for a, b in zip(pa, pb))
            stats = (ga.last_stats - gb.last_stats).abs().max().item() / ga.last_stats[:2].abs().max().item()
            sd = all(
                torch.allclose(sa[k], sb[k], rtol=1e-12, atol=0)
                for p_a, p_b in zip(pa, pb)
                for opt_a, opt_b in ((ga.magnitude, gb.magnitude), (ga.direction, gb.direction))
                for sa, sb in [(opt_a.state[p_a], opt_b.state[p_b])]
                for k in sa if isinstance(sa[k], Tensor) and k != "step"
            )
            rows.append({"pair": pair, "granularity": gran, "max_rel_param_diff": err, "max_rel_stats_diff": stats,
                         "states_equal": sd})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--pairs", nargs="*")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eq = check_equivalence()
    print(table(["pair", "granularity", "max rel. param diff", "max rel. stats diff", "states equal"],
                [[r["pair"], r["granularity"], f"{r['max_rel_param_diff']:.1e}", f"{r['max_rel_stats_diff']:.1e}",
                  r["states_equal"]] for r in eq]), flush=True)
    assert all(r["max_rel_param_diff"] < 1e-12 and r["states_equal"] for r in eq), "prototype differs"

    layout = "tiny" if args.quick else "cpu"
    repeats = args.repeats or (2 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 2)
    device = "cpu"
    named = make_params(bert_shapes(**PRESETS[layout]), device=device)
    params = [p for _, p in named]
    rows = []
    for pair, (make_m, make_d) in _pairs().items():
        if args.pairs and pair not in args.pairs:
            continue
        bm, bd = make_m(params), make_d(params)

        def base(m=bm, d=bd):
            m.step()
            d.step()

        for gran in ("global", "layer"):
            cur = Graft(make_m(params), make_d(params), granularity=gran, names=named, path="direct")
            fast = FastGraft(make_m(params), make_d(params), granularity=gran, names=named, path="direct")
            blocks = {"base": _block(base, steps, device), "current": _block(cur.step, steps, device),
                      "prototype": _block(fast.step, steps, device)}
            if fast._linear_direction() is not None:  # separate change 3 from changes 1 + 2
                nolin = FastGraft(make_m(params), make_d(params), granularity=gran, names=named, path="direct",
                                  linear_sgd=False)
                blocks["rules+fused only"] = _block(nolin.step, steps, device)
            for _ in range(2):
                for b in blocks.values():
                    b()
            res = interleave(blocks, repeats)
            cpu = {k: [t[1] for t in v] for k, v in res.items()}
            rc, rp = ratio_summary(cpu["current"], cpu["base"]), ratio_summary(cpu["prototype"], cpu["base"])
            gain = ratio_summary(cpu["prototype"], cpu["current"])
            rn = ratio_summary(cpu["rules+fused only"], cpu["base"]) if "rules+fused only" in cpu else None
            rows.append({"pair": pair, "granularity": gran, "current": rc, "prototype": rp, "prototype_vs_current": gain,
                         "rules_fused_only": rn})
            print(f"  {pair:12s} {gran:7s} current {rc['median']:.3f}x  prototype {rp['median']:.3f}x  "
                  f"(prototype/current {gain['median']:.3f} [{gain['min']:.2f}..{gain['max']:.2f}])"
                  + (f"  changes 1+2 only {rn['median']:.3f}x" if rn else ""), flush=True)
            del cur, fast, blocks
    tab = table(["pair", "granularity", "current direct / baseline", "changes 1+2 / baseline",
                 "prototype (1+2+3) / baseline", "prototype / current", "spread (min..max)"],
                [[r["pair"], r["granularity"], f"{r['current']['median']:.3f}x",
                  f"{r['rules_fused_only']['median']:.3f}x" if r["rules_fused_only"] else "(= prototype)",
                  f"{r['prototype']['median']:.3f}x",
                  f"{r['prototype_vs_current']['median']:.3f}",
                  f"{r['prototype_vs_current']['min']:.2f}..{r['prototype_vs_current']['max']:.2f}"] for r in rows])
    print("\n" + tab)
    path = write_result("proto_direct", {"equivalence": eq, "timing": rows, "layout": layout, "repeats": repeats,
                                         "steps_per_block": steps, "tables": {"proto": tab}}, args.quick)
    print(f"\nwrote {path}")
    return {"equivalence": eq, "timing": rows}


if __name__ == "__main__":
    main()
