import numpy as np
import pytest

from analysis.errors import InputError
from analysis.twovtwo import TIE_TOLERANCE, two_vs_two


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
