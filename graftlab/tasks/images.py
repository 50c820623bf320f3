"""Image data for the ResNet task: an IDX reader, Fashion-MNIST, and a user's arrays.

The default data set is Fashion-MNIST as installed by Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``, gzipped IDX, MIT licence, 60k training and 10k test images of
28x28 grey levels, 10 classes). ``data=PATH`` takes instead:

- a folder of IDX files named like the MNIST ones (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-...``, ``t10k-labels-...``);
- a ``.npz`` with ``x_train, y_train, x_test, y_test``, or with ``x, y`` (then every 6th example is
  held out). Images are ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` in 1..4.
"""
from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from graftlab.errors import GraftlabError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
HELDOUT_EVERY = 6

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, big-endian int32 dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise GraftlabError(f"cannot read IDX file {str(path)!r}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise GraftlabError(f"{str(path)!r} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise GraftlabError(f"IDX file {str(path)!r} is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise GraftlabError(
            f"IDX file {str(path)!r} holds {len(raw) - header} data bytes, its header {shape} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class ImageData:
    name: str
    licence: str
    source: str
    x_train: torch.Tensor  # (N, C, H, W) uint8 or float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise GraftlabError(f"{str(folder)!r} has no {stem}[.gz]")


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 2, 3, 4) and x.shape[1] not in (1, 2, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4 and x.shape[1] in (1, 2, 3, 4):
        return x
    raise GraftlabError(f"{what}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")


def _make(name: str, licence: str, source: str, xtr, ytr, xte, yte) -> ImageData:
    xtr, xte = _to_nchw(np.asarray(xtr), source), _to_nchw(np.asarray(xte), source)
    ytr, yte = np.asarray(ytr).reshape(-1), np.asarray(yte).reshape(-1)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise GraftlabError(f"{source}: {len(xtr)}/{len(xte)} images but {len(ytr)}/{len(yte)} labels")
    if xtr.shape[1:] != xte.shape[1:]:
        raise GraftlabError(f"{source}: training images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in shape")
    if len(xtr) == 0 or len(xte) == 0:
        raise GraftlabError(f"{source}: needs training and held-out images")
    if not np.issubdtype(ytr.dtype, np.integer) or min(ytr.min(), yte.min()) < 0:
        raise GraftlabError(f"{source}: labels must be integers >= 0")

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32)))

    classes = int(max(ytr.max(), yte.max())) + 1
    return ImageData(
        name, licence, source, tensor(xtr), torch.from_numpy(ytr.astype(np.int64)),
        tensor(xte), torch.from_numpy(yte.astype(np.int64)), classes,
    )


def load_idx_dir(folder: str | os.PathLike, name: Optional[str] = None, licence: str = "user data") -> ImageData:
    folder = Path(folder)
    parts = [read_idx(_find_idx(folder, f"{split}-{kind}")) for split in ("train", "t10k")
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    return _make(name or folder.name, licence, str(folder), *parts)


def load_npz(path: str | os.PathLike) -> ImageData:
    path = Path(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise GraftlabError(f"cannot read {str(path)!r} as .npz: {err}") from None
    keys = set(arrays.files)

    def array(key: str) -> np.ndarray:
        try:  # each array is read here: an object array (a pickle) is refused, never unpickled
            return arrays[key]
        except (OSError, ValueError) as err:
            raise GraftlabError(f"cannot read array {key!r} of {str(path)!r}: {' '.join(str(err).split())}") from None

    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        parts = [array(k) for k in ("x_train", "y_train", "x_test", "y_test")]
    elif {"x", "y"} <= keys:
        x, y = array("x"), array("y")
        held = np.arange(len(x)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
        parts = [x[~held], y[~held], x[held], y[held]]
    else:
        raise GraftlabError(f"{str(path)!r} needs arrays x_train/y_train/x_test/y_test or x/y, has {sorted(keys)}")
    return _make(path.stem, "user data", str(path), *parts)


@functools.lru_cache(maxsize=2)
def load_images(data: Optional[str]) -> ImageData:
    """Fashion-MNIST (``data=None``), a folder of IDX files, or a ``.npz``; CPU tensors, memoised."""
    if data is None:
        if not FASHION_MNIST_DIR.is_dir():
            raise GraftlabError(
                f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist, "
                "or pass {data=PATH} to an IDX folder or .npz)", param="data"
            )
        return load_idx_dir(FASHION_MNIST_DIR, "Fashion-MNIST", "MIT (Zalando Research)")
    path = Path(data).expanduser()
    if not path.exists():
        raise GraftlabError(f"image data {str(path)!r} does not exist")
    return load_idx_dir(path) if path.is_dir() else load_npz(path)
