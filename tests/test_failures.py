"""``semprobe misclassified`` end to end on the packaged samples, against a reference computed here."""

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from analysis.errors import InputError
from datasets.classes import imagenet_classes
from datasets.concepts import match_concepts
from datasets.words import load_word_model
from ray_jobs.config import MisclassifiedConfig
from ray_jobs.failures import run_misclassified


def r(a, b):
    return np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1]


def reference_pool(out, seed=0):
    """The references, by the documented rule: one correctly classified image per concept (the first by id),
    concepts in the seed's shuffled order. Returns the clean manifest by image id, the pool and the order."""
    manifest = {m["image_id"]: m for m in pq.read_table(out / "extract" / "manifest.parquet").to_pylist()}
    predicted = {p["image_id"]: p["predicted_index"] for p in pq.read_table(out / "extract" / "predictions").to_pylist()}
    pool = {}
    for image_id in sorted(manifest):
        if predicted[image_id] == manifest[image_id]["class_index"]:
            pool.setdefault(manifest[image_id]["class_index"], image_id)
    return manifest, pool, [int(c) for c in np.random.default_rng(seed).permutation(sorted(pool))]


def test_severity_and_one_vs_two_through_the_layers(ray_session, tmp_path):
    out = tmp_path / "out"
    summary = run_misclassified(MisclassifiedConfig(out=str(out), permutations=50).validate(), log=lambda m: None)
    assert (summary["n_misclassified"], summary["n_correct"], summary["references"]) == (2, 12, 10)
    glove = load_word_model("glove-50d")
    words = {c["class_index"]: c["word"] for c in match_concepts(imagenet_classes(), "imagenet", [glove]).table.to_pylist()}
    vectors = dict(zip(words, glove.vectors(list(words.values())).astype(np.float64)))
    vec = vectors.__getitem__
    severity = pq.read_table(out / "severity.parquet").to_pylist()
    for s in severity:
        t, p = vec(s["true_index"]), vec(s["predicted_index"])
        assert s["cosine"] == pytest.approx(t @ p / np.linalg.norm(t) / np.linalg.norm(p), abs=1e-12)
        assert s["true_index"] != s["predicted_index"]
    assert summary["mean_severity"] == pytest.approx(np.mean([s["cosine"] for s in severity]))

    manifest, pool, order = reference_pool(out)
    rows = pq.read_table(out / "one_vs_two.parquet").to_pylist()
    assert len(rows) == 16 and all(row["n"] == 2 and row["n_references"] == 10 for row in rows)
    for row in rows:
        acts = pads.dataset(out / "extract" / "activations" / "efficientnet_lite0" / row["layer"], format="arrow").to_table()
        act = dict(zip(acts["image_id"].to_pylist(), acts["values"].combine_chunks().to_numpy_ndarray()))
        passed = []
        for s in severity:
            t, p = s["true_index"], s["predicted_index"]
            refs = [c for c in order if c not in (t, p)][:10]  # the first R that are neither t nor p
            i_x = [r(act[s["image_id"]], act[pool[c]]) for c in refs]
            d_t, d_p = [r(vec(t), vec(c)) for c in refs], [r(vec(p), vec(c)) for c in refs]
            passed.append(r(i_x, d_t) - r(i_x, d_p) > 1e-9)
        assert row["accuracy"] == np.mean(passed)
        assert 1 / 51 <= row["p_value"] <= 1 and row["p_bhy"] >= row["p_value"]
    assert (out / "figures" / "one_vs_two.png").read_bytes()[:4] == b"\x89PNG"


def test_too_few_references_is_refused(ray_session, tmp_path):
    with pytest.raises(InputError, match="--references must be at least 5"):
        MisclassifiedConfig(references=3).validate()
    with pytest.raises(InputError, match="misclassified needs ImageNet-labelled images"):
        run_misclassified(MisclassifiedConfig(images="sample:cifar100", out=str(tmp_path / "c")).validate(), log=lambda m: None)
