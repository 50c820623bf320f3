"""``gpt``: a GPT-style (pre-LayerNorm, decoder-only) causal language model on the King James Bible.

The same offline text and in-process WordPiece vocabulary as ``bert`` (:mod:`graftlab.tasks.text`);
the model predicts every next token. Every parameter kind is its own tensor, so per-layer grafting
sees Q, K, V, attention-out, FC1, FC2, LayerNorms, embeddings and the output layer apart::

    embeddings.{word,position}.weight
    blocks.{i}.attn_norm.{weight,bias}   blocks.{i}.attn.{query,key,value,out}.{weight,bias}
    blocks.{i}.ffn_norm.{weight,bias}    blocks.{i}.ffn.{fc1,fc2}.{weight,bias}
    final_norm.{weight,bias}   head.decoder.weight

The output layer is NOT tied to the word embeddings (GPT-2 ties them): tying would make one tensor
both an embedding and the output layer, and grafting measures one ratio per tensor. Initialisation
follows GPT-2: N(0, 0.02) weights, the two residual projections (``attn.out``, ``ffn.fc2``) scaled by
``1/sqrt(2 * layers)``, zero biases, unit LayerNorms.

Data: the packed token stream of :func:`graftlab.tasks.text.text_data` cut into rows of
``seq_len + 1`` tokens (input = row[:-1], target = row[1:]); the training rows live on the task's
device, so a step copies only the batch's row indices. On a CUDA device the forward pass runs under
bf16 autocast (the loss in float32); on CPU everything is float32.

Sizes (``seq_len`` tokens per row, WordPiece vocabulary aimed at ``vocab_size``):

======  ======  ======  =====  ======  =======  =====  ====================================
size    layers  hidden  heads  FFN     seq_len  vocab  parameters (KJV vocabulary), use
======  ======  ======  =====  ======  =======  =====  ====================================
tiny    2       64      4      256     32       2000   0.36M: tests, a minute on a CPU
small   4       128     4      512     64       2000   1.3M: CPU experiments
base    6       512     8      2048    128      8000   27M: the GPU preset (dropout 0.1)
======  ======  ======  =====  ======  =======  =====  ====================================

Evaluation: held-out next-token cross-entropy (nats per token) and next-token top-1 accuracy over
every position of the held-out rows.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftlab.errors import GraftlabError
from graftlab.tasks.base import Task
from graftlab.tasks.text import text_data
from graftlab.tasks.transformer import (Attention, FeedForward, TransformerConfig, check_heads, init_weights,
                                         text_task_info)


@dataclass(frozen=True)
class GPTConfig(TransformerConfig):
    layers: int = 4
    dropout: float = 0.0
    eps: float = 1e-5


# vocab_size is what the WordPiece trainer aims for; the model uses the size it reaches.
SIZES = {
    "tiny": GPTConfig(vocab_size=2000, hidden=64, layers=2, heads=4, intermediate=256, seq_len=32),
    "small": GPTConfig(vocab_size=2000, hidden=128, layers=4, heads=4, intermediate=512, seq_len=64),
    "base": GPTConfig(vocab_size=8000, hidden=512, layers=6, heads=8, intermediate=2048, seq_len=128, dropout=0.1),
}
EVAL_ROWS = {"tiny": 256, "small": 256, "base": 512}


class Block(nn.Module):
    """Pre-LN decoder block: ``x = x + attn(LN(x)); x = x + ffn(LN(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg, causal=True)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.word(ids) + self.position(pos)[None])


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(h)


class GPT(nn.Module):
    """``model(ids)`` with ids ``(batch, n <= seq_len)`` int64 -> logits ``(batch, n, vocab)``;
    position ``t`` sees tokens ``0..t`` only."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check_heads(cfg)
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.head = Head(cfg)
        self.apply(init_weights)
        # GPT-2: residual projections scaled so the residual stream's variance does not grow with depth
        for block in self.blocks:
            for layer in (block.attn.out, block.ffn.fc2):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * cfg.layers))

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.config.seq_len:
            raise GraftlabError(f"sequence of {ids.shape[1]} tokens is longer than the model's {self.config.seq_len}")
        h = self.embeddings(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(h))


def next_token_rows(rows: Tensor) -> Tensor:
    """``[CLS] t_0 .. t_n [SEP]`` rows of :func:`~graftlab.tasks.text.pack` -> ``t_0 .. t_n`` (the
    contiguous token stream, ``n + 1`` tokens per row: inputs ``[:-1]``, targets ``[1:]``)."""
    return rows[:, 1:-1].contiguous()


class GPTTask(Task):
    name = "gpt"
    default_schedule = "poly"
    default_warmup = 0.1
    default_lrs = {"sgd": 0.3, "adam": 3e-3, "adamw": 3e-3, "adagrad": 0.05, "rmsprop": 1e-3}

    def __init__(self, *, size: str, data: Optional[str], batch_size: int, seed: int, device: torch.device,
                 eval_size: Optional[int] = None):
        spec = self._start(SIZES, size, batch_size, seed, device)
        # seq_len + 1 tokens per row (inputs and shifted targets) plus the [CLS]/[SEP] that pack adds
        self.data = text_data(data, spec.vocab_size, spec.seq_len + 3)
        self.config = GPTConfig(**{**asdict(spec), "vocab_size": self.data.vocab_size})
        train = next_token_rows(self.data.train)
        self._set_train_size(len(train), "sequences")
        self.autocast = device.type == "cuda"  # bf16 matmuls on GPUs; CPU runs stay float32
        self.model = self._seeded_model(lambda: GPT(self.config))
        self._train = train.to(device)
        held = next_token_rows(self.data.heldout)
        n_eval = min(eval_size or EVAL_ROWS[size], len(held))
        rows = held[:n_eval].to(device)
        self._eval = [rows[i : i + batch_size] for i in range(0, n_eval, batch_size)]
        self.eval_size = n_eval

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def make_batch(self, index: Tensor, gen: torch.Generator) -> Tensor:
        return self._train[index.to(self.device, non_blocking=True)]

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        with self._amp():
            logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def eval_batches(self) -> list[Tensor]:
        return self._eval

    def correct(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with self._amp():
            logits = model(batch[:, :-1])
        logits, labels = logits.float().flatten(0, 1), batch[:, 1:].flatten()
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum, (logits.argmax(-1) == labels).sum(), torch.tensor(labels.numel(), device=labels.device)

    def info(self) -> dict[str, Any]:
        return text_task_info(self, "GPT", self.config.seq_len + 1, autocast="bf16" if self.autocast else None)
