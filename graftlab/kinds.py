"""Layer kinds: the one definition of the layer-type labels used by traces, distill and figures.

Every group gets a ``kind`` (one of :data:`KINDS`), an ``ffn`` position (``fc1``/``fc2`` for the
two feed-forward layers, else None) and a transformer ``block`` index (None outside repeated blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
