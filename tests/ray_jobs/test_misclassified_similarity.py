"""``semprobe misclassified --store similarity`` (two passes: the predictions, then each misclassified image's
correlations with its references computed by the model actors) against ``--store activations``: the same
correlations to float tolerance, the same 1 vs. 2 table, no activation written, resume per layer chunk."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_misclassified import reference_pool

from semprobe.analysis.errors import InputError
from semprobe.datasets import schema
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import AdversarialConfig, MisclassifiedConfig
from semprobe.ray_jobs.failure_analysis import stored_reference_correlations
from semprobe.ray_jobs.misclassified import run_misclassified
from semprobe.ray_jobs.storage import Output

MODEL = "efficientnet_lite0"
LAYERS = ["blocks.1.0.bn3", "blocks.3.1.add", "classifier"]
# 1 MB of resident rows: (10 references + a batch of 32) x 75,264 features x 2 bytes is 6.3 MB, so every layer is
# a chunk of its own: 3 units.
UNITS = ["layers-0000-0000.json", "layers-0001-0001.json", "layers-0002-0002.json"]
R = 10  # the sample's 12 correctly classified images give R = 10 (test_misclassified)


@pytest.fixture(scope="module")
def both(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("misclassified-store")
    common = {"layers": ",".join(LAYERS), "permutations": 30}
    act_log = []
    cfg = MisclassifiedConfig(**common, out=str(root / "act")).validate()  # auto: activations on this CPU cluster
    run_misclassified(cfg, log=act_log.append)
    argv = ["misclassified", "--store", "similarity", "--similarity-memory-mb", "1", "--out", str(root / "sim")]
    argv += [x for k, v in common.items() for x in (f"--{k}", str(v))]
    assert main(argv) == 0
    return root, act_log


def stored_rows(out, layer):
    acts = pads.dataset(out / "extract" / "activations" / MODEL / layer, format="arrow").to_table()
    values = acts["values"].combine_chunks().to_numpy_ndarray().astype(np.float64)
    return dict(zip(acts["image_id"].to_pylist(), values))


def test_the_correlations_are_pearson_of_the_activation_stores_rows(both):
    root, _ = both
    sim, act = root / "sim", root / "act"
    severity = pq.read_table(sim / "severity.parquet").to_pylist()
    _, pool, order = reference_pool(act)
    images = [s["image_id"] for s in severity]
    used = [[pool[c] for c in order if c not in (s["true_index"], s["predicted_index"])][:R] for s in severity]
    references = sorted({ref for refs in used for ref in refs})
    assert len(images) == 2 and len(references) in (R, R + 1, R + 2)
    for layer in LAYERS:
        table = pq.read_table(sim / "extract" / "reference_correlations" / MODEL / f"{layer}.parquet")
        assert table.schema.metadata[b"semprobe.schema_version"] == schema.SCHEMA_VERSION.encode()
        assert set(table["layer"].to_pylist()) == {layer}
        got = {(x, ref): r for x, ref, r in zip(*(table[c].to_pylist() for c in ("image_id", "reference_id",
                                                                                  "correlation")))}  # fmt: skip
        assert sorted(got) == sorted((x, ref) for x in images for ref in references)  # each image x each reference
        rows = stored_rows(act, layer)
        for (x, ref), r in got.items():
            # the forward pass sees other batches than the activation store's shard: CPU kernels round by shape
            assert r == pytest.approx(np.corrcoef(rows[x], rows[ref])[0, 1], abs=1e-5)


def test_the_one_vs_two_table_equals_the_activation_stores(both):
    root, _ = both
    sim, act = (pq.read_table(root / mode / "one_vs_two.parquet") for mode in ("sim", "act"))
    assert sim.num_rows == len(LAYERS) and sim["layer"].to_pylist() == LAYERS
    assert sim.equals(act)  # accuracies, nulls, p-values and BHY decisions, to the bit
    assert pq.read_table(root / "sim" / "severity.parquet").equals(pq.read_table(root / "act" / "severity.parquet"))


def test_similarity_mode_writes_no_activations_and_records_its_mode(both):
    root, act_log = both
    sim = root / "sim"
    assert not (sim / "extract" / "activations").exists() and not (sim / "extract" / "shards").exists()
    assert (root / "act" / "extract" / "activations").exists()  # auto on CPU actors: the activation store
    assert "store: activations (the model actors run on CPUs; --store activations|similarity chooses)" in act_log
    for mode, store in (("sim", "similarity"), ("act", "activations")):
        config = json.loads((root / mode / "config.json").read_text())
        assert config["store"] == store and json.loads((root / mode / "summary.json").read_text())["store"] == store
    assert json.loads((sim / "config.json").read_text())["config"]["store"] == "similarity"
    # the first pass's predictions are the activation store's, image by image
    predictions = {mode: pq.read_table(root / mode / "extract" / "predictions").sort_by("image_id") for mode in
                   ("sim", "act")}  # fmt: skip
    assert predictions["sim"].equals(predictions["act"])
    assert sorted(p.name for p in (sim / "extract" / "reference_units" / MODEL).iterdir()) == UNITS
    for name, layer in zip(UNITS, LAYERS):
        record = json.loads((sim / "extract" / "reference_units" / MODEL / name).read_text())
        assert record["layers"] == [layer] and record["errors"] == []
        assert record["n_images"] == len(record["requested"]) and 2 + R <= record["n_images"] <= 2 + R + 2


def test_resume_recomputes_only_the_missing_unit_and_ends_identical(both, tmp_path):
    """An interrupted run whose second unit never finished: the rerun (in fp32 this time: the correlations are
    float64 from the actors, taken as exact, and fp32's recheck settles the margins) computes that unit alone and
    writes the same tables."""
    root, _ = both
    out = tmp_path / "sim"
    shutil.copytree(root / "sim", out)
    extract = out / "extract"
    (extract / "reference_units" / MODEL / UNITS[1]).unlink()
    (extract / "reference_correlations" / MODEL / f"{LAYERS[1]}.parquet").unlink()
    (out / "one_vs_two.parquet").unlink()
    kept = {layer: (extract / "reference_correlations" / MODEL / f"{layer}.parquet").stat().st_mtime_ns
            for layer in (LAYERS[0], LAYERS[2])}  # fmt: skip
    log = []
    cfg = MisclassifiedConfig(
        layers=",".join(LAYERS), permutations=30, store="similarity", precision="fp32", out=str(out)
    ).validate()
    run_misclassified(cfg, log=log.append)
    assert "resuming: 1 of 1 shards already complete, 0 to go" in log  # the predictions pass: nothing to redo
    assert any("similarity store: 1 unit(s) of layers" in line and "(2 of 3 layers already complete)" in line
               for line in log)  # fmt: skip
    for layer, mtime in kept.items():
        assert (extract / "reference_correlations" / MODEL / f"{layer}.parquet").stat().st_mtime_ns == mtime
    recomputed = LAYERS[1] + ".parquet"
    assert pq.read_table(extract / "reference_correlations" / MODEL / recomputed).equals(
        pq.read_table(root / "sim" / "extract" / "reference_correlations" / MODEL / recomputed)
    )
    assert sorted(p.name for p in (extract / "reference_units" / MODEL).iterdir()) == UNITS
    assert pq.read_table(out / "one_vs_two.parquet").equals(pq.read_table(root / "sim" / "one_vs_two.parquet"))


def reference_table(pairs):
    n = len(pairs)
    return pa.table(
        [["m"] * n, ["L"] * n, pa.array([0] * n, pa.int32()), *(list(column) for column in zip(*pairs))],
        schema=schema.REFERENCE_CORRELATIONS,
    )


def test_stored_correlations_are_read_in_each_images_reference_order_and_bad_files_are_named(tmp_path):
    output = Output(str(tmp_path))
    pairs = [(x, ref, 0.1 * i + 0.01 * j) for i, x in enumerate("ab") for j, ref in enumerate("pqr")]
    output.write_table(reference_table(pairs), "c", "L.parquet")
    i_x = stored_reference_correlations(output, ("c", "L.parquet"), ["b", "a"], [["r", "p"], ["q", "r"]])
    r = {(x, ref): value for x, ref, value in pairs}
    np.testing.assert_array_equal(i_x.values, [[r["b", "r"], r["b", "p"]], [r["a", "q"], r["a", "r"]]])
    assert not i_x.error.any() and not i_x.fp64_error.any()  # float64 from the actor: taken as exact
    with pytest.raises(InputError, match="c/L.parquet has no correlation of image a with reference s"):
        stored_reference_correlations(output, ("c", "L.parquet"), ["a"], [["p", "s"]])
    # image b's layer output was constant (a NaN row), and so was reference q's (a NaN column)
    nan = [(x, ref, np.nan if x == "b" or ref == "q" else r) for x, ref, r in pairs]
    output.write_table(reference_table(nan), "c", "N.parquet")
    with pytest.raises(InputError, match=r"constant activation of image\(s\) b, q in c/N.parquet"):
        stored_reference_correlations(output, ("c", "N.parquet"), ["a", "b"], [["p", "q"], ["p", "r"]])


def test_store_options_are_checked_and_not_part_of_the_experiment():
    default = MisclassifiedConfig().validate().experiment_id()
    for store in ("auto", "activations", "similarity"):
        cfg = MisclassifiedConfig(store=store, similarity_memory_mb=64).validate()
        assert cfg.experiment_id() == default and "store" not in cfg.identity()
    with pytest.raises(InputError, match="unknown store mode 'disk': choose one of auto, activations, similarity"):
        MisclassifiedConfig(store="disk").validate()
    with pytest.raises(InputError, match="--similarity-memory-mb must be at least 1"):
        MisclassifiedConfig(similarity_memory_mb=0).validate()
    assert not hasattr(AdversarialConfig(), "store")  # adversarial keeps the activation store: no such option
    with pytest.raises(SystemExit) as exit_:
        main(["adversarial", "--store", "similarity"])
    assert exit_.value.code == 2
