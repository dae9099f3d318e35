"""Output roots on local disk or object storage, written atomically.

A file appears under its final name only once it is complete: locally it is
written under a temporary name and renamed; on s3:// and gs:// an object
becomes visible only when its upload completes. So a killed job never leaves a
file that a rerun would trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from semprobe.datasets.images import filesystem
from semprobe.ray_jobs.shared_storage import verify_node

# Activations are dense floats: dictionary encoding and statistics cost time and buy nothing.
PARQUET_OPTIONS = {"use_dictionary": False, "write_statistics": False}

# Table file formats for the activation store and the compressions each supports.
# Arrow IPC is the default: Parquet stores a fixed-size list with a repetition
# level per element, which for EfficientNet-Lite0's 6.2M activation values per
# image costs 3-4x the forward pass on a CPU; IPC writes the tensor buffers as
# they are and reads back memory-mapped, zero-copy.
STORE_FORMATS = {"arrow": ("none", "lz4", "zstd"), "parquet": ("none", "snappy", "zstd", "lz4", "gzip")}


TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")  # AtomicFile's name for a file being written

# What a full disk, a quota or an unwritable output folder look like from a write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(err: BaseException) -> OSError | None:
    """The write failure (disk full, quota, read-only, no permission) behind an error, if any: raised here
    or in a Ray task or actor, whose errors carry the original as their cause."""
    seen, first = set(), err
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    # Ray Data passes a failed actor's error on as text only (its remote traceback)
    found = re.search(r"OSError: \[Errno (\d+)\]", str(first))
    code = int(found.group(1)) if found else None
    return OSError(code, os.strerror(code)) if code in WRITE_ERRNOS else None


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory); URIs as they are."""
    return uri if "://" in uri else os.path.abspath(uri)


class Output:
    """An output root (``DIR``, ``s3://bucket/prefix``, ``gs://...``) and atomic writes under it."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None):
        self.uri = uri
        self.fs, self.root = (fs, uri) if fs is not None else filesystem(uri)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        if fs is None:
            verify_node(uri)  # in a worker on a node that joined after the job's storage check: does it see uri?

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly under a folder, sorted; [] if it is absent."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(
            posixpath.basename(i.path) for i in info if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def sweep(self) -> int:
        """Delete the temporary files a killed writer left (hidden, never read); returns how many.
        Run before resuming: a folder is written by one job at a time."""
        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=True))
        stale = [i.path for i in found if i.type == pafs.FileType.File and TEMPORARY.match(posixpath.basename(i.path))]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def open_atomic(self, *parts: str) -> AtomicFile:
        return AtomicFile(self, self.path(*parts))

    def write_table(self, table: pa.Table, *parts: str, **options: Any) -> None:
        with self.open_atomic(*parts) as f:
            pq.write_table(table, f.stream, **options)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.stream.write(data)

    def write_json(self, obj: Any, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.stream.write(json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, *parts: str) -> Any:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return json.loads(f.read())

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(self.path(*parts), filesystem=self.fs)


class AtomicFile:
    """A writable stream that lands under its final name only on a clean ``close``."""

    def __init__(self, output: Output, path: str):
        self.output, self.path = output, path
        # A leading dot: dataset readers (pyarrow, polars globs) skip a killed run's leftovers.
        head, tail = posixpath.split(path)
        self._tmp = posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex}") if output._local else path
        output.fs.create_dir(posixpath.dirname(path), recursive=True)
        self.stream = output.fs.open_output_stream(self._tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        self.stream.close()
        if self._tmp != self.path:
            self.output.fs.move(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file; also when closing it fails too (a full disk fails the final flush)."""
        try:
            self.stream.close()
        except OSError:
            pass
        try:
            self.output.fs.delete_file(self._tmp)
        except FileNotFoundError:
            pass


class TableFileWriter:
    """Appends tables (one row group or record batch each) to one atomically published file."""

    def __init__(self, output: Output, path: tuple[str, ...], schema: pa.Schema, fmt: str, compression: str):
        self.file = output.open_atomic(*path)
        codec = None if compression == "none" else compression
        if fmt == "parquet":
            self.writer = pq.ParquetWriter(self.file.stream, schema, compression=compression, **PARQUET_OPTIONS)
        else:
            self.writer = pa.ipc.new_file(self.file.stream, schema, options=pa.ipc.IpcWriteOptions(compression=codec))

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        self.file.commit()

    def abort(self) -> None:
        try:
            self.writer.close()
        except (OSError, pa.ArrowException):
            pass  # the file is dropped anyway
        self.file.abort()


def model_key(name: str) -> str:
    """A folder name for a model string (which may hold ':', options after '?' and a checkpoint path).

    Only letters, digits and ``._=-`` survive; runs of others become ``_``. That mapping
    merges names (``a?b=1`` and ``a&b=1``), so a name with options (``?``), or one
    that would be empty, ``.`` or ``..``, ends in a hash of the whole string: distinct and
    never a step out of the output folder. A long name (a deep checkpoint path) keeps its
    head and tail around a hash of the whole, within file systems' 255-byte limit on a name.
    Names without these keep the keys they always had.
    """
    key = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")
    digest = hashlib.sha1(name.encode()).hexdigest()[:16]
    if len(key) > 120:
        return f"{key[:40]}-{digest}-{key[-60:]}"
    if "?" in name or not key.strip("."):
        return f"{key}-{digest}".lstrip(".")
    return key
