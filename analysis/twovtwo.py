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

from semprobe.analysis.errors import InputError

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


def _check(a: np.ndarray, b: np.ndarray) -> int:
    w = a.shape[0]
    if a.shape != (w, w) or b.shape != (w, w) or w < 4:
        raise InputError(
            f"2 vs. 2 needs two square matrices over the same w >= 4 concepts, got {a.shape} and {b.shape}"
        )
    return w


class _Side:
    """Row terms of one matrix for every pair (i, j) at once.

    ``s[i, j]`` is the sum of row i with columns i and j removed and ``r[i, j]``
    is 1 / sqrt(n q - s^2), n = w - 2, q the sum of squares of that shortened
    row: the inverse of n times its standard deviation. Diagonal entries are
    placeholders (1). All O(w^2) work here and in :func:`_margins` is in-place
    numpy: it is memory-bound, and one pass per term is what it costs.
    """

    def __init__(self, m: np.ndarray, side: str):
        w = m.shape[0]
        n = w - 2
        self.m, self.d = m, np.diag(m).copy()
        self.s = np.subtract((m.sum(1) - self.d)[:, None], m)
        var = np.multiply(m, m)
        var *= -n
        var += (n * (np.einsum("ij,ij->i", m, m) - self.d**2))[:, None]
        var -= np.multiply(self.s, self.s)
        np.fill_diagonal(var, 1.0)
        if var.min() <= 0:
            i, j = np.argwhere(var <= 0)[0]
            raise InputError(f"zero-variance row in the {side} matrix: concept {i} with columns {i}, {j} removed")
        self.r = np.divide(1.0, np.sqrt(var, out=var), out=var)


class _ImageSide(_Side):
    """The image matrix's terms of :func:`_margins`, computed once for all the word matrices it meets."""

    def __init__(self, m: np.ndarray):
        super().__init__(m, "image")
        x = (m.shape[0] - 2) * self.r
        y = x * m
        self.x, self.xt, self.yt = x, x.T.copy(), y.T.copy()
        self.u = np.multiply(self.xt, self.d[None, :])  # (n r_a d_a[i])^T - n r_a a
        self.u -= y
        z = self.s * self.r
        self.v = z.T - z


def _margins(
    img: _ImageSide, b: np.ndarray, sb: np.ndarray, rb: np.ndarray, q: np.ndarray, out: np.ndarray, tmp: np.ndarray
) -> np.ndarray:
    """(..., w, w) into ``out``: matched - mismatched sums of correlations per pair; diagonal meaningless.

    ``b``, ``sb``, ``rb`` are the word side's matrix and row terms (any leading
    batch dimensions) and ``q = b @ a^T``; ``out`` and ``tmp`` are buffers of
    their shape. With n = w - 2, the terms r, s of :class:`_Side`, and columns
    i and j removed,

        corr(a_i, b_i) = r_a r_b (n (q_ii - a_ii b_ii - a_ij b_ij) - s_a s_b)
        corr(a_j, b_i) = r_a^T r_b (n (q_ij - a_jj b_ij - a_ji b_ii) - s_a^T s_b)

    so T = corr(a_i, b_i) - corr(a_j, b_i) needs no transposed word term, and the
    margin of pair (i, j) is T + T^T.
    """
    diag_b = np.diagonal(b, axis1=-2, axis2=-1)[..., :, None]
    own_dot = np.diagonal(q, axis1=-2, axis2=-1)[..., :, None] - img.d[:, None] * diag_b
    t = np.multiply(img.x, own_dot, out=tmp)
    t += np.multiply(img.yt, diag_b, out=out)
    t -= np.multiply(img.xt, q, out=out)
    t += np.multiply(img.u, b, out=out)
    t += np.multiply(img.v, sb, out=out)
    t *= rb
    return np.add(t, t.swapaxes(-1, -2), out=out)


def two_vs_two(c_img: np.ndarray, c_word: np.ndarray, device=None, precision: str = "fp64") -> TwoVsTwo:
    """Exact, vectorised 2 vs. 2 test, in numpy float64: the reference of the torch kernels
    (:mod:`semprobe.analysis.kernels`), which decide every pair alike.

    Parameters
    ----------
    c_img, c_word : ndarray, (w, w) float
        Similarity matrices over the same w >= 4 concepts in the same order.

    Returns
    -------
    TwoVsTwo

    Raises
    ------
    InputError
        If the shapes differ or a row, shortened by any pair, has no variance.
    """
    a, b = np.asarray(c_img, np.float64), np.asarray(c_word, np.float64)
    w = _check(a, b)
    img, word = _ImageSide(a), _Side(b, "word")
    q = b @ a.T
    passed = _margins(img, b, word.s, word.r, q, np.empty_like(q), np.empty_like(q)) > TIE_TOLERANCE
    np.fill_diagonal(passed, False)
    return TwoVsTwo(np.count_nonzero(passed) / (w * (w - 1)), passed)


