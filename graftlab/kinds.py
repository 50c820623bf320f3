"""Layer kinds: the one definition of the layer-type labels used by traces, distill and figures.

Every group gets a ``kind`` (one of :data:`KINDS`), an ``ffn`` position (``fc1``/``fc2`` for the
two feed-forward layers, else None) and a transformer ``block`` index (None outside repeated blocks).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

if TYPE_CHECKING:
    from torch import nn


def _nn() -> Any:
    # torch is imported only when modules are given: naming kinds from trace names needs no torch
    from torch import nn

    return nn

from graftlab.errors import GraftlabError

KINDS = ("Q", "K", "V", "attn_out", "ffn", "embedding", "output", "norm", "conv", "other")

# Legend labels in the paper's Figure 5 wording.
KIND_LABELS = {
    "Q": "self-attention Q",
    "K": "self-attention K",
    "V": "self-attention V",
    "attn_out": "self-attention out",
    "ffn": "feedforward",
    "output": "softmax / output",
    "embedding": "embeddings",
    "norm": "misc (LayerNorm, ...)",
    "conv": "convolution",
    "other": "misc (LayerNorm, ...)",
}


@dataclass(frozen=True)
class GroupKind:
    kind: str
    ffn: Optional[str] = None
    block: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GraftlabError(f"unknown kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.ffn not in (None, "fc1", "fc2"):
            raise GraftlabError(f"ffn must be 'fc1', 'fc2' or None, got {self.ffn!r}")


# ---------------------------------------------------------------------------------------------
# Rules: parameter name (and, where known, the owning module's type) -> GroupKind.
#
# A name like ``bert.encoder.layer.3.attention.self.query.weight`` is read as a path of module
# names ending in the tensor's own name. The block index is the first number that follows a
# container of repeated blocks (``layer``, ``layers``, ``h``, ``blocks``, ``block``, ...). The kind is
# decided by the first rule that matches, in this order (order matters: the LayerNorm inside an MLM
# head belongs to the head, the paper's "softmax"):
#
#   output     anything under a head (cls, head, lm_head, classifier, pooler, ...), or a top-level
#              ``fc`` / ``out`` outside blocks (torchvision ResNets, plain classifiers)
#   norm       LayerNorm/BatchNorm/GroupNorm/RMSNorm modules, or names like LayerNorm, ln_1, bn1, norm
#   conv       nn.Conv*/ConvTranspose* modules, or names like conv1, downsample.0, shortcut.0
#   embedding  nn.Embedding modules, or names holding "embed" (word_embeddings, wte, wpe, ...)
#   Q, K, V    query/key/value projections (query, q_proj, wq, ...)
#   attn_out   the output projection of an attention module (attention.output.dense, attn.out,
#              out_proj, o_proj, GPT-2's attn.c_proj, ...)
#   ffn        feed-forward layers: fc1 (intermediate.dense, fc1, c_fc, up/gate_proj, linear1, ...)
#              and fc2 (BERT's layer output.dense, fc2, mlp.c_proj, down_proj, linear2, ...)
#   other      everything else
#
# Fused query-key-value tensors (GPT-2's ``attn.c_attn``, ``qkv``, nn.MultiheadAttention's
# ``in_proj_weight``) hold Q, K and V in one tensor; a per-tensor ratio cannot be split among them, so
# they are ``other`` (with their block index) unless a partition splits them into slices named
# ``<tensor>[q]``/``[k]``/``[v]`` (graftlab.graft.slicing.fused_layout; ``[q head 3]`` per head), which are Q, K and V. Users who want them labelled differently pass
# ``overrides``. Hugging Face's ``Conv1D`` is a linear layer despite its name and is classified by
# name, not as a convolution.
# ---------------------------------------------------------------------------------------------

BLOCK_CONTAINERS = frozenset({"layer", "layers", "h", "blocks", "block", "resblocks", "encoder_layers", "decoder_layers"})
HEADS = frozenset(
    {"cls", "head", "heads", "lm_head", "classifier", "pre_classifier", "pooler", "predictions", "score",
     "qa_outputs", "output_layer", "logits", "mlm_head", "generator_lm_head"}
)
TOP_LEVEL_OUTPUTS = frozenset({"fc", "out", "output", "decoder", "linear", "last_linear"})
ATTENTION = frozenset({"attn", "attention", "self_attn", "selfattention", "encdecattention", "mha",
                       "self_attention", "cross_attn", "crossattention", "encoder_attn"})
FFN_CONTAINERS = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "ff", "densereludense", "intermediate"})
Q_NAMES = frozenset({"query", "q", "q_proj", "q_lin", "wq", "to_q", "query_proj", "q_proj_weight"})
K_NAMES = frozenset({"key", "k", "k_proj", "k_lin", "wk", "to_k", "key_proj", "k_proj_weight"})
V_NAMES = frozenset({"value", "v", "v_proj", "v_lin", "wv", "to_v", "value_proj", "v_proj_weight"})
QKV_NAMES = frozenset({"c_attn", "qkv", "in_proj", "wqkv", "query_key_value", "qkv_proj", "in_proj_weight",
                       "in_proj_bias", "to_qkv"})
ATTN_OUT_NAMES = frozenset({"out", "out_proj", "o_proj", "o", "c_proj", "proj", "dense", "wo", "out_lin",
                            "to_out", "output", "dense_output"})
FC1_NAMES = frozenset({"fc1", "c_fc", "up_proj", "gate_proj", "lin1", "linear1", "wi", "wi_0", "wi_1", "w1",
                       "w3", "dense_h_to_4h", "fc_in", "gate_up_proj", "intermediate"})
FC2_NAMES = frozenset({"fc2", "down_proj", "lin2", "linear2", "w2", "dense_4h_to_h", "fc_out", "c_proj"})
# a slice's group name (graftlab.graft.slicing): "[q]", "[head 3]", "[q head 3]", "[rows 0-99]", "[row 5]"
_SLICE = re.compile(r"(.+)\[(?:([qkv])(?: head \d+)?|head \d+|rows? \d+(?:-\d+)?)\]")
_NORM_NAME = re.compile(r"(norm|^(ln|bn|gn)(_?\d+|_f|_final)?$)")
_CONV_NAME = re.compile(r"^(conv\w*|stem)$")
_EMBED_NAME = re.compile(r"(embed|^(wte|wpe|cls_token|pos_token|mask_token)$)")
# Parameter leaves that are not a module's weight/bias but belong to the tensor itself
_TENSOR_LEAVES = frozenset({"weight", "bias", "gamma", "beta", "scale", "running_mean", "running_var"})

Overrides = Union[Mapping[str, Union[str, GroupKind]], Callable[[str], Union[str, GroupKind, None]], None]


def _path(name: str) -> tuple[list[str], str]:
    """``a.b.c.weight`` -> (["a", "b", "c"], "weight"); nn.Parameter attributes keep their own name."""
    parts = name.split(".")
    return parts[:-1], parts[-1]


def _block_index(parts: list[str]) -> Optional[int]:
    for prev, cur in zip(parts, parts[1:]):
        if cur.isdigit() and prev.lower() in BLOCK_CONTAINERS:
            return int(cur)
    return None


def _is_norm_module(module: Optional[nn.Module]) -> bool:
    if module is None:
        return False
    nn = _nn()
    norms: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    norms += (nn.modules.batchnorm._NormBase,)
    if hasattr(nn, "RMSNorm"):
        norms += (nn.RMSNorm,)
    # Hugging Face and others define their own norms (LlamaRMSNorm, T5LayerNorm): go by class name
    return isinstance(module, norms) or type(module).__name__.lower().endswith("norm")


def _is_conv_module(module: Optional[nn.Module]) -> bool:
    return module is not None and isinstance(module, _nn().modules.conv._ConvNd)


@dataclass(frozen=True)
class _Name:
    """A parameter name read as a path: ``a.b.c.weight`` -> modules ``a, b, c`` and tensor ``weight``."""

    low: tuple[str, ...]  # the module names, lower-cased
    own: str  # the owning module's name (the tensor's own name for a bare Parameter)
    parent: Optional[str]  # the module above it: for Sequential children ("downsample.1")
    tensor: str
    block: Optional[int]

    @classmethod
    def parse(cls, name: str) -> "_Name":
        mods, leaf = _path(name)
        low = tuple(m.lower() for m in mods)
        return cls(low, low[-1] if low else leaf.lower(), low[-2] if len(low) >= 2 else None, leaf.lower(),
                   _block_index(mods))


Rule = Callable[[_Name, Optional["nn.Module"]], Optional[tuple[str, Optional[str]]]]


def _head(n: _Name, module: Optional[nn.Module]):
    # before norms: the paper counts the MLM head's LayerNorm as "softmax"
    if set(n.low) & HEADS or (n.block is None and len(n.low) == 1 and n.own in TOP_LEVEL_OUTPUTS):
        return "output", None
    return None


def _module_type(n: _Name, module: Optional[nn.Module]):
    if _is_norm_module(module):
        return "norm", None
    if _is_conv_module(module):
        return "conv", None
    if module is not None and isinstance(module, _nn().Embedding):
        return "embedding", None
    return None


def _norm_or_conv_name(n: _Name, module: Optional[nn.Module]):
    if module is not None:  # the type is known: a name only decides for modules that are not linear maps
        if _NORM_NAME.search(n.own) and not (module is not None and isinstance(module, (_nn().Linear, _nn().Embedding))):
            return "norm", None
        return None
    if n.own.isdigit() and n.parent in ("downsample", "shortcut"):
        return ("conv" if n.own == "0" else "norm"), None  # torchvision: Sequential(conv, batchnorm)
    if _NORM_NAME.search(n.own) or n.tensor in ("running_mean", "running_var"):
        return "norm", None
    if _CONV_NAME.match(n.own) or n.own in ("downsample", "shortcut"):
        return "conv", None
    return None


def _embedding_name(n: _Name, module: Optional[nn.Module]):
    if any(_EMBED_NAME.search(m) for m in n.low) or _EMBED_NAME.search(n.tensor):
        return "embedding", None
    return None


def _attention(n: _Name, module: Optional[nn.Module]):
    for cand in (n.own, n.tensor):  # the module name and, for bare Parameters, the tensor name
        for names, kind in ((Q_NAMES, "Q"), (K_NAMES, "K"), (V_NAMES, "V"), (QKV_NAMES, "other")):
            if cand in names:
                return kind, None
    if set(n.low) & ATTENTION and (n.own in ATTN_OUT_NAMES or n.parent in ("output", "to_out", "out_proj")):
        return "attn_out", None
    return None


def _feed_forward(n: _Name, module: Optional[nn.Module]):
    words = set(n.low)
    in_ffn = bool(words & FFN_CONTAINERS)
    if n.own in FC1_NAMES or (n.own == "dense" and n.parent == "intermediate"):
        return "ffn", "fc1"
    if n.own in FC2_NAMES and (in_ffn or n.own != "c_proj"):
        return "ffn", "fc2"
    if n.block is not None and n.own == "dense" and n.parent == "output":
        return "ffn", "fc2"  # BERT: layer.i.output.dense is the second feed-forward layer
    if in_ffn and n.own in ("wo", "out", "proj", "dense_out", "output"):
        return "ffn", "fc2"  # T5's DenseReluDense.wo, generic mlp.out / mlp.proj
    if in_ffn:
        return "ffn", "fc1" if "intermediate" in words else None
    return None


# The rules in the order of the table above; the first that answers decides.
RULES: tuple[Rule, ...] = (_head, _module_type, _norm_or_conv_name, _embedding_name, _attention, _feed_forward)


def classify(name: str, module: Optional[nn.Module] = None) -> GroupKind:
    """The :class:`GroupKind` of parameter ``name``; ``module`` is the module that owns it, if known.

    >>> classify("bert.encoder.layer.3.attention.self.query.weight")
    GroupKind(kind='Q', ffn=None, block=3)
    >>> classify("transformer.h.0.mlp.c_proj.bias")
    GroupKind(kind='ffn', ffn='fc2', block=0)
    >>> classify("layer2.1.bn1.weight")
    GroupKind(kind='norm', ffn=None, block=None)
    """
    sliced = _SLICE.fullmatch(name)
    if sliced:  # a slice (graftlab.graft.slicing): "...c_attn.weight[q head 3]" is Q, "...[head 3]" its tensor's
        whole = classify(sliced.group(1), module)
        label = (sliced.group(2) or "").upper()
        return GroupKind(label, None, whole.block) if label in ("Q", "K", "V") else whole
    n = _Name.parse(name)
    for rule in RULES:
        found = rule(n, module)
        if found is not None:
            return GroupKind(found[0], found[1], n.block)
    return GroupKind("other", None, n.block)


def whole_name(group: str) -> str:
    """The tensor a group is a slice of (``"x.key.bias[head 3]"`` -> ``"x.key.bias"``), or ``group``."""
    sliced = _SLICE.fullmatch(group)
    return sliced.group(1) if sliced else group


def _as_kind(value: Union[str, GroupKind], fallback: GroupKind) -> GroupKind:
    if isinstance(value, GroupKind):
        return value
    if isinstance(value, str):
        if value in ("fc1", "fc2"):
            return GroupKind("ffn", value, fallback.block)
        return GroupKind(value, fallback.ffn if value == "ffn" else None, fallback.block)
    raise GraftlabError(f"a kind override must be a kind name or GroupKind, got {value!r}")


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that holds it (first name of shared tensors, as named_parameters)."""
    from graftlab import names as wrappers

    out: dict[str, nn.Module] = {}
    for mod_name, mod in wrappers.named_modules(model):
        for p_name, _ in mod.named_parameters(recurse=False):
            out.setdefault(f"{mod_name}.{p_name}" if mod_name else p_name, mod)
    return out


