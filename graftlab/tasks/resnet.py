"""``resnet``: a pre-activation ResNet-18 (4 stages x 2 basic blocks) on Fashion-MNIST by default.

Parameter names follow torchvision's ResNets so the same kind rules apply::

    conv1.weight                                        (3x3 stem, no pooling: images are small)
    layer{1..4}.{0,1}.bn1 / conv1 / bn2 / conv2         (pre-activation: BN-ReLU-conv, twice)
    layer{2..4}.0.shortcut.weight                       (1x1 projection where the shape changes)
    bn.{weight,bias}  fc.{weight,bias}                  (final BN-ReLU, global average pool, classifier)

Widths are ``w, 2w, 4w, 8w`` with ``w`` = 8 (tiny), 32 (small) or 64 (base, the standard ResNet-18).
BatchNorm is kept (its running statistics are part of the model state). Training batches are
normalised by the training set's mean and standard deviation and randomly flipped left-right.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftlab.tasks.base import EVAL_SEED, Task
from graftlab.tasks.images import load_images

WIDTHS = {"tiny": 8, "small": 32, "base": 64}
EVAL_IMAGES = {"tiny": 2000, "small": 5000, "base": None}  # None: the whole held-out set


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` images, as float32.

    uint8 images go through a 256-bin histogram per channel: exact, and without a float copy of
    the whole data set.
    """
    if x.dtype == torch.uint8:
        values = torch.arange(256, dtype=torch.float64)
        hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]).double()
        n = hist.sum(1)
        mean = (hist * values).sum(1) / n
        var = (hist * (values - mean[:, None]) ** 2).sum(1) / n
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        mean, var = flat.mean(1), flat.var(1, correction=0)
    return mean.float(), var.sqrt().float()


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in He et al. (2016b).
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, width: int = 64, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        widths, cin = [width, 2 * width, 4 * width, 8 * width], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(PreActBlock(cin, w, stride), PreActBlock(w, w, 1)))
            cin = w
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))


class ResNetTask(Task):
    name = "resnet"
    default_schedule = "step"
    default_warmup = 0.05
    default_lrs = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "adagrad": 0.05, "rmsprop": 1e-3}

    def __init__(self, *, size: str, data: Optional[str], batch_size: int, seed: int, device: torch.device,
                 eval_size: Optional[int] = None):
        self._start(WIDTHS, size, batch_size, seed, device)
        self.data = load_images(data)
        d = self.data
        self._set_train_size(len(d.x_train), "images")
        mean, std = channel_stats(d.x_train)
        self._mean, self._std = mean.view(1, -1, 1, 1).to(device), std.clamp_min(1e-6).view(1, -1, 1, 1).to(device)
        self._x_train, self._y_train = d.x_train.to(device), d.y_train.to(device)
        self.model = self._seeded_model(lambda: PreActResNet18(WIDTHS[size], d.shape[0], d.classes))
        limit = eval_size or EVAL_IMAGES[size] or len(d.x_test)
        # A fixed, seeded subset of the held-out images (all of them when the limit allows).
        n_eval = min(limit, len(d.x_test))
        pick = torch.randperm(len(d.x_test), generator=torch.Generator().manual_seed(EVAL_SEED))[:n_eval].sort().values
        xe, ye = d.x_test[pick].to(device), d.y_test[pick].to(device)
        self._eval = [(self._normalise(xe[i : i + batch_size]), ye[i : i + batch_size]) for i in range(0, n_eval, batch_size)]
        self.eval_size = n_eval

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.float() - self._mean) / self._std

    def make_batch(self, index: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        flip = torch.rand(len(index), generator=gen) < 0.5
        index, flip = self.to_device(index), self.to_device(flip)
        x = self._normalise(self._x_train[index])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self._y_train[index]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_batches(self) -> list[tuple[Tensor, Tensor]]:
        return self._eval

    def correct(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = model(x).float()
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum(), torch.tensor(len(y), device=y.device)

    def info(self) -> dict[str, Any]:
        d = self.data
        return {
            "task": self.name,
            "size": self.size,
            "dataset": d.name,
            "licence": d.licence,
            "source": d.source,
            "image_shape": list(d.shape),
            "classes": d.classes,
            "train_images": self.num_train,
            "heldout_images": len(d.x_test),
            "eval_images": self.eval_size,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "model": {"class": "PreActResNet18", "width": WIDTHS[self.size], "parameters": self.parameter_count()},
        }
