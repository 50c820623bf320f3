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
            raise ValueError(f"unknown kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.ffn not in (None, "fc1", "fc2"):
            raise ValueError(f"ffn must be 'fc1', 'fc2' or None, got {self.ffn!r}")


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
# they are ``other`` (with their block index). Users who want them labelled differently pass
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


def classify(name: str, module: Optional[nn.Module] = None) -> GroupKind:
    """The :class:`GroupKind` of parameter ``name``; ``module`` is the module that owns it, if known.

    >>> classify("bert.encoder.layer.3.attention.self.query.weight")
    GroupKind(kind='Q', ffn=None, block=3)
    >>> classify("transformer.h.0.mlp.c_proj.bias")
    GroupKind(kind='ffn', ffn='fc2', block=0)
    >>> classify("layer2.1.bn1.weight")
    GroupKind(kind='norm', ffn=None, block=None)
    """
    mods, leaf = _path(name)
    low = [m.lower() for m in mods]
    block = _block_index(mods)
    # the module's own name: for Sequential children ("downsample.1") use the parent's name too
    own = low[-1] if low else leaf.lower()
    parent = low[-2] if len(low) >= 2 else None
    tensor = leaf.lower()
    words = set(low)

    def kind(k: str, ffn: Optional[str] = None) -> GroupKind:
        return GroupKind(k, ffn, block)

    # output head (before norm: the paper counts the MLM head's LayerNorm as "softmax")
    if words & HEADS:
        return kind("output")
    if block is None and len(low) == 1 and own in TOP_LEVEL_OUTPUTS:
        return kind("output")

    if _is_norm_module(module):
        return kind("norm")
    if _is_conv_module(module):
        return kind("conv")
    if module is not None and isinstance(module, _nn().Embedding):
        return kind("embedding")

    if module is None:
        if own.isdigit() and parent in ("downsample", "shortcut"):
            # torchvision ResNet: downsample = Sequential(conv, batchnorm)
            return kind("conv" if own == "0" else "norm")
        if _NORM_NAME.search(own) or tensor in ("running_mean", "running_var"):
            return kind("norm")
        if _CONV_NAME.match(own) or own in ("downsample", "shortcut"):
            return kind("conv")
    elif _NORM_NAME.search(own) and not isinstance(module, (_nn().Linear, _nn().Embedding)):
        return kind("norm")

    if any(_EMBED_NAME.search(m) for m in low) or _EMBED_NAME.search(tensor):
        return kind("embedding")

    # attention projections (checked on the module name and, for bare Parameters, the tensor name)
    for cand in (own, tensor):
        if cand in Q_NAMES:
            return kind("Q")
        if cand in K_NAMES:
            return kind("K")
        if cand in V_NAMES:
            return kind("V")
        if cand in QKV_NAMES:
            return kind("other")
    in_attention = bool(words & ATTENTION)
    if in_attention and (own in ATTN_OUT_NAMES or parent in ("output", "to_out", "out_proj")):
        return kind("attn_out")

    # feed-forward layers
    in_ffn = bool(words & FFN_CONTAINERS)
    if own in FC1_NAMES or (own == "dense" and parent == "intermediate"):
        return kind("ffn", "fc1")
    if own in FC2_NAMES and (in_ffn or own != "c_proj"):
        return kind("ffn", "fc2")
    if block is not None and own == "dense" and parent == "output":
        return kind("ffn", "fc2")  # BERT: layer.i.output.dense is the second feed-forward layer
    if in_ffn and own in ("wo", "out", "proj", "dense_out", "output"):
        return kind("ffn", "fc2")  # T5's DenseReluDense.wo, generic mlp.out / mlp.proj
    if in_ffn:
        return kind("ffn", "fc1" if "intermediate" in words else None)
    return kind("other")


def _as_kind(value: Union[str, GroupKind], fallback: GroupKind) -> GroupKind:
    if isinstance(value, GroupKind):
        return value
    if isinstance(value, str):
        if value in ("fc1", "fc2"):
            return GroupKind("ffn", value, fallback.block)
        return GroupKind(value, fallback.ffn if value == "ffn" else None, fallback.block)
    raise ValueError(f"a kind override must be a kind name or GroupKind, got {value!r}")


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that holds it (first name of shared tensors, as named_parameters)."""
    out: dict[str, nn.Module] = {}
    for mod_name, mod in model.named_modules():
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


def classify_model(model: nn.Module, overrides: Overrides = None) -> dict[str, GroupKind]:
    """``{param_name: GroupKind}`` for every parameter of ``model``, using names and module types.

    >>> kinds = classify_model(model, overrides={"proj.weight": "output"})
    >>> kinds["encoder.layer.0.attention.self.key.bias"].kind
    'K'
    """
    owners = _owners(model)
    return classify_names([n for n, _ in model.named_parameters()], overrides, owners)


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
