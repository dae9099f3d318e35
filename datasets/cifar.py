"""CIFAR-100 in its standard python format: ``cifar-100-python/{train,test,meta}`` pickles.

``cifar100:DIR`` names the training split and ``cifar100:DIR?split=test`` the test
split, where DIR holds ``cifar-100-python/`` (or is it). Each image is addressed
as ``<source>#<row>``; :func:`semprobe.datasets.decode.read_bytes` turns such a URI into a
PNG of that row, so every job reads CIFAR through the image-source machinery.
Downloading (``torchvision.datasets.CIFAR100(download=True)``) happens only when
a user asks for it: see :func:`download`.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
from PIL import Image

from semprobe.analysis.errors import InputError
from semprobe.datasets.classes import CIFAR100_CLASSES

PREFIX = "cifar100:"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class CifarSplit:
    """images: (n, 32, 32, 3) uint8 RGB; labels: (n,) int64 fine labels 0..99."""

    images: np.ndarray
    labels: np.ndarray


def parse(name: str) -> tuple[str, str]:
    """``cifar100:DIR[?split=train|test]`` -> (the folder holding the pickles, split)."""
    body = name.removeprefix(PREFIX)
    folder, _, query = body.partition("?")
    split = query.removeprefix("split=") if query else "train"
    if split not in SPLITS or (query and not query.startswith("split=")):
        raise InputError(f"unknown CIFAR-100 split in '{name}': choose ?split=train or ?split=test")
    folder = os.path.abspath(folder)
    inner = os.path.join(folder, "cifar-100-python")
    return (inner if os.path.isdir(inner) else folder), split


# The only globals CIFAR-100's pickles name: numpy arrays as Python 2's cPickle (the published files), protocols 2-4
# (``_reconstruct``, ``_codecs.encode`` for bytes under protocol 2) and protocol 5 (``_frombuffer``) write them,
# under numpy 1's module names and numpy 2's. Everything else (``os.system``, ``builtins.eval``, ...) is refused:
# a pickle can run any function it names.
SAFE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that CIFAR's pickles never do."""


class _CifarUnpickler(pickle.Unpickler):
    """Loads dicts, lists, bytes, strings, numbers and numpy arrays, and nothing that runs code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: str):
    """A CIFAR pickle (Python 2's ``str`` read as bytes, as the dataset's keys are); one that names any other
    global than :data:`SAFE_GLOBALS` is an InputError naming the file and the global, and runs nothing."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as err:
        raise InputError(
            f"refused CIFAR-100 pickle {path}: it calls {err}, which the dataset's pickles never do (allowed: numpy "
            "arrays, dicts, lists, bytes, strings, numbers)"
        ) from None


@functools.lru_cache(maxsize=4)
def load_split(folder: str, split: str) -> CifarSplit:
    """One split's pickle, checked; a missing or corrupt file is an InputError naming it."""
    path = os.path.join(folder, split)
    if not os.path.isfile(path):
        raise InputError(
            f"CIFAR-100 pickle not found: {path} (expected cifar-100-python/{{train,test,meta}}; "
            "semprobe train --download fetches it)"
        )
    try:
        raw = read_pickle(path)
        data, labels = np.asarray(raw[b"data"], np.uint8), np.asarray(raw[b"fine_labels"], np.int64)
    except InputError:
        raise
    except Exception as err:  # a truncated or foreign pickle fails in many ways
        raise InputError(f"corrupt CIFAR-100 pickle {path}: {type(err).__name__}: {err}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or labels.min() < 0 or labels.max() > 99:
        raise InputError(
            f"corrupt CIFAR-100 pickle {path}: expected data (n, 3072) and n fine labels 0..99, "
            f"got data {data.shape} and {len(labels)} labels"
        )
    _check_meta(folder)
    return CifarSplit(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def _check_meta(folder: str) -> None:
    path = os.path.join(folder, "meta")
    if not os.path.isfile(path):
        return  # the label names are fixed; meta only confirms them
    try:
        names = [n.decode() for n in read_pickle(path)[b"fine_label_names"]]
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"corrupt CIFAR-100 meta pickle {path}: {type(err).__name__}: {err}") from None
    if names != list(CIFAR100_CLASSES):
        bad = next((a, b) for a, b in zip(names + [""] * 100, CIFAR100_CLASSES) if a != b)
        raise InputError(f"{path} names its classes differently from CIFAR-100 ('{bad[0]}' where '{bad[1]}' belongs)")


def image_png(uri: str) -> bytes:
    """The PNG of the image a ``cifar100:DIR[?split=...]#ROW`` URI names."""
    source, _, row = uri.rpartition("#")
    split = load_split(*parse(source))
    buf = io.BytesIO()
    Image.fromarray(split.images[int(row)]).save(buf, format="PNG")
    return buf.getvalue()


def write(folder: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> str:
    """Write (images (n, 32, 32, 3) uint8, fine labels (n,)) per split as ``folder/cifar-100-python``; returns
    that folder."""
    inner = os.path.join(folder, "cifar-100-python")
    os.makedirs(inner, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        data = (
            np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), 3072)
        )  # rows: red, then green, then blue
        labels = [int(y) for y in labels]
        with open(os.path.join(inner, split), "wb") as f:
            pickle.dump(
                {
                    b"data": data,
                    b"fine_labels": labels,
                    b"coarse_labels": [y // 5 for y in labels],
                    b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
                },
                f,
            )
    with open(os.path.join(inner, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES]}, f)
    return inner


def download(folder: str) -> str:
    """Fetch the dataset with torchvision (the only place semprobe downloads it); returns its folder."""
    import torchvision

    for train in (True, False):
        torchvision.datasets.CIFAR100(folder, train=train, download=True)
    return os.path.join(folder, "cifar-100-python")
