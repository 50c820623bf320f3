"""Groups below the tensor: attention heads and vocabulary rows (``granularity="head"`` / ``"vocab"``).

Adam-mini (Zhang et al. 2024) keeps one step size per attention head for Q and K and per row for
the embeddings and the output layer; the class imbalance of a vocabulary (Kunstner et al. 2024)
makes rare tokens' rows learn slowly under SGD. Grafting per head and per row measures the
implicit correction (the paper's Section 3.1 partitions, one level finer) exactly there:

- ``"head"``: every attention Q, K and V weight and bias per head (the rows of a projection, the
  columns of GPT-2's fused ``Conv1D`` ``c_attn``, the rows of ``nn.MultiheadAttention``'s fused
  ``in_proj_weight`` within each Q/K/V third), the attention output weight per head (its input
  columns; rows of a ``Conv1D`` ``c_proj``); every other tensor whole.
- ``"vocab"``: as ``"head"``, plus the word embedding and the output layer (weight and bias) per
  vocabulary row, ``row_block`` rows to a group. The embedding is found by its module type
  (``nn.Embedding``) or its name, the output layer by its name or as the last ``nn.Linear`` onto
  the vocabulary outside the blocks (:func:`vocab_kinds`).

Group names show the slice: ``blocks.0.attn.query.weight[head 3]``,
``transformer.h.0.attn.c_attn.weight[q head 3]``, ``head.decoder.weight[rows 0-99]``
(``[row 5]`` for a single row); :mod:`graftlab.kinds` reads them.

A slice is ``(dim, start, stop)`` of its tensor, as the fused Q/K/V thirds of
:func:`fused_layout`; heads and row blocks are contiguous and equal in
size (the last row block may be shorter), which :mod:`graftlab.graft.units` uses to compute them
as a few strided reductions instead of one kernel per head or row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from graftlab.errors import GraftlabError
from graftlab import names as wrappers

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
Heads = Union[int, Mapping[str, int], None]



def fused_layout(name: str, shape: Sequence[int]) -> Optional[tuple[int, tuple[str, ...]]]:
    """``(dim, labels)`` when parameter ``name`` of ``shape`` is a fused layout graftlab splits:
    GPT-2's ``attn.c_attn`` (Hugging Face ``Conv1D``: weight ``(in, 3 * d)``, bias ``(3 * d,)``),
    whose last dimension holds Q, K and V in thirds, in that order, and ``nn.MultiheadAttention``'s
    ``in_proj_weight`` ``(3 * d, d)`` / ``in_proj_bias`` ``(3 * d,)``, whose rows do; else None."""
    parts = name.split(".")
    if parts[-1] in ("in_proj_weight", "in_proj_bias") and len(shape) in (1, 2) and shape[0] % 3 == 0 and shape[0]:
        return 0, ("q", "k", "v")  # nn.MultiheadAttention: Q, K, V thirds of the rows
    if len(parts) >= 2 and parts[-2] == "c_attn" and parts[-1] in ("weight", "bias") and len(shape) in (1, 2):
        if shape[-1] % 3 == 0 and shape[-1] > 0:
            return len(shape) - 1, ("q", "k", "v")
    return None


@dataclass
class Slicing:
    """What a head or vocab partition needs beyond names and shapes (picklable).

    ``heads``: parameter name -> number of heads (Q, the fused tensors and the output projection);
    ``kv_heads``: parameter name -> number of K/V heads where it differs (grouped-query attention);
    ``conv1d``: names of Hugging Face ``Conv1D`` weights (stored ``(in, out)``, transposed against
    ``nn.Linear``); ``attn_out``: ``nn.MultiheadAttention`` output weights; ``default_heads``: the count for attention tensors not in ``heads``;
    ``row_block``: vocabulary rows per group (``"vocab"``); ``embeddings``, ``linears``: what
    :func:`vocab_kinds` needs of the module's types.
    """

    heads: dict[str, int] = field(default_factory=dict)
    kv_heads: dict[str, int] = field(default_factory=dict)
    conv1d: frozenset = frozenset()
    attn_out: frozenset = frozenset()  # output projections known from their module, whatever their name
    default_heads: Optional[int] = None
    row_block: int = 1
    # from the module's types, whatever the names (``"vocab"``): weights of nn.Embedding modules, and
    # (weight, bias or None, out_features) of nn.Linear modules in module order; ``typed``: a module was seen
    embeddings: frozenset = frozenset()
    linears: tuple = ()
    typed: bool = False


def _count(obj: Any, attrs: Sequence[str]) -> Optional[int]:
    for holder in (obj, getattr(obj, "config", None)):
        for a in attrs:
            v = getattr(holder, a, None) if holder is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def slicing_for(names: Any, heads: Heads = None, row_block: int = 1) -> Slicing:
    """The :class:`Slicing` of a model: head counts from ``heads`` (an int for every attention
    tensor, or a mapping parameter name -> count) or, where it is not given, from the module that
    owns each tensor or its nearest ancestor (``num_heads``, ``num_attention_heads``, ``n_head``,
    ``heads``; ``nn.MultiheadAttention``, Hugging Face attention modules and configs, graftlab's
    tasks), else the root's ``config.num_attention_heads``. ``names`` is the ``nn.Module`` (or
    ``(name, tensor)`` pairs, which carry no head counts: pass ``heads``).

    Raises GraftlabError for a ``heads`` or ``row_block`` that is not a positive int.
    """
    if isinstance(row_block, bool) or not isinstance(row_block, int) or row_block < 1:
        raise GraftlabError(f"row_block must be a positive int, got {row_block!r}")
    out = Slicing(row_block=row_block)
    if isinstance(heads, Mapping):
        for k, v in heads.items():
            _check_heads(v)
        out.heads.update({str(k): int(v) for k, v in heads.items()})
    elif heads is not None:
        out.default_heads = _check_heads(heads)
    if not isinstance(names, nn.Module):
        return out
    found: dict[str, tuple[Optional[int], Optional[int]]] = {}
    conv, outs, embeddings, linears = set(), set(), set(), []
    for mname, module in wrappers.named_modules(names):
        found[mname] = (_count(module, HEAD_ATTRS), _count(module, KV_ATTRS))
        own = f"{mname}." if mname else ""
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embeddings.add(f"{own}weight")
        elif isinstance(module, nn.Linear):
            linears.append((f"{own}weight", f"{own}bias" if module.bias is not None else None, module.out_features))
        if type(module).__name__ == "Conv1D":
            conv.add(f"{mname}.weight" if mname else "weight")
        if isinstance(module, nn.MultiheadAttention):
            outs.add(f"{mname}.out_proj.weight" if mname else "out_proj.weight")
    root_kv = found.get("", (None, None))[1]
    given = isinstance(heads, int)
    for pname, _ in wrappers.named_parameters(names):
        if given or pname in out.heads:
            continue
        parts = pname.split(".")[:-1]
        h = kv = None
        for i in range(len(parts), -1, -1):  # the nearest module (or its config) that says
            h, kv = found.get(".".join(parts[:i]), (None, None))
            if h is not None:
                out.heads[pname] = h
                break
        if (kv or root_kv) is not None:
            out.kv_heads[pname] = kv or root_kv
    out.conv1d, out.attn_out = frozenset(conv), frozenset(outs)
    out.embeddings, out.linears, out.typed = frozenset(embeddings), tuple(linears), True
    return out


def slicing_of(names: Any, granularity: Any, heads: Heads, row_block: int) -> Optional[Slicing]:
    """:func:`slicing_for` at ``"head"`` and ``"vocab"``, None at other granularities, where
    ``heads`` and a ``row_block`` other than 1 are refused: they would change nothing."""
    said = f"{{granularity={granularity}}}" if isinstance(granularity, str) else "a custom granularity"
    if row_block != 1 and granularity != "vocab":
        raise GraftlabError(f"{{row_block}} applies only to {{granularity=vocab}} (vocabulary rows per group), "
                            f"not to {said}", param=("row_block", "granularity"))
    if granularity not in ("head", "vocab"):
        if heads is not None:
            raise GraftlabError(f"{{heads}} applies only to {{granularity=head}} or {{granularity=vocab}} "
                                f"(attention heads per group), not to {said}", param=("heads", "granularity"))
        return None
    return slicing_for(names, heads, row_block)


def _check_heads(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GraftlabError(f"heads must be a positive int (or a mapping name -> int), got {v!r}")
    return v


def _label_range(a: int, b: int) -> str:
    return f"row {a}" if b == a + 1 else f"rows {a}-{b - 1}"


def _equal(label: str, dim: int, start: int, stop: int, n: int, what: str):
    size = (stop - start) // n
    return [(f"{label}{what} {h}".strip(), (dim, start + h * size, start + (h + 1) * size)) for h in range(n)]


def vocab_rows(names: Sequence[str], shapes: Sequence[Sequence[int]], kinds: Sequence[str]) -> Optional[int]:
    """The vocabulary size: the most rows of a 2-D embedding tensor (the word embedding outnumbers
    the position and token-type ones), None without one."""
    rows = [s[0] for s, k in zip(shapes, kinds) if k == "embedding" and len(s) == 2]
    return max(rows) if rows else None


def vocab_kinds(names: Sequence[str], shapes: Sequence[Sequence[int]], kinds: Sequence[str],
                slicing: Slicing) -> tuple[list[str], int]:
    """``kinds`` (by name, :func:`graftlab.kinds.classify`) with the module's types applied, and the
    vocabulary size, for ``granularity="vocab"``. An ``nn.Embedding`` weight is an embedding whatever
    its name; when no tensor named as an output layer has the vocabulary's rows, the last
    ``nn.Linear`` onto the vocabulary outside the blocks (kind ``other``) is the output layer.

    Raises GraftlabError when there is no 2-D embedding, saying what was looked for."""
    kinds = ["embedding" if n in slicing.embeddings else k for n, k in zip(names, kinds)]
    vocab = vocab_rows(names, shapes, kinds)
    if vocab is None:
        typed = ("nn.Embedding modules" if slicing.typed else
                 "nn.Embedding modules (names= gave (name, tensor) pairs, which carry no module types: "
                 "pass the model's nn.Module as names=)")
        raise GraftlabError(f"granularity='vocab' found no word embedding to split into rows: looked for {typed} "
                            "and 2-D parameters named like one ('embed', 'wte', 'wpe'); use granularity='head'")
    index = {n: i for i, n in enumerate(names)}
    if not any(k == "output" and s[0] == vocab for s, k in zip(shapes, kinds) if len(s)):
        onto = [[n for n in (w, b) if n in index] for w, b, out in slicing.linears if out == vocab]
        onto = [own for own in onto if own and all(kinds[index[n]] == "other" for n in own)]  # a tied weight
        for name in onto[-1] if onto else ():  # is the embedding's tensor, named once, as the embedding
            kinds[index[name]] = "output"
    return kinds, vocab


def units_of(name: str, shape: Sequence[int], kind: str, granularity: str, slicing: Slicing,
             vocab: Optional[int]) -> Optional[list[tuple[str, tuple[int, int, int]]]]:
    """``[(label, (dim, start, stop)), ...]``: the slices of tensor ``name`` at ``granularity``
    (``"head"`` or ``"vocab"``), in order, covering it; None to keep it whole.

    Raises GraftlabError for an attention tensor whose head count is unknown or does not divide it.
    """
    leaf = name.rsplit(".", 1)[-1]
    if granularity == "vocab" and vocab and len(shape) in (1, 2) and shape[0] == vocab and kind in ("embedding", "output"):
        k = slicing.row_block
        return [(_label_range(a, min(a + k, vocab)), (0, a, min(a + k, vocab))) for a in range(0, vocab, k)]

    fused = fused_layout(name, shape)
    if fused is not None:
        dim, labels = fused
        third = shape[dim] // 3
        n = _heads(name, shape, slicing, "Q", third)
        return [u for j, lab in enumerate(labels) for u in _equal(lab + " ", dim, j * third, (j + 1) * third, n, "head")]
    if kind in ("Q", "K", "V") and leaf in ("weight", "bias") and len(shape) in (1, 2):
        dim = 1 if (name in slicing.conv1d and len(shape) == 2) else 0
        n = _heads(name, shape, slicing, kind, shape[dim])
        return _equal("", dim, 0, shape[dim], n, "head")
    if (kind == "attn_out" or name in slicing.attn_out) and leaf == "weight" and len(shape) == 2:
        dim = 0 if name in slicing.conv1d else 1  # the input: one block of columns per head
        n = _heads(name, shape, slicing, "Q", shape[dim])
        return _equal("", dim, 0, shape[dim], n, "head")
    return None


def _heads(name: str, shape: Sequence[int], slicing: Slicing, kind: str, size: int) -> int:
    n = slicing.heads.get(name, slicing.default_heads)
    if kind in ("K", "V") and name in slicing.kv_heads:  # grouped-query attention: fewer K/V heads
        n = slicing.kv_heads[name]
    if n is None:
        raise GraftlabError(
            f"cannot graft {name!r} per head: the model does not say how many attention heads it has; "
            "pass heads= (an int, or a mapping from parameter name to count)")
    if size % n:
        raise GraftlabError(f"cannot graft {name!r} of shape {tuple(shape)} per head: {size} is not divisible "
                            f"by {n} heads")
    return n


_SUFFIX = re.compile(r"(.+)\[(?:([qkv]) ?)?(?:head (\d+)|rows? (\d+)(?:-(\d+))?)?\]")


def parse_group(group: str) -> Optional[tuple[str, Optional[str], Optional[int], Optional[tuple[int, int]]]]:
    """``(tensor name, q/k/v label or None, head or None, (first row, stop) or None)`` of a slice's
    group name (``x.weight[q]``, ``x.weight[head 3]``, ``x.weight[q head 3]``, ``x.weight[rows 0-99]``,
    ``x.weight[row 5]``); None for a name without a slice."""
    m = _SUFFIX.fullmatch(group)
    if not m or not (m.group(2) or m.group(3) or m.group(4)):
        return None
    rows = None
    if m.group(4) is not None:
        a = int(m.group(4))
        b = int(m.group(5)) if m.group(5) is not None else a
        if b < a:
            return None
        rows = (a, b + 1)
    return m.group(1), m.group(2), int(m.group(3)) if m.group(3) is not None else None, rows
