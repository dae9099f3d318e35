"""Word files anywhere, loaded once: pyarrow.fs sources, `semprobe words convert`, the word cache, the reader
cache. Every converted vector is checked bit for bit against the text reader and a reference parse written here."""

import gzip
import json
import os
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_words import text_lines, write_text, write_word2vec

from semprobe.analysis.errors import InputError
from semprobe.datasets import words as words_module
from semprobe.datasets.words import (
    CACHE_FOLDER,
    INDEX,
    MATRIX,
    cache_beside,
    convert_word_file,
    load_word_model,
)
from semprobe.ray_jobs.cli import main

# a duplicate ("king" again), a non-ASCII word, and (GloVe text only) a word with a space
WORDS = ["king", "New_York", "queen", "café", "apple", "king", "zebra"]
DIM = 5


@pytest.fixture(scope="module")
def vecs():
    # Values with many digits, so that a text parse that rounds twice (or differently) would show.
    return np.random.default_rng(3).standard_normal((len(WORDS), DIM)) * 10.0 ** np.arange(-3, 2)[:DIM]


@pytest.fixture(autouse=True)
def fresh_readers():
    """Each test starts with no model remembered by earlier tests."""
    words_module._LOADED.clear()
    yield
    words_module._LOADED.clear()


def write_source(folder, fmt, gz, vecs, words=WORDS):
    """A word file of ``fmt`` and the reference: {word: float32 vector of its first occurrence}, in file order."""
    suffix = {"word2vec": ".bin", "glove": ".txt", "fasttext": ".vec"}[fmt] + (".gz" if gz else "")
    path = folder / f"src{suffix}"
    if fmt == "word2vec":
        write_word2vec(path, words, vecs.astype(np.float32))
        if gz:
            path.write_bytes(gzip.compress(path.read_bytes()))
        values = vecs.astype(np.float32)
    else:
        # repr(float64) in the file; the reference parses each token with Python's float, then rounds once to f32.
        body = text_lines(words, vecs)
        write_text(path, (f"{len(words)} {vecs.shape[1]}\n" if fmt == "fasttext" else "") + body)
        values = np.array([[np.float32(float(repr(float(x)))) for x in row] for row in vecs], np.float32)
    reference = {}
    for w, v in zip(words, values):
        reference.setdefault(w, v)
    return path, reference


def folder_files(folder):
    return sorted(p.name for p in folder.iterdir())


# --- convert ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", ["word2vec", "glove", "fasttext"])
def test_convert_round_trip_equals_the_text_reader(tmp_path, vecs, fmt, gz):
    words = WORDS + (["new york"] if fmt == "glove" else [])
    all_vecs = np.concatenate([vecs, vecs[[1]] * 3]) if fmt == "glove" else vecs
    src, reference = write_source(tmp_path, fmt, gz, all_vecs, words)
    dest = tmp_path / "converted"
    meta = convert_word_file(f"{fmt}:{src}", str(dest))
    assert folder_files(dest) == ["source.json", "vectors.npy", "vectors.parquet"]
    assert meta["words"] == len(reference) and meta["dim"] == DIM and meta["duplicates_dropped"] == 1
    assert meta["name"] == f"table:{dest}" and meta["size"] == os.path.getsize(src)
    assert json.loads((dest / "source.json").read_text())["source"] == f"{fmt}:{src}"

    # The layout glove-50d has: a plain (n, d) float32 .npy, row k named by row k of the index.
    matrix = np.load(dest / MATRIX)
    assert matrix.dtype == np.float32 and matrix.shape == (len(reference), DIM)
    assert pq.read_table(dest / INDEX).column("word").to_pylist() == list(reference)
    np.testing.assert_array_equal(matrix, np.stack(list(reference.values())))

    mapped, scanned = load_word_model(f"table:{dest}"), load_word_model(f"{fmt}:{src}")
    assert isinstance(mapped._emb, np.memmap) and mapped.dim == scanned.dim == DIM
    query = list(reference)[::-1] + ["king"]
    got = mapped.vectors(query)
    assert got.view(np.uint32).tolist() == scanned.vectors(query).view(np.uint32).tolist()  # bit for bit
    assert got.view(np.uint32).tolist() == np.stack([reference[w] for w in query]).view(np.uint32).tolist()
    probe = ["queen", "absent", "King", "café", ""]
    np.testing.assert_array_equal(mapped.contains(probe), scanned.contains(probe))
    np.testing.assert_array_equal(mapped.contains(probe), [w in reference for w in probe])


def test_convert_many_rows_crosses_write_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(words_module, "_BATCH", 7)  # 50 words: 7 full batches and a partial one
    words = [f"w{i}" for i in range(50)]
    values = np.random.default_rng(0).standard_normal((50, 3))
    src, reference = write_source(tmp_path, "fasttext", False, values, words)
    convert_word_file(f"fasttext:{src}", str(tmp_path / "out"))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / MATRIX), np.stack([reference[w] for w in words]))