# --- permutation tests ------------------------------------------------------------------------------


def permutations(w: int, n_perm: int, seed: int, start: int = 0) -> np.ndarray:
    """(n_perm, w) int64: permutations number start .. start + n_perm - 1 of the seeded sequence.

    Permutation k depends only on (seed, k), so any split of the sequence into
    shards reproduces it exactly.
    """
    return (
        np.stack([np.random.default_rng([seed, k]).permutation(w) for k in range(start, start + n_perm)])
        if n_perm
        else np.zeros((0, w), np.int64)
    )


@dataclass(frozen=True)
class NullDistribution:
    """passes: (n_perm, K) int64, the pairs passed under each permutation in each image set."""

    passes: np.ndarray
    n_pairs: int

    @property
    def accuracy(self) -> np.ndarray:
        """(n_perm,) float64: the set-averaged 2 vs. 2 accuracy under each permutation."""
        return self.passes.sum(axis=1) / (self.passes.shape[1] * self.n_pairs)

    @property
    def set_accuracy(self) -> np.ndarray:
        """(n_perm, K) float64: each set's accuracy under each permutation."""
        return self.passes / self.n_pairs


# Word-side permutations handled per batched product: about this many matrix entries in flight.
BATCH_ENTRIES = 1 << 20


def permutation_null(
    c_img_sets,
    c_word: np.ndarray,
    n_perm: int,
    seed: int,
    start: int = 0,
    batch: int | None = None,
) -> NullDistribution:
    """Null distribution of the set-averaged 2 vs. 2 accuracy under permuted concept labels.

    Each permutation ``p`` relabels the concepts on the word side, ``c_word[p][:, p]``,
    and the 2 vs. 2 runs against every image set's matrix. Permutations come
    from :func:`permutations` (numbers ``start`` .. ``start + n_perm - 1``), so the
    same seed gives every layer of an experiment the same permutations and shards
    ``[0, 50), [50, 100), ...`` concatenate to exactly the unsharded result.

    Parameters
    ----------
    c_img_sets : ndarray (K, w, w) or sequence of (w, w)
        One image-side similarity matrix per image set, over the same concepts.
    c_word : ndarray (w, w)
        The word-side similarity matrix.
    n_perm, seed, start : int
        How many permutations, the seed, and the number of the first.
    batch : int, optional
        Permutations per batched product (bounds memory: about 20 x batch x w^2
        float64 values); by default about 2^20 matrix entries. The result does
        not depend on it.
    """
    b = np.asarray(c_word, np.float64)
    sets = [np.asarray(a, np.float64) for a in c_img_sets]
    w = _check(sets[0], b)
    for a in sets[1:]:
        _check(a, b)
    passes = _null_passes(sets, b, permutations(w, n_perm, seed, start), batch or max(1, BATCH_ENTRIES // (w * w)))
    return NullDistribution(passes, w * (w - 1) // 2)


def _null_passes(sets: list[np.ndarray], b: np.ndarray, perms: np.ndarray, batch: int) -> np.ndarray:
    n_perm, w = perms.shape
    images = [_ImageSide(a) for a in sets]
    word = _Side(b, "word")
    passes = np.zeros((n_perm, len(sets)), np.int64)
    # One batch of buffers, reused: the permuted word matrix and row terms, the products, the margins.
    work = np.empty((4, min(batch, n_perm), w, w))
    flat = [np.ascontiguousarray(m).ravel() for m in (b, word.s, word.r)]
    out, tmp = np.empty(work.shape[1:]), np.empty(work.shape[1:])
    for lo in range(0, n_perm, batch):
        p = perms[lo : lo + batch]
        nb = len(p)
        bp, sbp, rbp, q = work[:, :nb]
        idx = p[:, :, None] * w + p[:, None, :]  # flat indices of m[p][:, p]
        for m, dest in zip(flat, (bp, sbp, rbp)):
            np.take(m, idx, out=dest, mode="clip")
        for k, img in enumerate(images):
            np.matmul(bp, img.m.T, out=q)
            margin = _margins(img, bp, sbp, rbp, q, out[:nb], tmp[:nb])
            np.einsum("...ii->...i", margin)[...] = 0  # the diagonal is not a pair
            passes[lo : lo + nb, k] = np.count_nonzero(margin > TIE_TOLERANCE, axis=(1, 2)) // 2
    return passes
