"""Parameter layouts of BERT-style encoders, as ``(name, shape)`` lists named like Hugging Face BERT.

The step-cost benchmark needs the tensor mix of a real model (one huge embedding, many d x d and
d x 4d matrices, hundreds of small bias and LayerNorm vectors) without the model itself::

    shapes = bert_shapes(hidden=384, layers=8)        # ~26M parameters, 135 tensors
    params = make_params(shapes, device="cpu")         # [(name, tensor with .grad), ...]
"""
from __future__ import annotations

import math

import torch

PRESETS = {
    # name: (hidden, layers, vocab); sizes of bert_shapes(...)
    "tiny": dict(hidden=64, layers=2, vocab=1000),  # ~0.2M parameters, for --quick
    "cpu": dict(hidden=384, layers=8, vocab=30522),  # ~26M parameters
    "gpu": dict(hidden=768, layers=12, vocab=30522),  # ~110M parameters (BERT-base)
}


def bert_shapes(hidden: int, layers: int, vocab: int = 30522, max_pos: int = 512) -> list[tuple[str, tuple[int, ...]]]:
    d, f = hidden, 4 * hidden
    out: list[tuple[str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", (vocab, d)),
        ("embeddings.position_embeddings.weight", (max_pos, d)),
        ("embeddings.token_type_embeddings.weight", (2, d)),
        ("embeddings.LayerNorm.weight", (d,)),
        ("embeddings.LayerNorm.bias", (d,)),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            out += [(f"{p}attention.self.{m}.weight", (d, d)), (f"{p}attention.self.{m}.bias", (d,))]
        out += [
            (f"{p}attention.output.dense.weight", (d, d)),
            (f"{p}attention.output.dense.bias", (d,)),
            (f"{p}attention.output.LayerNorm.weight", (d,)),
            (f"{p}attention.output.LayerNorm.bias", (d,)),
            (f"{p}intermediate.dense.weight", (f, d)),
            (f"{p}intermediate.dense.bias", (f,)),
            (f"{p}output.dense.weight", (d, f)),
            (f"{p}output.dense.bias", (d,)),
            (f"{p}output.LayerNorm.weight", (d,)),
            (f"{p}output.LayerNorm.bias", (d,)),
        ]
    out += [
        ("cls.predictions.transform.dense.weight", (d, d)),
        ("cls.predictions.transform.dense.bias", (d,)),
        ("cls.predictions.transform.LayerNorm.weight", (d,)),
        ("cls.predictions.transform.LayerNorm.bias", (d,)),
        ("cls.predictions.bias", (vocab,)),
    ]
    return out


def numel(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(s) for _, s in shapes)


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0) -> list[tuple[str, torch.Tensor]]:
    """Leaf tensors with fixed random gradients (the same gradients every step)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for name, shape in shapes:
        p = (torch.randn(shape, generator=g, dtype=dtype) * 0.02).to(device).requires_grad_()
        p.grad = (torch.randn(shape, generator=g, dtype=dtype) * 1e-3).to(device)
        out.append((name, p))
    return out