def test_word2vec_bytes_that_are_not_utf8_are_dropped(tmp_path, vecs):
    path = tmp_path / "odd.bin"
    with open(path, "wb") as f:
        f.write(b"3 5\n")
        for word, v in zip([b"ok", b"bad\xff", b"fine"], vecs[:3].astype("<f4")):
            f.write(word + b" " + v.tobytes() + b"\n")
    meta = convert_word_file(f"word2vec:{path}", str(tmp_path / "out"))
    assert meta["words"] == 2 and meta["undecodable_dropped"] == 1
    model = load_word_model(f"table:{tmp_path / 'out'}")
    np.testing.assert_array_equal(model.vectors(["fine", "ok"]), vecs[[2, 0]].astype(np.float32))


def test_npy_header_is_numpys(tmp_path):
    """The preamble written before the shape is known, then rewritten, is one numpy reads (and aligns data)."""
    for n in (0, 7, 3_000_000_000):
        header = words_module._npy_preamble(n, 300)
        assert len(header) == 128 and header[:8] == b"\x93NUMPY\x01\x00"
        (length,) = struct.unpack("<H", header[8:10])
        assert 10 + length == 128
        path = tmp_path / f"h{n}.npy"
        path.write_bytes(header)
        with open(path, "rb") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            assert np.lib.format.read_array_header_1_0(f) == ((n, 300), False, np.dtype("<f4"))


def test_convert_a_file_uri_source_and_into_a_file_uri(tmp_path, vecs):
    src, reference = write_source(tmp_path, "fasttext", True, vecs)
    dest = f"{(tmp_path / 'd').as_uri()}"
    meta = convert_word_file(f"fasttext:{src.as_uri()}", dest)
    assert meta["uri"] == src.as_uri() and meta["name"] == f"table:{dest}"
    model = load_word_model(meta["name"])
    assert model._emb is None  # through pyarrow.fs, row by row, as from s3:// or gs://
    np.testing.assert_array_equal(model.vectors(["zebra", "café"]), np.stack([reference["zebra"], reference["café"]]))


def test_word_files_read_through_a_uri(tmp_path, vecs):
    for fmt in ("word2vec", "glove", "fasttext"):
        src, reference = write_source(tmp_path, fmt, True, vecs)
        model = load_word_model(f"{fmt}:{src.as_uri()}")
        np.testing.assert_array_equal(
            model.vectors(["queen", "king"]), np.stack([reference["queen"], reference["king"]])
        )
        assert model.contains(["absent"]).tolist() == [False]


def test_converted_folder_uploaded_to_object_storage(tmp_path, vecs):
    """A SubTreeFileSystem behaves as a bucket (no rename): the folder is uploaded, its matrix last."""
    src, reference = write_source(tmp_path, "glove", False, vecs)
    bucket = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    model = load_word_model(f"glove:{src}")
    record = {"source": f"glove:{src}"}
    order = []
    real_copy = pafs.copy_files

    def copy(source, destination, **kw):
        order.append(os.path.basename(destination))
        return real_copy(source, destination, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pafs, "copy_files", copy)
        words_module._write_converted(model, bucket, "words/conv", record)
    assert order[-1] == MATRIX
    assert folder_files(tmp_path / "bucket" / "words" / "conv") == ["source.json", "vectors.npy", "vectors.parquet"]
    mapped = load_word_model(f"table:{tmp_path / 'bucket' / 'words' / 'conv'}")
    np.testing.assert_array_equal(mapped.vectors(["apple"]), reference["apple"][None])

    # An upload that fails midway takes back what it put.
    def failing(source, destination, **kw):
        if destination.endswith(MATRIX):
            raise OSError("network down")
        return real_copy(source, destination, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pafs, "copy_files", failing)
        with pytest.raises(OSError, match="network down"):
            words_module._write_converted(model, bucket, "words/broken", record)
    assert folder_files(tmp_path / "bucket" / "words" / "broken") == []