def classify_names(
    names: Iterable[str],
    overrides: Overrides = None,
    modules: Optional[Mapping[str, nn.Module]] = None,
) -> dict[str, GroupKind]:
    """Classify parameter ``names`` (optionally with their owning ``modules``), applying ``overrides``.

    ``overrides`` is a dict ``name -> kind`` (a kind name, ``"fc1"``/``"fc2"``, or a GroupKind) or a
    callable ``name -> kind | None`` (None falls back to the rules).
    """
    modules = modules or {}
    if not modules and overrides is None:
        return _classify_many(names)
    out: dict[str, GroupKind] = {}
    for n in names:
        ruled = classify(n, modules.get(n))
        value = None
        if callable(overrides):
            value = overrides(n)
        elif overrides is not None:
            value = overrides.get(n)
        out[n] = ruled if value is None else _as_kind(value, ruled)
    return out


# the first ``<container>.<digits>.`` of a name: the block index _block_index finds
_BLOCK_PART = re.compile(r"(?:^|\.)(?:" + "|".join(sorted(BLOCK_CONTAINERS)) + r")\.(\d+)\.", re.IGNORECASE)


# the numbers inside a name's closing "[...]": a slice's index, which no rule reads
_INDEX_IN_SLICE = re.compile(r"\d+(?=[^\[\]]*\]$)")


