"""Image sources: one string names where the images are.

- ``DIR`` or ``s3://bucket/DIR`` / ``gs://...``: ImageFolder layout, ``<class>/<file>``,
  where ``<class>`` is an ImageNet wnid, a CIFAR-100 label name, or any name;
- ``sample:imagenet`` / ``sample:cifar100``: the 20 sample images of each inside ``foolbox``;
  ``sample:imagenet?range=START:STOP`` takes those numbered START..STOP-1 (the ``NN`` of
  ``imagenet_NN_<class>.jpg``, 0..19), so two disjoint ranges are disjoint image sets;
- ``cifar100:DIR`` / ``cifar100:DIR?split=test``: CIFAR-100's python pickles (:mod:`semprobe.datasets.cifar`);
- ``FILE.parquet``: a manifest with columns image_id, uri, label (an ImageNet
  index, a wnid, a CIFAR-100 name or any class name).

Each resolves to an :class:`ImageSource`: a table of images and the classes they
belong to. Nothing is decoded here; see :mod:`semprobe.datasets.decode`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from semprobe.analysis.errors import InputError, require_extra
from semprobe.datasets import cifar, schema
from semprobe.datasets.classes import CLASS_SPACES, ClassInfo, imagenet_classes

IMAGE_SOURCE_CHOICES = (
    "a directory in ImageFolder layout (local, s3://, gs://), a manifest .parquet, sample:imagenet, sample:cifar100, "
    "cifar100:DIR[?split=test]"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# The foolbox sample files are named <set>_<NN>_<class index>.<ext>.
_SAMPLES = {"imagenet": re.compile(r"imagenet_(\d+)_(\d+)\.jpg"), "cifar100": re.compile(r"cifar100_(\d+)_(\d+)\.png")}


@dataclass(frozen=True)
class ImageSource:
    """Images with their classes.

    ``images`` has the columns of :data:`semprobe.datasets.schema.IMAGE_TABLE`, sorted by image_id;
    ``classes`` lists every class that has at least one image, in class order.
    """

    name: str
    class_space: str  # imagenet | cifar100 | folder
    classes: tuple[ClassInfo, ...]
    images: pa.Table


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or URI."""
    if "://" not in uri:
        return _local(), posixpath.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot open {uri}: {err}") from None


def read_user_table(path: str, columns: tuple[str, ...], what: str) -> pa.Table:
    """A small table a user hands in (``--pairs``, ``--concept-words``): .csv (``columns`` read as strings) or
    .parquet, local or a URI; ``what`` names it in the one-line errors (unreadable, wrong suffix, a column
    missing)."""
    fs, inner = filesystem(path)
    needs = ", ".join(columns)
    try:
        if inner.endswith(".parquet"):
            table = pq.read_table(inner, filesystem=fs)
        elif inner.endswith(".csv"):
            with fs.open_input_stream(inner) as f:
                types = {c: pa.string() for c in columns}
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
        else:
            raise InputError(f"{what} {path}: expected a .csv or .parquet file with columns {needs}")
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
    missing = set(columns) - set(table.column_names)
    if missing:
        raise InputError(f"{what} {path} lacks column(s) {', '.join(sorted(missing))}: it needs {needs}")
    return table


@functools.cache
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def resolve_images(name: str) -> ImageSource:
    """Resolve an image-source string; raise InputError naming it when it is not one."""
    if name.startswith("sample:"):
        return _sample_source(name)
    if name.startswith(cifar.PREFIX):
        return _cifar_source(name)
    fs, path = filesystem(name)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"image source not found: {name} (choose {IMAGE_SOURCE_CHOICES})")
    if info.type == pafs.FileType.Directory:
        return _folder_source(name, fs, path)
    if path.endswith(".parquet"):
        return _manifest_source(name, fs, path)
    raise InputError(f"image source {name} is a file but not a .parquet manifest (choose {IMAGE_SOURCE_CHOICES})")


def _sample_source(name: str) -> ImageSource:
    kind, _, query = name.removeprefix("sample:").partition("?")
    if kind not in _SAMPLES:
        raise InputError(f"unknown sample set '{name}': choose one of sample:imagenet, sample:cifar100")
    # Located without importing foolbox, which pulls in scipy and GitPython.
    require_extra("foolbox", "demo", f"the sample images {name} (they ship with foolbox)")
    folder = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    rows = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        match = _SAMPLES[kind].fullmatch(entry.name)
        if match:
            rows.append((int(match.group(1)), entry.name, str(entry), int(match.group(2))))
    if query:
        start, stop = _sample_range(name, query, len(rows))
        rows = [r for r in rows if start <= r[0] < stop]
    space = CLASS_SPACES[kind]()
    return _build(name, kind, [(i, u, space[c]) for _, i, u, c in rows])


