"""Sparse word vectors (``nondist:``'s 0/1 rows) through the math, never densified, against dense references."""

import numpy as np
import pytest
import scipy.sparse

from semprobe.analysis.errors import ZeroVarianceError
from semprobe.analysis.onevtwo import reference_correlations
from semprobe.analysis.scores import layer_scores, word_matrix
from semprobe.analysis.similarity import GramAccumulator, correlation_matrix, paired_cosine

N = 120_000


@pytest.fixture(scope="module")
def rows():
    """(12, N) 0/1 float64 rows, a few hundred ones each, overlapping."""
    rng = np.random.default_rng(3)
    dense = np.zeros((12, N))
    pool = rng.choice(N, 600, replace=False)
    for k in range(len(dense)):
        dense[k, rng.choice(pool, 100 + 10 * k, replace=False)] = 1
        dense[k, rng.choice(N, 40, replace=False)] = 1
    return dense


def test_correlation_of_sparse_binary_rows_is_the_set_formula(rows):
    x = scipy.sparse.csr_array(rows.astype(np.float32))
    got = correlation_matrix(x)
    np.testing.assert_allclose(got, np.corrcoef(rows), atol=1e-12)
    for i in range(len(rows)):
        for j in range(len(rows)):
            a, b = rows[i].sum(), rows[j].sum()
            both = (rows[i] * rows[j]).sum()
            expected = (N * both - a * b) / np.sqrt((N * a - a * a) * (N * b - b * b))
            assert got[i, j] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(word_matrix(x), got.astype(np.float32))


def test_sparse_rows_need_no_dense_gram_and_reject_a_shift_or_a_constant_row(rows):
    with pytest.raises(ValueError, match="densify"):
        GramAccumulator(2, "float64", shift=np.zeros(2)).add(scipy.sparse.csr_array(rows[:2]))
    constant = scipy.sparse.csr_array(np.vstack([rows[:3], np.zeros((1, N))]))
    with pytest.raises(ZeroVarianceError, match=r"zero-variance row\(s\) \[3\]"):
        correlation_matrix(constant)


def test_reference_correlations_sparse_equal_dense(rows):
    items, refs = [0, 5, 2], [[1, 3, 4, 7], [2, 8, 9, 11], [10, 6, 1, 0]]
    dense = reference_correlations(rows, items, refs)
    got = reference_correlations(scipy.sparse.csr_array(rows), items, refs)
    np.testing.assert_allclose(got, dense, atol=1e-12)
    naive = [[np.corrcoef(rows[i], rows[r])[0, 1] for r in rs] for i, rs in zip(items, refs)]
    np.testing.assert_allclose(got, naive, atol=1e-12)
    with_constant = scipy.sparse.csr_array(np.vstack([rows, np.ones((1, N))]))
    with pytest.raises(ZeroVarianceError, match="zero-variance row 12 in the word vectors") as err:
        reference_correlations(with_constant, [0], [[1, 12, 3]], "the word vectors")
    assert err.value.rows == [12]  # the caller's row number, not a position in the rows it picked


def test_paired_cosine_sparse_equals_dense(rows):
    u, v = rows[[0, 1, 2, 3]], rows[[4, 4, 9, 3]]
    got = paired_cosine(scipy.sparse.csr_array(u), scipy.sparse.csr_array(v))
    naive = [a @ b / np.sqrt((a @ a) * (b @ b)) for a, b in zip(u, v)]
    np.testing.assert_allclose(got, naive, atol=1e-14)
    assert got[3] == pytest.approx(1.0)


def test_layer_scores_take_sparse_words(rows):
    features = {"layer": np.random.default_rng(0).standard_normal((12, 30))}
    dense = layer_scores(features, rows, permutations=20)
    sparse = layer_scores(features, scipy.sparse.csr_array(rows), permutations=20)
    assert dense.to_dicts() == sparse.to_dicts()