def _classify_many(names: Iterable[str]) -> dict[str, GroupKind]:
    """:func:`classify` of many names (no modules), each distinct shape of name classified once.

    A name's block index is the one part no rule reads other than as the block (no name set holds
    a bare number, and a number that follows a block container is never a ``downsample``/``shortcut``
    child), so names that differ only there share one classification: the 24 blocks of a model, or
    the 10^5 to 10^6 groups of finer partitions, cost a few hundred calls of :func:`classify`. The
    numbers inside a trailing ``[...]`` (which head, which rows) are never read either.
    """
    names = list(names)
    shapes: dict[str, GroupKind] = {}
    made: dict[tuple, GroupKind] = {}
    out: dict[str, GroupKind] = {}
    search = _BLOCK_PART.search
    index = _INDEX_IN_SLICE.sub
    for n in names:
        m = search(n)
        if m is None:
            key, block = n, None
        else:
            a, b = m.span(1)
            key, block = n[:a] + "0" + n[b:], int(m.group(1))
        if key[-1:] == "]":  # slices of one tensor ("[head 3]", "[rows 0-99]", "[17]") share its kind
            key = index("0", key)
        kind = shapes.get(key)
        if kind is None:
            kind = shapes[key] = classify(key)
        if m is not None:
            triple = (kind.kind, kind.ffn, block)
            kind = made.get(triple)
            if kind is None:
                kind = made[triple] = GroupKind(*triple)
        out[n] = kind
    return out


def classify_model(model: nn.Module, overrides: Overrides = None) -> dict[str, GroupKind]:
    """``{param_name: GroupKind}`` for every parameter of ``model``, using names and module types.

    >>> kinds = classify_model(model, overrides={"proj.weight": "output"})
    >>> kinds["encoder.layer.0.attention.self.key.bias"].kind
    'K'
    """
    owners = _owners(model)
    from graftlab import names as wrappers

    return classify_names([n for n, _ in wrappers.named_parameters(model)], overrides, owners)


def group_kind(members: Iterable[GroupKind]) -> GroupKind:
    """The kind of a group of tensors: their common kind (else ``other``), common block (else None)."""
    members = list(members)
    if not members:
        return GroupKind("other")
    kinds = {m.kind for m in members}
    ffns = {m.ffn for m in members}
    blocks = {m.block for m in members}
    kind = kinds.pop() if len(kinds) == 1 else "other"
    ffn = ffns.pop() if len(ffns) == 1 and kind == "ffn" else None
    block = blocks.pop() if len(blocks) == 1 else None
    return GroupKind(kind, ffn, block)


def to_dict(kind: GroupKind) -> dict[str, Any]:
    return {"kind": kind.kind, "ffn": kind.ffn, "block": kind.block}
