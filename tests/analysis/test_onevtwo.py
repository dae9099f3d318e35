import numpy as np
import pytest

from semprobe.analysis.errors import InputError
from semprobe.analysis.onevtwo import one_vs_two, one_vs_two_null, reference_correlations, row_permutations
from semprobe.analysis.twovtwo import permutations


def naive(i_x, d_t, d_p):
    """As the papers state it, image by image, with numpy's Pearson r."""
    r = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    return np.array([r(i, t) - r(i, p) > 1e-9 for i, t, p in zip(i_x, d_t, d_p)])


def structured(n=30, r=12, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    d_t, d_p = rng.normal(size=(n, r)), rng.normal(size=(n, r))
    i_x = d_t + noise * rng.normal(size=(n, r))  # the image side follows the true class
    return i_x, d_t, d_p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_naive_loop_image_by_image(seed):
    i_x, d_t, d_p = structured(seed=seed)
    result = one_vs_two(i_x, d_t, d_p)
    np.testing.assert_array_equal(result.passed, naive(i_x, d_t, d_p))
    assert result.accuracy == naive(i_x, d_t, d_p).mean() and result.accuracy > 0.7
    flipped = one_vs_two(i_x, d_p, d_t)  # swapping true and predicted flips every decided image
    assert flipped.accuracy == pytest.approx(1 - result.accuracy)


def test_column_null_shuffles_reference_concepts_on_the_word_side_and_is_shard_independent():
    i_x, d_t, d_p = structured(n=25, r=10, seed=3)
    null = one_vs_two_null(i_x, d_t, d_p, n_perm=30, seed=5, null="columns")
    expected = [naive(i_x, d_t[:, p], d_p[:, p]).mean() for p in permutations(10, 30, seed=5)]
    np.testing.assert_array_equal(null, expected)
    parts = np.concatenate(
        [one_vs_two_null(i_x, d_t, d_p, n, seed=5, start=s, null="columns") for s, n in [(0, 11), (11, 19)]]
    )
    np.testing.assert_array_equal(parts, null)
    assert abs(null.mean() - 0.5) < 0.15 and one_vs_two(i_x, d_t, d_p).accuracy > np.quantile(null, 0.95)


def naive_row_null(i_x, d_t, d_p, n_perm, seed):
    """The authors' null written out: per permutation, image j keeps its i_x but takes d_t of image pt[j] and d_p of
    image pp[j], pt and pp two independent shuffles of the images (drawn in that order from default_rng([seed, k]))."""
    n, null = len(i_x), []
    for k in range(n_perm):
        rng = np.random.default_rng([seed, k])
        pt, pp = rng.permutation(n), rng.permutation(n)
        passed = []
        for j in range(n):
            r_t = np.corrcoef(i_x[j], d_t[pt[j]])[0, 1]
            r_p = np.corrcoef(i_x[j], d_p[pp[j]])[0, 1]
            passed.append(r_t - r_p > 1e-9)
        null.append(np.mean(passed))
    return np.array(null)


def test_row_null_is_the_authors_shuffle_of_images_and_is_shard_independent():
    i_x, d_t, d_p = structured(n=25, r=10, seed=3)
    null = one_vs_two_null(i_x, d_t, d_p, n_perm=40, seed=5)  # rows: the default
    np.testing.assert_array_equal(null, naive_row_null(i_x, d_t, d_p, 40, seed=5))
    np.testing.assert_array_equal(one_vs_two_null(i_x, d_t, d_p, 40, seed=5, null="rows"), null)
    parts = np.concatenate([one_vs_two_null(i_x, d_t, d_p, n, seed=5, start=s) for s, n in [(0, 7), (7, 33)]])
    np.testing.assert_array_equal(parts, null)
    assert abs(null.mean() - 0.5) < 0.1 and one_vs_two(i_x, d_t, d_p).accuracy > null.max()
    # the two sides are shuffled apart: the true side's permutation differs from the predicted side's
    true, pred = row_permutations(25, 40, seed=5)
    assert (true != pred).any(axis=1).all()
    np.testing.assert_array_equal(true[7:], row_permutations(25, 33, seed=5, start=7)[0])
    # and the null is not the column null's
    assert not np.array_equal(null[:30], one_vs_two_null(i_x, d_t, d_p, 30, seed=5, null="columns"))


def test_row_null_of_images_that_share_a_word_side_is_the_observed():
    """Shuffling identical rows changes nothing: every permutation gives the observed accuracy."""
    i_x, d_t, d_p = structured(n=6, r=8, seed=4)
    d_t[:], d_p[:] = d_t[0], d_p[0]
    observed = one_vs_two(i_x, d_t, d_p).accuracy
    np.testing.assert_array_equal(one_vs_two_null(i_x, d_t, d_p, 10, seed=1), np.full(10, observed))
    with pytest.raises(InputError, match="unknown 1 vs. 2 null 'images': choose one of rows, columns"):
        one_vs_two_null(i_x, d_t, d_p, 10, seed=1, null="images")


def test_ties_and_constant_rows():
    i_x, d_t, _ = structured(n=4, r=6)
    assert one_vs_two(i_x, d_t, d_t).accuracy == 0.0  # t = p: every image ties, and ties fail
    d_t[2] = 0.3
    with pytest.raises(InputError, match="zero-variance row 2 in the true-class word correlations"):
        one_vs_two(i_x, d_t, i_x)


def test_reference_correlations_are_numpy_pearson_item_by_item():
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(9, 30)).astype(np.float32) * 4 + 1
    items, references = [0, 4, 4], [[1, 2, 3, 5], [0, 1, 2, 8], [8, 7, 6, 5]]
    result = reference_correlations(rows, items, references)
    assert result.shape == (3, 4) and result.dtype == np.float64
    for k, (item, refs) in enumerate(zip(items, references)):
        for j, r in enumerate(refs):
            expected = np.corrcoef(rows[item].astype(np.float64), rows[r].astype(np.float64))[0, 1]
            assert result[k, j] == pytest.approx(expected, abs=1e-14)
    # an item's row does not depend on the others asked for with it
    np.testing.assert_array_equal(reference_correlations(rows, items[1:], references[1:]), result[1:])
    assert reference_correlations(rows, [], []).shape == (0, 0)
    rows[5] = 2.0
    with pytest.raises(InputError, match="zero-variance row 5 in the activations"):
        reference_correlations(rows, items, references, "the activations")
