"""``bert``: a BERT-style masked language model in plain PyTorch, on the King James Bible by default.

Post-LayerNorm blocks as in BERT, with every parameter kind in its own tensor so per-layer grafting
sees Q, K, V, attention-out, FC1, FC2, LayerNorms, embeddings and the MLM head apart::

    embeddings.{word,position,token_type}.weight   embeddings.norm.{weight,bias}
    blocks.{i}.attn.{query,key,value,out}.{weight,bias}   blocks.{i}.attn_norm.{weight,bias}
    blocks.{i}.ffn.{fc1,fc2}.{weight,bias}                blocks.{i}.ffn_norm.{weight,bias}
    head.transform.{weight,bias}   head.norm.{weight,bias}   head.decoder.{weight,bias}

The MLM decoder is NOT tied to the word embeddings (unlike the original BERT): tying would make one
tensor both an embedding and the output layer, and grafting measures one ratio per tensor.

Masking follows BERT: exactly 15% of the non-special positions of every sequence are predicted (a
fixed count, so shapes never depend on data and nothing syncs with the host); of those 80% become
``[MASK]``, 10% a random token, 10% stay. The output layer runs only at the predicted positions.
Sequences are packed ``[CLS] tokens... [SEP]`` rows of a continuous token stream (one segment).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftlab.tasks.base import EVAL_SEED, Task
from graftlab.tasks.text import SPECIAL_TOKENS, text_data
from graftlab.tasks.transformer import (Attention, FeedForward, TransformerConfig, check_heads, init_weights,
                                         text_task_info)

MASK_FRACTION = 0.15


@dataclass(frozen=True)
class BertConfig(TransformerConfig):
    type_vocab: int = 2
    dropout: float = 0.0
    eps: float = 1e-12


# vocab_size is what the WordPiece trainer aims for; the model uses the size it reaches.
SIZES = {
    "tiny": BertConfig(vocab_size=2000, hidden=128, layers=3, heads=4, intermediate=512, seq_len=64),
    "small": BertConfig(vocab_size=2000, hidden=96, layers=6, heads=4, intermediate=384, seq_len=32),
    "base": BertConfig(vocab_size=8000, hidden=768, layers=12, heads=12, intermediate=3072, seq_len=128, dropout=0.1),
}
EVAL_SEQUENCES = {"tiny": 256, "small": 512, "base": 1024}


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, token_type: Optional[Tensor] = None) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(pos)[None]
        x = x + (self.token_type.weight[0] if token_type is None else self.token_type(token_type))
        return self.dropout(self.norm(x))


class Block(nn.Module):
    """Post-LN transformer block: ``x = LN(x + attn(x)); x = LN(x + ffn(x))``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class MLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(h))))


class BertMLM(nn.Module):
    """``model(ids, positions)`` -> logits ``(batch, len(positions[0]), vocab)`` at the given positions."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        check_heads(cfg)
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = MLMHead(cfg)
        self.apply(init_weights)

    def forward(self, ids: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        h = self.embeddings(ids)
        for block in self.blocks:
            h = block(h)
        if positions is not None:
            h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
        return self.head(h)


def mask_tokens(ids: Tensor, vocab_size: int, gen: torch.Generator) -> dict[str, Tensor]:
    """BERT masking of ``[CLS] ... [SEP]`` rows: ``{"input_ids", "positions", "labels"}`` (CPU)."""
    b, n = ids.shape
    k = max(1, round(MASK_FRACTION * (n - 2)))
    positions = torch.rand(b, n - 2, generator=gen).topk(k, dim=1).indices.sort(dim=1).values + 1
    labels = ids.gather(1, positions)
    action = torch.rand(b, k, generator=gen)
    random_tokens = torch.randint(len(SPECIAL_TOKENS), vocab_size, (b, k), generator=gen)
    mask_id = SPECIAL_TOKENS.index("[MASK]")
    replaced = torch.where(action < 0.8, torch.full_like(labels, mask_id), torch.where(action < 0.9, random_tokens, labels))
    inputs = ids.clone().scatter_(1, positions, replaced)
    return {"input_ids": inputs, "positions": positions, "labels": labels}


class BertTask(Task):
    name = "bert"
    default_schedule = "poly"
    default_warmup = 0.1
    default_lrs = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "adagrad": 0.05, "rmsprop": 3e-4}

    def __init__(self, *, size: str, data: Optional[str], batch_size: int, seed: int, device: torch.device,
                 eval_size: Optional[int] = None):
        spec = self._start(SIZES, size, batch_size, seed, device)
        self.data = text_data(data, spec.vocab_size, spec.seq_len)
        self.config = BertConfig(**{**asdict(spec), "vocab_size": self.data.vocab_size})
        self._set_train_size(len(self.data.train), "sequences")
        self.model = self._seeded_model(lambda: BertMLM(self.config))
        n_eval = min(eval_size or EVAL_SEQUENCES[size], len(self.data.heldout))
        gen = torch.Generator().manual_seed(EVAL_SEED)
        held = self.data.heldout[:n_eval]
        self._eval = [self._to_device(mask_tokens(held[i : i + batch_size], self.config.vocab_size, gen))
                      for i in range(0, n_eval, batch_size)]
        self.eval_size = n_eval

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.to_device(v) for k, v in batch.items()}

    def make_batch(self, index: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        return self._to_device(mask_tokens(self.data.train[index], self.config.vocab_size, gen))

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["input_ids"], batch["positions"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def eval_batches(self) -> list[dict[str, Tensor]]:
        return self._eval

    def correct(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits = model(batch["input_ids"], batch["positions"]).flatten(0, 1)
        labels = batch["labels"].flatten()
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return loss_sum, (logits.argmax(-1) == labels).sum(), torch.tensor(labels.numel(), device=labels.device)

    def info(self) -> dict[str, Any]:
        return text_task_info(self, "BertMLM", self.config.seq_len)
