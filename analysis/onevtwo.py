"""The 1 vs. 2 test for single images (Dharmaretnam & Fyshe 2018, Section 3.3; 2021, Sections 4-5).

For an image x whose true (or source) class is t and whose predicted (or
target) class is p, and R reference concepts (never t or p):

    i_x = correlations of x's layer activation with the R references' activations
    d_t = correlations of t's word vector with the R references' word vectors
    d_p = correlations of p's word vector with the R references' word vectors

The test passes iff corr(i_x, d_t) > corr(i_x, d_p) (ties, to within
TIE_TOLERANCE, fail): the layer's view of x sides with the true class. Chance is 0.5.

Significance over n images (:func:`one_vs_two_null`): by default the authors' null, which shuffles
which image gets which word-correlation vector, on the true and the predicted side independently;
optionally a null that permutes the reference columns of the word side instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.similarity import centred_unit_rows, correlation_matrix
from semprobe.analysis.twovtwo import TIE_TOLERANCE, permutations


@dataclass(frozen=True)
class OneVsTwo:
    """accuracy: fraction of images passed; passed: (n,) bool."""

    accuracy: float
    passed: np.ndarray


def reference_correlations(
    rows: np.ndarray, items: Sequence[int], references: Sequence[Sequence[int]], what: str = "the rows"
) -> np.ndarray:
    """The Pearson r of each item with each of its R references: i_x, d_t or d_p of n images.

    Parameters
    ----------
    rows : array-like, (m, d) real, or a scipy.sparse matrix
        Every row the items and references name: activations of one layer (for i_x) or word vectors (d_t, d_p).
        Sparse rows (``nondist:`` word vectors) are never densified: the correlations of the rows named come
        from one sparse Gram product.
    items : (n,) int
        Row k of the result is about row ``items[k]`` of ``rows`` (image x, or the class t or p of image x).
    references : (n, R) int
        ``references[k]``: the rows of image k's R references, in order.
    what : str
        What the rows are, for the error on a constant row.

    Returns
    -------
    ndarray, (n, R) float64
        ``[k, j]``: Pearson r of rows ``items[k]`` and ``references[k][j]``.
    """
    if scipy.sparse.issparse(rows):
        return _sparse_reference_correlations(rows, items, references, what)
    z = centred_unit_rows(rows, what)
    result = np.empty((len(items), len(references[0]) if len(items) else 0))
    for k, (item, refs) in enumerate(zip(items, references)):
        # one dot product per pair, so a row's numbers do not depend on which other rows came along
        result[k] = [z[item] @ z[r] for r in refs]
    return result


def _sparse_reference_correlations(
    rows, items: Sequence[int], references: Sequence[Sequence[int]], what: str
) -> np.ndarray:
    named = sorted({*items, *(r for refs in references for r in refs)})
    at = {row: k for k, row in enumerate(named)}
    try:
        r = correlation_matrix(scipy.sparse.csr_array(rows)[named])
    except ZeroVarianceError as err:
        constant = [named[k] for k in err.rows]
        raise ZeroVarianceError(
            f"zero-variance row {constant[0]} in {what}: its correlation is undefined", constant
        ) from None
    result = np.empty((len(items), len(references[0]) if len(items) else 0))
    for k, (item, refs) in enumerate(zip(items, references)):
        result[k] = r[at[item], [at[j] for j in refs]]
    return result


def _margins(i_x: np.ndarray, d_true: np.ndarray, d_pred: np.ndarray) -> np.ndarray:
    """(..., n): corr(i_x, d_t) - corr(i_x, d_p), row by row, over the last axis (the R references)."""
    i = centred_unit_rows(i_x, "the image-reference correlations")
    t = centred_unit_rows(d_true, "the true-class word correlations")
    p = centred_unit_rows(d_pred, "the predicted-class word correlations")
    return np.einsum("...r,...r->...", i, t - p)


def one_vs_two(i_x: np.ndarray, d_true: np.ndarray, d_pred: np.ndarray) -> OneVsTwo:
    """The 1 vs. 2 test of n images at once.

    Parameters
    ----------
    i_x : (n, R) float
        Row k: image k's activation correlated with the R reference activations.
    d_true, d_pred : (n, R) float
        Row k: the word vector of image k's true (source) and predicted (target)
        class, correlated with the R reference concepts' word vectors.
    """
    i_x, d_true, d_pred = (np.atleast_2d(np.asarray(m, np.float64)) for m in (i_x, d_true, d_pred))
    if not (i_x.shape == d_true.shape == d_pred.shape) or i_x.shape[1] < 3:
        raise InputError(
            f"1 vs. 2 needs three (n, R >= 3) matrices of one shape, got {i_x.shape}, {d_true.shape}, {d_pred.shape}"
        )
    passed = _margins(i_x, d_true, d_pred) > TIE_TOLERANCE
    return OneVsTwo(float(passed.mean()), passed)


NULLS = ("rows", "columns")


def row_permutations(n: int, n_perm: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (n_perm, n) int64 arrays: permutation k of the true side's rows and, independent of it, of the predicted
    side's, for k = start .. start + n_perm - 1.

    Both of permutation k come from ``numpy.random.default_rng([seed, k])`` alone (first the true side's, then
    the predicted side's), so any split of the sequence into shards reproduces it exactly.
    """
    true, pred = np.zeros((n_perm, n), np.int64), np.zeros((n_perm, n), np.int64)
    for row, k in enumerate(range(start, start + n_perm)):
        rng = np.random.default_rng([seed, k])
        true[row], pred[row] = rng.permutation(n), rng.permutation(n)
    return true, pred