def _sample_range(name: str, query: str, n: int) -> tuple[int, int]:
    """``range=START:STOP`` -> (START, STOP), checked against the n sample images."""
    match = re.fullmatch(r"range=(\d+):(\d+)", query)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)) <= n:
        raise InputError(
            f"unknown sample subset in '{name}': write {name.partition('?')[0]}?range=START:STOP "
            f"with 0 <= START < STOP <= {n}"
        )
    return int(match.group(1)), int(match.group(2))


def image_identity(uri: str) -> tuple:
    """What makes two image URIs the same image: the file they read. A local file (a path or ``file://`` URI) is
    its device and inode, so a relative path, a symlinked folder or file, a hard link or a manifest naming a
    folder's file all meet (one ``stat`` per image; a file that cannot be read is its absolute path); object-store
    and CIFAR-100 URIs (``cifar100:DIR?split=S#ROW``, DIR already absolute) are themselves. Copies of one image in
    two files are two images."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri or uri.startswith(cifar.PREFIX):
        return ("uri", uri)
    try:
        st = os.stat(uri)
    except OSError:
        return ("path", os.path.abspath(uri))
    return ("file", st.st_dev, st.st_ino)


def shared_images(a: pa.Table, b: pa.Table) -> list[str]:
    """The URIs of ``a``'s images that are also ``b``'s (by :func:`image_identity`), in ``a``'s order."""
    theirs = {image_identity(u) for u in b["uri"].to_pylist()}
    return [u for u in a["uri"].to_pylist() if image_identity(u) in theirs]


def _cifar_source(name: str) -> ImageSource:
    folder, split = cifar.parse(name)
    labels = cifar.load_split(folder, split).labels
    source = f"{cifar.PREFIX}{folder}?split={split}"
    classes = CLASS_SPACES["cifar100"]()
    return _build(
        name, "cifar100", [(f"{split}-{row:05d}", f"{source}#{row}", classes[int(c)]) for row, c in enumerate(labels)]
    )


def _folder_source(name: str, fs: pafs.FileSystem, root: str) -> ImageSource:
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for e in entries:
        rel = posixpath.relpath(e.path, root)
        parts = rel.split("/")
        if e.type == pafs.FileType.File and len(parts) == 2 and rel.lower().endswith(IMAGE_SUFFIXES):
            files.append((rel, parts[0]))
    if not files:
        raise InputError(
            f"no images in {name}: expected ImageFolder layout <class>/<file> with suffixes {', '.join(IMAGE_SUFFIXES)}"
        )
    prefix = name.rstrip("/")
    space, classes = _class_space(sorted({c for _, c in files}))
    return _build(name, space, [(rel, f"{prefix}/{rel}", classes[c]) for rel, c in files])


def _manifest_source(name: str, fs: pafs.FileSystem, path: str) -> ImageSource:
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot read manifest {name}: {err}") from None
    missing = {"image_id", "uri", "label"} - set(table.column_names)
    if missing:
        raise InputError(f"manifest {name} lacks column(s) {', '.join(sorted(missing))}: it needs image_id, uri, label")
    base = name.rsplit("/", 1)[0] if "/" in name else "."
    uris = [u if "://" in u or u.startswith("/") else f"{base}/{u}" for u in table["uri"].to_pylist()]
    labels = table["label"]
    if pa.types.is_integer(labels.type):
        if pc.max(labels).as_py() >= 1000 or pc.min(labels).as_py() < 0:
            raise InputError(f"manifest {name}: integer labels must be ImageNet indices 0..999")
        space, by_label = "imagenet", {c.class_index: c for c in imagenet_classes()}
    else:
        space, by_label = _class_space(sorted(set(labels.to_pylist())))
    rows = list(zip(table["image_id"].to_pylist(), uris, (by_label[v] for v in labels.to_pylist())))
    return _build(name, space, rows)


def _class_space(labels: list[str]) -> tuple[str, dict[str, ClassInfo]]:
    """Name the class space that holds every label: ImageNet wnids, CIFAR-100 names, or plain names."""
    for space, classes in CLASS_SPACES.items():
        by_id = {c.concept_id: c for c in classes()}
        if all(label in by_id for label in labels):
            return space, {label: by_id[label] for label in labels}
    return "folder", {label: ClassInfo(label, i, None, (label.replace("_", " "),)) for i, label in enumerate(labels)}


def _build(name: str, space: str, rows: list[tuple[str, str, ClassInfo]]) -> ImageSource:
    rows = sorted(rows, key=lambda r: r[0])
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i, j in zip(ids, ids[1:]) if i == j)
        raise InputError(f"image source {name} has duplicate image_id '{dup}'")
    table = pa.table(
        {
            "image_id": ids,
            "uri": [r[1] for r in rows],
            "concept_id": [r[2].concept_id for r in rows],
            "class_index": pa.array([r[2].class_index for r in rows], pa.int32()),
        },
        schema=schema.IMAGE_TABLE,
    )
    present = {r[2].concept_id: r[2] for r in rows}
    classes = tuple(sorted(present.values(), key=lambda c: (c.class_index is None, c.class_index, c.concept_id)))
    return ImageSource(name, space, classes, table)
