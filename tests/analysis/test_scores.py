"""analysis.scores: the reducer's formulas and layer_scores, against references written here."""

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

import semprobe
from semprobe.analysis.errors import InputError
from semprobe.analysis.scores import LayerTest, adjust_family, concept_pass_rates, family_columns, score
from semprobe.analysis.twovtwo import permutations, two_vs_two


def pearson(x):
    x = np.asarray(x, np.float64)
    return np.corrcoef(x.reshape(len(x), -1))


def test_score_over_sets_and_each_set():
    rng = np.random.default_rng(0)
    w, k, n_perm = 9, 3, 25
    n_pairs = w * (w - 1) // 2
    passes = rng.integers(0, n_pairs, k)
    null = rng.integers(0, n_pairs, (n_perm, k))
    over_sets, by_set = score(LayerTest(passes, null, rng.integers(0, w, (k, w)), w))
    acc = passes / n_pairs
    null_mean = null.mean(axis=1) / n_pairs  # the set-averaged accuracy under each permutation
    assert over_sets["accuracy"] == pytest.approx(acc.mean(), abs=1e-15)
    assert over_sets["std"] == pytest.approx(np.std(acc, ddof=1), abs=1e-15)
    assert over_sets["null_mean"] == pytest.approx(null_mean.mean(), abs=1e-15)
    assert over_sets["null_std"] == pytest.approx(null_mean.std(), abs=1e-15)
    assert over_sets["p_value"] == (1 + np.sum(null_mean >= acc.mean() - 1e-12)) / (1 + n_perm)
    assert (over_sets["n_concepts"], over_sets["n_pairs"], over_sets["n_perm"]) == (w, n_pairs, n_perm)
    assert len(by_set) == k
    for s, row in enumerate(by_set):
        assert row["accuracy"] == acc[s]
        assert row["p_value"] == (1 + np.sum(null[:, s] / n_pairs >= acc[s] - 1e-12)) / (1 + n_perm)
        assert "std" not in row and "p_bhy" not in row


def test_score_without_permutations_has_no_p_value():
    over_sets, (one_set,) = score(LayerTest(np.array([20]), np.zeros((0, 1), np.int64), np.zeros((1, 8)), 8))
    assert over_sets["std"] == 0.0 and over_sets["p_value"] is None and one_set["null_mean"] is None


def test_concept_pass_rates_and_adjust_family():
    concept_passes = np.array([[3, 4, 5, 6, 0], [4, 4, 4, 4, 4]])
    mean, per_set = concept_pass_rates(LayerTest(np.array([9, 10]), np.zeros((0, 2)), concept_passes, 5))
    np.testing.assert_array_equal(per_set, concept_passes / 4)
    np.testing.assert_array_equal(mean, concept_passes.mean(axis=0) / 4)
    rows = [{"p_value": p} for p in (0.001, 0.04, None, 0.5)]
    adjust_family(rows, 0.05)
    c_m = 1 + 1 / 2 + 1 / 3  # Benjamini-Yekutieli's constant for m = 3 tests
    expected = [0.001 * 3 * c_m, 0.04 * 3 / 2 * c_m, 0.5 * c_m]
    assert [r["p_bhy"] for r in rows if "p_bhy" in r] == pytest.approx([min(1, e) for e in expected])
    assert [r.get("significant") for r in rows] == [True, False, None, False]