@pytest.mark.parametrize(
    "src, message",
    [
        ("nondist:{f}", r"cannot convert 'nondist:.*': SRC is word2vec:PATH, glove:PATH or fasttext:PATH"),
        ("table:{f}", r"glove-50d and table: are mapped already"),
        ("glove-50d", r"cannot convert 'glove-50d'"),
        ("bert:{f}", r"cannot convert 'bert:"),
        ("glove:", r"cannot convert 'glove:'"),
        ("glove:{missing}", r"word model file not found: .*nope\.txt \(glove:.*nope\.txt\)"),
    ],
)
def test_convert_bad_sources(tmp_path, vecs, src, message):
    f, _ = write_source(tmp_path, "glove", False, vecs)
    with pytest.raises(InputError, match=message):
        convert_word_file(src.format(f=f, missing=tmp_path / "nope.txt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_convert_bad_destinations_and_malformed_files_write_nothing(tmp_path, vecs):
    src, _ = write_source(tmp_path, "glove", False, vecs)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for dest in (full, a_file):
        with pytest.raises(InputError, match=f"{re.escape(str(dest))} exists: DEST is a new or empty folder"):
            convert_word_file(f"glove:{src}", str(dest))
    assert folder_files(full) == ["keep.txt"] and a_file.read_text() == "x"
    with pytest.raises(InputError, match=r"cannot write .*a-file/below"):
        convert_word_file(f"glove:{src}", str(a_file / "below"))  # its parent is a file

    empty = tmp_path / "empty"  # an empty folder is fine: it is replaced whole
    empty.mkdir()
    convert_word_file(f"glove:{src}", str(empty))
    assert folder_files(empty) == ["source.json", "vectors.npy", "vectors.parquet"]

    # A malformed line deep in the file fails the conversion; nothing is left, not even the hidden work folder.
    broken = tmp_path / "b" / "broken.txt"
    broken.parent.mkdir()
    write_text(broken, text_lines(["a", "b"], vecs[:2]) + "c 1.0 oops 3 4 5\n")
    before = folder_files(tmp_path / "b")
    with pytest.raises(InputError, match=r"malformed glove vector for 'c' in .*broken\.txt"):
        convert_word_file(f"glove:{broken}", str(tmp_path / "b" / "out"))
    assert folder_files(tmp_path / "b") == before


def test_cli_words_convert_exit_codes(tmp_path, vecs, capsys):
    src, _ = write_source(tmp_path, "fasttext", False, vecs)
    assert main(["words", "convert", f"fasttext:{src}", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["words"] == 6 and printed["name"] == f"table:{tmp_path / 'out'}"
    assert main(["words", "convert", f"fasttext:{src}", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semprobe: error: ") and "exists" in err and len(err.strip().splitlines()) == 1
    assert main(["words", "convert", f"nondist:{src}", str(tmp_path / "o2")]) == 2


# --- the cache and the readers made once -------------------------------------------------------------


def count_scans(monkeypatch):
    """A list that grows by one every time any word file is read from its start."""
    scans = []
    real = words_module._open

    def counting(fs, path, binary):
        scans.append(path)
        return real(fs, path, binary)

    monkeypatch.setattr(words_module, "_open", counting)
    return scans


def test_one_reader_per_file_and_absent_words_scan_once(tmp_path, vecs, monkeypatch):
    src, reference = write_source(tmp_path, "fasttext", False, vecs)
    scans = count_scans(monkeypatch)
    name = f"fasttext:{src}"
    first = load_word_model(name)
    assert load_word_model(name) is first  # the planning of every CNN and the word matrices share it
    assert len(scans) == 1  # the header
    first.contains(["queen", "absent", "zzz"])
    assert len(scans) == 2
    for _ in range(3):  # every later CNN asks again: answered from the memo
        assert load_word_model(name).contains(["absent", "zzz", "queen"]).tolist() == [False, False, True]
    assert len(scans) == 2
    # A changed file is a new model.
    write_text(src, f"1 {DIM}\n" + text_lines(["other"], vecs[:1]))
    assert load_word_model(name) is not first and load_word_model(name).contains(["other"]).tolist() == [True]


@pytest.mark.parametrize("fmt", ["word2vec", "glove", "fasttext"])
def test_the_cache_converts_once_and_maps(tmp_path, vecs, monkeypatch, fmt):
    src, reference = write_source(tmp_path, fmt, fmt == "glove", vecs)
    cache = tmp_path / "cache"
    name = f"{fmt}:{src}"
    model = load_word_model(name, cache=str(cache))
    (folder,) = cache.iterdir()
    assert re.fullmatch(r"[0-9a-f]{32}", folder.name)  # a hash: no part of the name or path reaches the path
    assert folder_files(folder) == ["source.json", "vectors.npy", "vectors.parquet"]
    assert model.name == name and isinstance(model._emb, np.memmap)
    np.testing.assert_array_equal(model.vectors(["café", "zebra"]), np.stack([reference["café"], reference["zebra"]]))
    assert model.contains(["absent", "king"]).tolist() == [False, True]

    # Another process (no reader remembered): the folder is mapped, the source never read again.
    words_module._LOADED.clear()
    stamp = (folder / MATRIX).stat().st_mtime_ns
    scans = count_scans(monkeypatch)
    again = load_word_model(name, cache=str(cache))
    assert again is not model and isinstance(again._emb, np.memmap) and scans == []
    assert again.vectors(list(reference)).tolist() == np.stack(list(reference.values())).tolist()
    assert again.contains(["absent", "nope", "queen"]).tolist() == [False, False, True] and scans == []
    assert (folder / MATRIX).stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1

    # A changed source is converted again, into a folder of its own.
    src_values = vecs[:2] + 1
    src2, reference2 = write_source(tmp_path, fmt, fmt == "glove", src_values, ["king", "extra"])
    assert src2 == src
    changed = load_word_model(name, cache=str(cache))
    assert len(list(cache.iterdir())) == 2
    np.testing.assert_array_equal(changed.vectors(["extra"]), reference2["extra"][None])


def test_the_cache_skips_tables_and_names_escaping_folders(tmp_path, vecs):
    odd = tmp_path / ".." / tmp_path.name / "sub" / "..x y" / "w.vec"
    odd.parent.mkdir(parents=True)
    write_text(odd, f"1 {DIM}\n" + text_lines(["a"], vecs[:1]))
    cache = tmp_path / "c"
    load_word_model(f"fasttext:{odd}", cache=str(cache)).vectors(["a"])
    assert [re.fullmatch(r"[0-9a-f]{32}", p.name) is not None for p in cache.iterdir()] == [True]
    # table: is mapped already: no conversion
    convert_word_file(f"fasttext:{odd}", str(tmp_path / "t"))
    load_word_model(f"table:{tmp_path / 't'}", cache=str(tmp_path / "c2")).vectors(["a"])
    assert not (tmp_path / "c2").exists()


def test_an_unwritable_cache_scans_the_file(tmp_path, vecs):
    src, reference = write_source(tmp_path, "fasttext", False, vecs)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="word cache .* not writable"):
        model = load_word_model(f"fasttext:{src}", cache=str(blocker / "cache"))
    assert not hasattr(model, "_emb")
    np.testing.assert_array_equal(model.vectors(["queen"]), reference["queen"][None])


def test_a_cache_on_a_file_uri(tmp_path, vecs):
    src, reference = write_source(tmp_path, "word2vec", False, vecs)
    cache = (tmp_path / "remote-cache").as_uri()
    model = load_word_model(f"word2vec:{src.as_uri()}", cache=cache)
    assert model._emb is None  # read row by row through pyarrow.fs
    np.testing.assert_array_equal(model.vectors(["queen"]), reference["queen"][None])
    assert len(list((tmp_path / "remote-cache").iterdir())) == 1


def test_absent_words_are_hash_probes(tmp_path, vecs, monkeypatch):
    """After the first lookup the index is never hashed again: each word costs one probe."""
    src, _ = write_source(tmp_path, "fasttext", False, vecs)
    convert_word_file(f"fasttext:{src}", str(tmp_path / "t"))
    model = load_word_model(f"table:{tmp_path / 't'}")
    model.contains(["x"])
    built = model._hashed
    import pyarrow.compute as pc

    monkeypatch.setattr(pc, "index_in", None)  # the old path rehashed the whole index on every call
    for probe in (["a", "king"], ["zebra", "q", "r"], []):
        assert model.contains(probe).tolist() == [w in WORDS for w in probe]
    assert model._hashed is built
    with pytest.raises(InputError, match=r"words missing from table:.*: 'q', 'r'$"):
        model.vectors(["king", "q", "r"])


def test_duplicate_words_in_a_table_index_keep_the_first(tmp_path, vecs):
    folder = tmp_path / "dup"
    folder.mkdir()
    np.save(folder / "emb.npy", vecs.astype(np.float32))
    pq.write_table(pa.table({"word": WORDS}), folder / "emb.parquet")  # 'king' at rows 0 and 5
    model = load_word_model(f"table:{folder / 'emb.npy'}")
    np.testing.assert_array_equal(model.vectors(["king", "zebra"]), vecs[[0, 6]].astype(np.float32))


@pytest.mark.parametrize(
    "out, cache",
    [
        ("/data/runs/x", f"/data/runs/{CACHE_FOLDER}"),
        ("/data/runs/x/", f"/data/runs/{CACHE_FOLDER}"),
        ("/x", f"/x/{CACHE_FOLDER}"),
        ("s3://bucket/runs/x", f"s3://bucket/runs/{CACHE_FOLDER}"),
        ("s3://bucket/x?region=eu-west-1", f"s3://bucket/{CACHE_FOLDER}?region=eu-west-1"),
        ("gs://bucket", f"gs://bucket/{CACHE_FOLDER}"),
        ("file:///tmp/r/a", f"file:///tmp/r/{CACHE_FOLDER}"),
    ],
)
def test_cache_beside(out, cache):
    assert cache_beside(out) == cache
