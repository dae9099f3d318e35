"""``semprobe run --store similarity`` (extraction fused with the Gram) against ``--store activations``: the same
matrices to float tolerance, the same scores, no activation written, resume per (layer chunk, set)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from test_run import digest, stored_matrices

from semprobe.analysis.errors import InputError
from semprobe.datasets.images import resolve_images
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.run import run
from semprobe.ray_jobs.scheduler import get as _get
from semprobe.ray_jobs.scheduler import matrix_task
from semprobe.ray_jobs.store import similarity_table

LAYERS = ["blocks.1.0.bn3", "blocks.3.1.add", "blocks.5.1.add"]
MODEL = "efficientnet_lite0"
# 1 MB of resident rows: blocks.1.0.bn3 (75,264 features x 13 images x 2 bytes = 1.96 MB) gets a chunk of its own,
# the two others (0.41 + 0.24 MB) share one: 2 chunks x 2 sets = 4 units.
CHUNKS = [[LAYERS[0]], LAYERS[1:]]


@pytest.fixture(scope="module")
def both(ray_session, tmp_path_factory):
    """The same two-set run in both modes; one concept's second image does not decode, so one set's matrices have a
    row fewer than the other's before the scheduler keeps the concepts with an image in every set."""
    root = tmp_path_factory.mktemp("store")
    images = resolve_images("sample:imagenet").images
    for n, (concept_id, uri) in enumerate(zip(images["concept_id"].to_pylist(), images["uri"].to_pylist())):
        folder = root / "images" / concept_id
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.open(uri).convert("RGB")
        img.save(folder / "a.png")
        if n == 4:
            (folder / "b.png").write_bytes(b"not an image")
        else:
            ImageOps.mirror(img).crop((8, 8, img.width - 8, img.height - 8)).save(folder / "b.png")
    common = dict(
        images=str(root / "images"), sets=2, layers=",".join(LAYERS), permutations=40, permutation_shard=15, seed=3
    )
    act_log = []
    activations = run(RunConfig(**common, out=str(root / "act"), store="activations").validate(), log=act_log.append)
    argv = ["run", "--store", "similarity", "--similarity-memory-mb", "1", "--out", str(root / "sim")]
    argv += [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(argv) == 0
    return root, activations, act_log


def test_similarity_matrices_equal_the_activation_stores(both):
    root, _, _ = both
    act, sim = root / "act", root / "sim"
    for layer in LAYERS:
        a = pq.read_table(act / "similarity" / MODEL / layer).sort_by("set_index")
        s = pq.read_table(sim / "similarity" / MODEL / layer).sort_by("set_index")
        assert s["concept_ids"].to_pylist() == a["concept_ids"].to_pylist()
        assert len(s["concept_ids"][0].as_py()) == 12  # the concept whose image failed is left out of both sets
        expected = stored_matrices(act, "similarity", MODEL, layer)
        np.testing.assert_allclose(stored_matrices(sim, "similarity", MODEL, layer), expected, atol=1e-5)
    # the extraction's own matrices are over each set's decoded images: 13 in one set, 12 in the other
    sizes = sorted(
        len(pq.read_table(sim / "extract" / MODEL / "similarity" / MODEL / LAYERS[0] / f"set-{k:03d}.parquet")[
            "concept_ids"][0].as_py())
        for k in (0, 1)
    )  # fmt: skip
    assert sizes == [12, 13]


def test_similarity_scores_equal_the_activation_stores(both):
    root, activations, act_log = both
    for name in ("scores.parquet", "scores_by_set.parquet", "concept_scores.parquet", "concept_scores_by_set.parquet"):
        a, s = pq.read_table(root / "act" / name), pq.read_table(root / "sim" / name)
        assert s.to_pylist() == a.to_pylist(), name
    rows = pq.read_table(root / "sim" / "scores.parquet").to_pylist()
    assert len(rows) == 3 and all(r["n_concepts"] == 12 and r["p_value"] is not None for r in rows)
    assert activations["store"] == "activations" and activations["gram_tasks"] == 6
    assert "store: activations (--store activations)" in act_log


def test_similarity_mode_writes_no_activations_and_records_its_mode(both):
    root, _, _ = both
    act, sim = root / "act" / "extract" / MODEL, root / "sim" / "extract" / MODEL
    assert (act / "activations").is_dir() and not (sim / "activations").exists()
    assert not list((root / "sim").rglob("*.arrow"))
    units = sorted(p.name for p in (sim / "units" / MODEL).iterdir())
    assert units == [f"set-{k:03d}-layers-{a:04d}-{b:04d}.json" for k in (0, 1) for a, b in ((0, 0), (1, 2))]
    for name in units:
        record = json.loads((sim / "units" / MODEL / name).read_text())
        assert record["layers"] in CHUNKS and record["n_images"] + len(record["errors"]) == 13
    config = json.loads((root / "sim" / "config.json").read_text())
    assert config["store"] == "similarity" and config["config"]["store"] == "similarity"
    assert json.loads((root / "act" / "config.json").read_text())["store"] == "activations"
    assert config["experiment_id"] == json.loads((root / "act" / "config.json").read_text())["experiment_id"]
    # what the report and the coverage read is the same: errors, predictions, the extraction's summary
    assert pq.read_table(sim / "errors.parquet").to_pylist() == pq.read_table(act / "errors.parquet").to_pylist()
    (error,) = pq.read_table(sim / "errors.parquet").to_pylist()
    assert error["uri"].endswith("b.png") and error["stage"] == "decode"
    columns, modes = ["image_id", "predicted_index"], (("a", act), ("s", sim))
    pred = {m: pq.read_table(d / "predictions").select(columns).sort_by("image_id") for m, d in modes}
    assert pred["s"].num_rows == 25 and pred["s"].to_pylist() == pred["a"].to_pylist()
    summary = {m: json.loads((d / "summary.json").read_text()) for m, d in modes}
    for k in ("n_images", "n_errors", "n_layers", "top1_correct", "n_labelled"):
        assert summary["s"][k] == summary["a"][k], k


def test_resume_recomputes_only_the_missing_units_and_ends_identical(both, tmp_path):
    root, _, _ = both
    out = tmp_path / "sim"
    shutil.copytree(root / "sim", out)
    before = digest(out)
    ext = out / "extract" / MODEL
    # an interrupted run: set 1's second chunk never finished (record, matrices), so neither did its tests
    (ext / "units" / MODEL / "set-001-layers-0001-0002.json").unlink()
    for layer in LAYERS[1:]:
        (ext / "similarity" / MODEL / layer / "set-001.parquet").unlink()
        (out / "similarity" / MODEL / layer / "set-001.parquet").unlink()
        (out / "tests" / MODEL / "glove-50d" / f"{layer}.parquet").unlink()
    (out / "scores.parquet").unlink()
    given = json.loads((out / "config.json").read_text())["config"]
    cfg = RunConfig(**{**given, "out": str(out), "similarity_memory_mb": None})
    log = []
    resumed = run(cfg.validate(), log=log.append)  # the default budget now: the remaining layers still one unit
    assert "resuming: 4 of 6 (set, layer) matrices already complete, 1 unit(s) to go" in log
    assert any("1 (set, layer chunk) unit(s) computed" in line for line in log)
    assert (resumed["tests_computed"], resumed["matrix_tasks"], resumed["gram_tasks"]) == (2, 2, 0)
    where = {"config.json", f"extract/{MODEL}/config.json", "summary.json"}  # these name the (copied) folder
    assert {k: v for k, v in digest(out).items() if k not in where} == {
        k: v for k, v in before.items() if k not in where
    }
    again = run(cfg.validate(), log=log.append)  # nothing left
    assert (again["tests_computed"], again["matrix_tasks"]) == (0, 0)


def test_a_constant_kept_image_is_named_a_dropped_one_is_not(ray_session, tmp_path):
    ids = ["c0", "c1", "c2", "c3", "c4"]
    matrix = np.corrcoef(np.random.default_rng(0).normal(size=(5, 9))).astype(np.float32)
    matrix[3, :] = matrix[:, 3] = np.nan  # c3's image was constant in this layer
    table = similarity_table(matrix, ids, "cnn", model="m", layer="L", layer_index=0, set_index=1)
    source = ("extract", "m", "similarity", "m", "L", "set-001.parquet")
    (tmp_path / Path(*source[:-1])).mkdir(parents=True)
    pq.write_table(table, tmp_path / Path(*source))
    images = [f"img{c}" for c in ids]
    kept = ["c4", "c0", "c2"]  # c3 dropped (no image in another set): the sub-matrix in the order asked for
    got = _get(matrix_task.remote(str(tmp_path), source, "m", "L", 0, 1, [f"img{c}" for c in kept], kept, "k"))
    np.testing.assert_array_equal(got, matrix[np.ix_([4, 0, 2], [4, 0, 2])])
    written = pq.read_table(tmp_path / "similarity" / "k" / "L" / "set-001.parquet")
    assert written["concept_ids"][0].as_py() == kept
    np.testing.assert_array_equal(written["matrix"].combine_chunks().to_numpy_ndarray()[0], got)
    with pytest.raises(InputError, match=r"zero-variance activations in m layer L, set 1: image imgc3 \(c3\)"):
        _get(matrix_task.remote(str(tmp_path), source, "m", "L", 0, 1, images, ids, "k2"))
    assert not (tmp_path / "similarity" / "k2").exists()


def test_store_option_is_checked_and_not_part_of_the_experiment():
    base = RunConfig().validate()
    for store in ("auto", "activations", "similarity"):
        cfg = RunConfig(store=store, similarity_memory_mb=64).validate()
        assert cfg.experiment_id() == base.experiment_id()
    with pytest.raises(InputError, match="unknown store mode 'disk': choose one of auto, activations, similarity"):
        RunConfig(store="disk").validate()
    with pytest.raises(InputError, match="--similarity-memory-mb must be at least 1"):
        RunConfig(similarity_memory_mb=0).validate()


def test_auto_store_is_activations_on_cpu_actors_and_similarity_on_gpu_actors(ray_session):
    from semprobe.ray_jobs.startup import store_mode

    log = []
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert store_mode("auto", None, log.append) == "activations"  # the tests' cluster has no GPU
    assert store_mode("auto", 0.5, log.append) == "similarity"  # actors that get (a share of) a GPU
    assert store_mode("activations", 1, log.append) == "activations"  # as given, whatever the devices
    assert log == [
        "store: activations (the model actors run on CPUs; --store activations|similarity chooses)",
        "store: similarity (the model actors get 0.5 GPU each; --store activations|similarity chooses)",
        "store: activations (--store activations)",
    ]
