import numpy as np
import pytest

from semprobe.analysis.errors import InputError
from semprobe.analysis.stats import bhy, permutation_p_value
from semprobe.analysis.twovtwo import TIE_TOLERANCE, permutation_null, permutations, two_vs_two


def naive(c_img, c_word):
    """The test as the papers state it: a loop over pairs with numpy's Pearson r."""
    w = len(c_img)
    passed = np.zeros((w, w), bool)
    for i in range(w):
        for j in range(i + 1, w):
            keep = [m for m in range(w) if m not in (i, j)]
            a_i, a_j, b_i, b_j = c_img[i, keep], c_img[j, keep], c_word[i, keep], c_word[j, keep]
            r = lambda x, y: np.corrcoef(x, y)[0, 1]  # noqa: E731
            passed[i, j] = passed[j, i] = r(a_i, b_i) + r(a_j, b_j) - r(a_i, b_j) - r(a_j, b_i) > TIE_TOLERANCE
    return passed


def corr(x):
    return np.corrcoef(x)


@pytest.mark.parametrize("w", [4, 7, 20, 41])
def test_matches_naive_loop_pair_by_pair_on_random(w):
    rng = np.random.default_rng(w)
    c_img, c_word = corr(rng.normal(size=(w, 30))), corr(rng.normal(size=(w, 12)))
    result = two_vs_two(c_img, c_word)
    expected = naive(c_img, c_word)
    np.testing.assert_array_equal(result.passed, expected)
    assert result.accuracy == expected[np.triu_indices(w, 1)].mean()
    assert result.n_pairs == w * (w - 1) // 2


def test_structured_data_scores_high_and_pass_rates():
    rng = np.random.default_rng(3)
    shared = rng.normal(size=(25, 8))
    c_img = corr(np.hstack([shared, 0.3 * rng.normal(size=(25, 40))]))
    c_word = corr(np.hstack([shared, 0.3 * rng.normal(size=(25, 5))]))
    result = two_vs_two(c_img, c_word)
    expected = naive(c_img, c_word)
    np.testing.assert_array_equal(result.passed, expected)
    assert result.accuracy > 0.9
    np.testing.assert_allclose(result.concept_pass_rates(), expected.sum(1) / 24)


def test_identical_matrices_pass_every_pair_and_ties_fail():
    c = corr(np.random.default_rng(0).normal(size=(6, 9)))
    assert two_vs_two(c, c).accuracy == 1.0
    flat = np.ones((5, 5))
    flat[np.diag_indices(5)] = 2.0
    with pytest.raises(InputError, match="zero-variance row in the image matrix"):
        two_vs_two(flat, c[:5, :5])


def structured_sets(w, k, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(w, 6))
    word = corr(np.hstack([shared, noise * rng.normal(size=(w, 10))]))
    sets = np.stack([corr(np.hstack([shared, noise * rng.normal(size=(w, 30))])) for _ in range(k)])
    return sets, word


def test_permutation_null_is_the_2v2_of_each_permuted_word_matrix():
    sets, word = structured_sets(9, 3)
    null = permutation_null(sets, word, n_perm=12, seed=7)
    perms = permutations(9, 12, seed=7)
    assert null.passes.shape == (12, 3) and null.n_pairs == 36
    for n, p in enumerate(perms):
        permuted = word[p][:, p]
        expected = [naive(a, permuted)[np.triu_indices(9, 1)].sum() for a in sets]
        np.testing.assert_array_equal(null.passes[n], expected)
    np.testing.assert_array_equal(null.accuracy, null.passes.sum(1) / (3 * 36))


def test_permutation_null_reproducible_and_independent_of_shards_and_batches():
    sets, word = structured_sets(15, 2, seed=1)
    whole = permutation_null(sets, word, n_perm=40, seed=3)
    again = permutation_null(sets, word, n_perm=40, seed=3, batch=1)
    shards = [
        permutation_null(sets, word, n_perm=n, seed=3, start=s, batch=b)
        for s, n, b in [(0, 13, 5), (13, 20, 7), (33, 7, 64)]
    ]
    np.testing.assert_array_equal(whole.passes, again.passes)
    np.testing.assert_array_equal(whole.passes, np.concatenate([s.passes for s in shards]))
    other_seed = permutation_null(sets, word, n_perm=40, seed=4)
    assert not np.array_equal(whole.passes, other_seed.passes)
    np.testing.assert_array_equal(permutations(15, 5, 3, start=2), permutations(15, 7, 3)[2:])


def test_permutation_p_value_on_structured_and_unstructured_data():
    sets, word = structured_sets(12, 2, seed=2, noise=0.5)
    observed = np.mean([two_vs_two(a, word).accuracy for a in sets])
    null = permutation_null(sets, word, n_perm=99, seed=0)
    p = permutation_p_value(null.accuracy, observed)
    assert observed > 0.85 and p == 1 / 100  # nothing in the null reaches real structure
    assert abs(null.accuracy.mean() - 0.5) < 0.1  # the null centres on chance
    # Against its own null, a null draw is ranked by the formula (1 + #{null >= x}) / (1 + n):
    x = null.accuracy[5]
    assert permutation_p_value(null.accuracy, x) == (1 + (null.accuracy >= x).sum()) / 100


def test_bhy_matches_the_step_up_procedure_written_out():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    m = len(p)
    c_m = (1 / np.arange(1, m + 1)).sum()
    order = np.argsort(p)
    ranked = p[order] * m * c_m / np.arange(1, m + 1)
    adjusted = np.minimum(1, np.minimum.accumulate(ranked[::-1])[::-1])
    expected = np.empty(m)
    expected[order] = adjusted
    significant, p_bhy = bhy(p, alpha=0.05)
    np.testing.assert_allclose(p_bhy, expected)
    np.testing.assert_array_equal(significant, expected <= 0.05)
    assert significant.sum() == 1
