"""The 2 vs. 2 test between two concept-by-concept similarity matrices (Dharmaretnam & Fyshe 2018).

For a pair of concepts (i, j), take rows i and j of both matrices with columns
i and j removed; the pair passes iff

    corr(a_i, b_i) + corr(a_j, b_j) > corr(a_i, b_j) + corr(a_j, b_i)

(strictly: ties, to within TIE_TOLERANCE, fail), where a are rows of the image matrix and b of the word
matrix. All w(w-1)/2 pairs are computed exactly from one w x w x w product
``P = C_img @ C_word.T`` and O(w^2) corrections for the two dropped columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.errors import InputError

# Sums of correlations that differ by less than this are ties: exact ties (w = 4 makes
# every correlation +-1) must fail whatever the rounding of the method that computed them.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class TwoVsTwo:
    """accuracy: fraction of pairs passed; passed: (w, w) bool, symmetric, pair (i, j) for i != j."""

    accuracy: float
    passed: np.ndarray

    @property
    def n_pairs(self) -> int:
        w = self.passed.shape[0]
        return w * (w - 1) // 2

    def concept_pass_rates(self) -> np.ndarray:
        """(w,) float64: for each concept, the fraction of its w-1 pairs that passed."""
        w = self.passed.shape[0]
        return self.passed.sum(axis=1) / (w - 1)


def two_vs_two(c_img: np.ndarray, c_word: np.ndarray) -> TwoVsTwo:
    """Exact, vectorised 2 vs. 2 test.

    Parameters
    ----------
    c_img, c_word : ndarray, (w, w) float
        Similarity matrices over the same w >= 4 concepts in the same order.

    Returns
    -------
    TwoVsTwo
    """
    a, b = np.asarray(c_img, np.float64), np.asarray(c_word, np.float64)
    w = a.shape[0]
    if a.shape != (w, w) or b.shape != (w, w) or w < 4:
        raise InputError(f"2 vs. 2 needs two square matrices over the same w >= 4 concepts, got {a.shape} and {b.shape}")
    n = w - 2
    p = a @ b.T  # p[i, k] = sum over all columns m of a[i, m] * b[k, m]
    da, db = np.diag(a)[:, None], np.diag(b)[:, None]
    # [i, j]: sums over row i with columns i and j removed
    sa, qa = a.sum(1)[:, None] - da - a, (a * a).sum(1)[:, None] - da**2 - a**2
    sb, qb = b.sum(1)[:, None] - db - b, (b * b).sum(1)[:, None] - db**2 - b**2
    same = np.diag(p)[:, None] - da * db - a * b  # <a_i, b_i> without columns i, j
    cross = p - da * b.T - a * np.diag(b)[None, :]  # <a_i, b_j> without columns i, j
    var_a, var_b = n * qa - sa**2, n * qb - sb**2
    off = ~np.eye(w, dtype=bool)
    if (var_a[off] <= 0).any() or (var_b[off] <= 0).any():
        side, bad = ("image", var_a) if (var_a[off] <= 0).any() else ("word", var_b)
        i, j = np.argwhere((bad <= 0) & off)[0]
        raise InputError(f"zero-variance row in the {side} matrix: concept {i} with columns {i}, {j} removed")

    def corr(xy, s_x, s_y, v_x, v_y):
        return (n * xy - s_x * s_y) / np.sqrt(v_x * v_y)

    # [i, j] of these: corr(a_i, b_i) and corr(a_i, b_j), each with columns i and j removed;
    # the transposes give corr(a_j, b_j) and corr(a_j, b_i).
    own = corr(same, sa, sb, var_a, var_b)
    other = corr(cross, sa, sb.T, var_a, var_b.T)
    matched, mismatched = own + own.T, other + other.T
    passed = (matched - mismatched > TIE_TOLERANCE) & off
    iu = np.triu_indices(w, 1)
    return TwoVsTwo(float(passed[iu].mean()), passed)