def one_vs_two_null(
    i_x: np.ndarray,
    d_true: np.ndarray,
    d_pred: np.ndarray,
    n_perm: int,
    seed: int,
    start: int = 0,
    null: str = "rows",
) -> np.ndarray:
    """(n_perm,) 1 vs. 2 accuracy of the n images under permutations ``start`` .. ``start + n_perm - 1``.

    Parameters
    ----------
    i_x, d_true, d_pred : (n, R) float
        As :func:`one_vs_two`.
    n_perm, seed, start : int
        Permutation k depends only on (seed, k): any split into shards reproduces the unsharded null exactly.
    null : "rows" or "columns"
        ``rows`` (the authors' null, as their one_vs_two scripts shuffle): which image gets which
        word-correlation vector, shuffled independently on the true and the predicted side (permutation k
        takes image j's d_t from image ``pt[j]`` and its d_p from image ``pp[j]``, with ``pt, pp`` from
        :func:`row_permutations`), while each image keeps its own i_x. Each image's references are the first R
        concepts that are neither its t nor its p, so a borrowed row may list a few references of its own; under
        the null that misalignment is part of what is shuffled anyway. ``columns``: permutation ``p`` of
        :func:`semprobe.analysis.twovtwo.permutations` reorders the R reference columns of ``d_true`` and
        ``d_pred`` alike (the same ``p`` for every image), so the word side no longer lines up with the image
        side over the references.

    Returns
    -------
    ndarray (n_perm,) float64: the fraction of images that pass under each permutation.
    """
    if null not in NULLS:
        raise InputError(f"unknown 1 vs. 2 null '{null}': choose one of {', '.join(NULLS)}")
    i_x, d_true, d_pred = (np.atleast_2d(np.asarray(m, np.float64)) for m in (i_x, d_true, d_pred))
    one_vs_two(i_x[:1], d_true[:1], d_pred[:1])  # shapes and variances, checked once
    result = np.empty(n_perm)
    if null == "rows":
        for k, (pt, pp) in enumerate(zip(*row_permutations(len(i_x), n_perm, seed, start))):
            result[k] = np.mean(_margins(i_x, d_true[pt], d_pred[pp]) > TIE_TOLERANCE)
    else:
        for k, p in enumerate(permutations(i_x.shape[1], n_perm, seed, start)):
            result[k] = np.mean(_margins(i_x, d_true[:, p], d_pred[:, p]) > TIE_TOLERANCE)
    return result
