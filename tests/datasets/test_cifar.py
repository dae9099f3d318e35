"""CIFAR-100 python pickles as an image source, on a small dataset written here in the standard format."""

import pickle

import numpy as np
import pytest

from semprobe.analysis.errors import InputError
from semprobe.datasets import cifar
from semprobe.datasets.classes import CIFAR100_CLASSES
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images


def write_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0):
    """``root/cifar-100-python/{train,test,meta}`` with class-dependent patterns; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        images[np.arange(n), labels % 32, :, labels % 3] = 255  # a class-dependent stripe
        made[split] = (images, labels)
    cifar.write(str(root), made["train"], made["test"])
    return made


def test_both_splits_resolve_and_decode_to_the_stored_pixels(tmp_path):
    made = write_cifar100(tmp_path)
    for name, split in (
        (f"cifar100:{tmp_path}", "train"),
        (f"cifar100:{tmp_path}/cifar-100-python?split=test", "test"),
    ):
        source = resolve_images(name)
        images, labels = made[split]
        assert source.class_space == "cifar100" and source.images.num_rows == len(labels) and len(source.classes) == 100
        rows = source.images.to_pylist()
        for row in rows[:: max(1, len(rows) // 7)]:
            k = int(row["image_id"].split("-")[1])
            assert row["image_id"].startswith(split) and row["class_index"] == labels[k]
            assert row["concept_id"] == CIFAR100_CLASSES[labels[k]]
            np.testing.assert_array_equal(decode_image(read_bytes(row["uri"]), 32, 32), images[k])


def test_bad_cifar_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="CIFAR-100 pickle not found: .*/train"):
        resolve_images(f"cifar100:{tmp_path}")
    with pytest.raises(InputError, match="unknown CIFAR-100 split in .*: choose \\?split=train or \\?split=test"):
        resolve_images(f"cifar100:{tmp_path}?split=val")
    write_cifar100(tmp_path / "a")
    (tmp_path / "a" / "cifar-100-python" / "test").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(InputError, match="corrupt CIFAR-100 pickle .*/test: UnpicklingError"):
        resolve_images(f"cifar100:{tmp_path / 'a'}?split=test")
    write_cifar100(tmp_path / "b")
    with open(tmp_path / "b" / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"pear", *[c.encode() for c in CIFAR100_CLASSES[1:]]]}, f)
    with pytest.raises(
        InputError, match="names its classes differently from CIFAR-100 \\('pear' where 'apple' belongs\\)"
    ):
        resolve_images(f"cifar100:{tmp_path / 'b'}")
