"""The transformer pieces that the ``bert`` and ``gpt`` tasks share: the config fields, attention
and feed-forward layers with every projection its own tensor (so per-layer grafting measures Q, K,
V, attention-out, FC1 and FC2 apart), BERT/GPT-2's initialisation, and the text task's info."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from graftlab.errors import GraftlabError


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 2000
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int = 512
    seq_len: int = 64


def check_heads(cfg: TransformerConfig) -> None:
    """Raises GraftlabError unless ``hidden`` splits evenly into ``heads``."""
    if cfg.hidden % cfg.heads:
        raise GraftlabError(f"hidden size {cfg.hidden} is not divisible by {cfg.heads} heads")


class Attention(nn.Module):
    """Multi-head self-attention; ``causal``: position ``t`` attends to ``0..t`` only."""

    def __init__(self, cfg: Any, causal: bool = False):
        super().__init__()
        self.heads, self.dropout, self.causal = cfg.heads, cfg.dropout, causal
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def init_weights(module: nn.Module) -> None:
    """BERT's and GPT-2's initialisation (``model.apply(init_weights)``): N(0, 0.02) weights, zero
    biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def text_task_info(task: Any, model_class: str, tokens_per_row: int, **extra: Any) -> dict[str, Any]:
    """A text task's ``info()``: the corpus, the sequences, the run and the model; ``extra`` keys
    come before ``model``."""
    corpus = task.data.corpus
    return {
        "task": task.name,
        "size": task.size,
        "dataset": corpus.name,
        "licence": corpus.licence,
        "source": corpus.source,
        "documents": len(corpus.documents),
        "words": corpus.words,
        "vocab_size": task.config.vocab_size,
        "train_sequences": task.num_train,
        "heldout_sequences": len(task.data.heldout),
        "train_tokens": task.num_train * tokens_per_row,
        "eval_sequences": task.eval_size,
        "batch_size": task.batch_size,
        "steps_per_epoch": task.steps_per_epoch,
        "seed": task.seed,
        **extra,
        "model": {"class": model_class, **asdict(task.config), "parameters": task.parameter_count()},
    }