def test_layer_scores_against_the_test_done_by_hand():
    rng = np.random.default_rng(1)
    w = 10
    words = rng.normal(size=(w, 6))
    features = {
        "late": words @ rng.normal(size=(6, 40)) + 0.3 * rng.normal(size=(w, 40)),
        "early": rng.normal(size=(w, 3, 5)),
    }
    second = {name: x + 0.1 * rng.normal(size=x.shape) for name, x in features.items()}
    df = semprobe.layer_scores(features, words, sets=[second], permutations=30, seed=4, model="m", word_model="wv")
    assert df["layer"].to_list() == ["late", "early"] and df["layer_index"].to_list() == [0, 1]
    assert set(df["model"]) == {"m"} and set(df["word_model"]) == {"wv"}
    c_word = pearson(words)
    p_values = []
    for row, layer in zip(df.iter_rows(named=True), ["late", "early"]):
        sets = [pearson(features[layer]), pearson(second[layer])]
        acc = [two_vs_two(a, c_word).accuracy for a in sets]
        null = np.array(
            [np.mean([two_vs_two(a, c_word[p][:, p]).accuracy for a in sets]) for p in permutations(w, 30, 4)]
        )
        assert row["accuracy"] == pytest.approx(np.mean(acc), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(acc, ddof=1), abs=1e-12)
        assert row["null_mean"] == pytest.approx(null.mean(), abs=1e-12)
        assert row["p_value"] == (1 + np.sum(null >= np.mean(acc) - 1e-12)) / 31
        assert (row["n_concepts"], row["n_pairs"], row["n_perm"]) == (10, 45, 30)
        p_values.append(row["p_value"])
    # Benjamini-Yekutieli over the two layers: p_(r) * m * (1 + 1/2) / r, made monotone from the top
    low, high = sorted(p_values)
    by_rank = {low: min(1, low * 2 * 1.5, high * 1.5), high: min(1, high * 1.5)}
    assert df["p_bhy"].to_list() == pytest.approx([by_rank[p] for p in p_values])
    assert df["accuracy"][0] > 0.9 > 0.7 > df["accuracy"][1]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, w: semprobe.layer_scores({"a": f[:5]}, w), "layer 'a' of image set 0 has 5 rows, but there are 8"),
        (lambda f, w: semprobe.layer_scores({"a": f}, w[:3]), "at least 4 concepts"),
        (lambda f, w: semprobe.layer_scores({"a": f}, w, concepts=["x"]), "1 concept names for 8 rows"),
        (lambda f, w: semprobe.layer_scores({"a": f}, w, sets=[{"b": f}]), "image set 1 has layers ['b']"),
        (lambda f, w: semprobe.layer_scores({"a": np.ones((8, 4))}, w), "layer 'a', image set 0"),
    ],
)
def test_layer_scores_refuses_bad_input_by_name(call, message):
    rng = np.random.default_rng(2)
    with pytest.raises(InputError, match=None) as err:
        call(rng.normal(size=(8, 20)), rng.normal(size=(8, 5)))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "family, by",
    [("all", ()), ("model", ("model",)), ("model,word_model", ("model", "word_model"))],
)
def test_family_grouping_is_statsmodels_within_each_group(family, by):
    """Two CNNs x 5 layers x 2 word models, rows in a shuffled order: BHY per family equals multipletests run on each
    group's p-values, gathered here by hand."""
    rng = np.random.default_rng(11)
    rows = [
        {"model": m, "layer": f"l{k}", "word_model": w, "p_value": float(p), "n_perm": 1000}
        for m in ("cnn_a", "cnn_b")
        for w in ("glove", "w2v")
        for k, p in enumerate(rng.choice([1 / 1001, 2 / 1001, 0.004, 0.02, 0.3, 0.9], 5))
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows.append({"model": "cnn_a", "layer": "l9", "word_model": "glove", "p_value": None, "n_perm": 0})
    assert family_columns(family) == by
    found = adjust_family(rows, 0.05, family_columns(family))
    groups = {}
    for i, row in enumerate(rows[:-1]):
        groups.setdefault(tuple(row[c] for c in by), []).append(i)
    assert [(f.key, f.rows, f.m, f.n_perm) for f in found] == [(k, v, len(v), 1000) for k, v in groups.items()]
    for members in groups.values():
        reject, adjusted, _, _ = multipletests([rows[i]["p_value"] for i in members], alpha=0.05, method="fdr_by")
        assert [rows[i]["p_bhy"] for i in members] == pytest.approx(list(adjusted), abs=1e-15)
        assert [rows[i]["significant"] for i in members] == list(reject)
    assert "p_bhy" not in rows[-1]  # untested: no p-value, in no family
    # other families, other corrections: splitting the family changes p_bhy (up or down, with what else is in it)
    everything = [dict(row) for row in rows]
    adjust_family(everything, 0.05)
    changed = [r["p_bhy"] != e["p_bhy"] for r, e in zip(rows[:-1], everything[:-1])]
    assert any(changed) == (by != ())


def test_family_columns_of_dynamics_and_unknown_families():
    assert family_columns("model", model="run") == ("run",)
    assert family_columns("model,word_model", model="run") == ("run", "word_model")
    assert family_columns("all", model="run") == ()
    with pytest.raises(InputError, match="unknown BHY family 'layer': choose one of all, model, model,word_model"):
        family_columns("layer")
