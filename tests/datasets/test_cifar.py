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


class _RunsCode:
    """A pickle payload: unpickling it calls os.system, which touches a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _globals_named(data: bytes) -> set[tuple[str, str]]:
    """The globals a pickle names, read by a plain Unpickler (the reference for what CIFAR's files need)."""
    import io

    named = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(data), encoding="bytes").load()
    return named


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "numpy1"])
def test_cifar_pickles_of_every_protocol_load_through_the_restricted_unpickler(tmp_path, protocol):
    """The dataset's layout (a dict of a uint8 array, int lists and bytes) in each pickle protocol, and as numpy 1
    names its globals (the published files' ``numpy.core.multiarray._reconstruct``): read as pickle.load reads it."""
    rng = np.random.default_rng(3)
    raw = {
        b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8),
        b"fine_labels": [int(y) for y in rng.integers(0, 100, 7)],
        b"filenames": [f"{i}.png".encode() for i in range(7)],
        b"batch_label": "training batch 1 of 1",
    }
    data = pickle.dumps(raw, protocol=2 if protocol == "numpy1" else protocol)
    if protocol == "numpy1":  # protocol 2 spells a global as text: 'numpy._core.multiarray\n_reconstruct\n'
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert ("numpy.core.multiarray", "_reconstruct") in _globals_named(data)
    assert _globals_named(data) <= cifar.SAFE_GLOBALS
    path = tmp_path / "train"
    path.write_bytes(data)
    loaded, expected = cifar.read_pickle(str(path)), pickle.loads(data, encoding="bytes")
    assert loaded.keys() == expected.keys() == raw.keys()
    np.testing.assert_array_equal(loaded[b"data"], raw[b"data"])
    assert loaded[b"data"].dtype == np.uint8 and loaded[b"data"].shape == (7, 3072)
    assert [loaded[k] for k in (b"fine_labels", b"filenames", b"batch_label")] == [
        raw[k] for k in (b"fine_labels", b"filenames", b"batch_label")
    ]


@pytest.mark.parametrize("split", ["train", "meta"])
def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, split):
    write_cifar100(tmp_path)
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-100-python" / split
    payload = {b"data": np.zeros((100, 3072), np.uint8), b"fine_labels": list(range(100)), b"x": _RunsCode(marker)}
    if split == "meta":
        payload = {b"fine_label_names": [_RunsCode(marker)]}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    assert ("posix", "system") in {tuple(g.split(" ")) for g in _pickle_globals(path.read_bytes())}
    cifar.load_split.cache_clear()
    with pytest.raises(InputError, match=rf"^refused CIFAR-100 pickle {path}: it calls posix\.system, which "):
        cifar.load_split(str(tmp_path / "cifar-100-python"), "train")
    assert not marker.exists()
    # the plain unpickler would have run it: the payload is live
    pickle.loads(path.read_bytes(), encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize("name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")])
def test_any_other_global_is_refused(tmp_path, name):
    data = b"\x80\x02c" + f"{name[0]}\n{name[1]}\n".encode() + b"X\x01\x00\x00\x001\x85R."  # name('1')
    (tmp_path / "train").write_bytes(data)
    with pytest.raises(InputError, match=rf"it calls {name[0]}\.{name[1]}, which"):
        cifar.read_pickle(str(tmp_path / "train"))


def _pickle_globals(data: bytes) -> list[str]:
    import pickletools

    return [str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
