"""Affine maps between CNN feature spaces (McNeely-White 2020, "Same data, same features").

One pass over the training images accumulates the joint Gram matrix of the
concatenated penultimate features of every CNN plus a ones column,
``Z^T Z`` with ``Z = [x_A, x_B, ..., 1]``. Any shard of images gives a partial
Gram; partials add. Every ordered pair's least-squares map A -> B then comes
from sub-blocks of the sum, so the images are never held at once and the cost
of the solve does not grow with their number.

Convention: features are rows; a map is ``x_B ~ x_A @ weight + bias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import add_gram

# A normal-equation matrix whose reciprocal condition number (1-norm) is below this
# gives a fit that rounding, not the data, decides.
RCOND_MIN = 1e-12


class JointGram:
    """Running ``Z^T Z`` (float64) of ``Z = [features of each model..., 1]``, one row per image.

    ``gram``, if given: sums accumulated elsewhere (a checkpoint), (D + 1, D + 1) with D the sum of ``widths``.
    """

    def __init__(self, names: Sequence[str], widths: Sequence[int], gram: np.ndarray | None = None):
        self.names, self.widths = list(names), [int(w) for w in widths]
        edges = np.cumsum([0, *self.widths])
        self.slices = {n: slice(int(a), int(b)) for n, a, b in zip(self.names, edges[:-1], edges[1:])}
        size = int(edges[-1]) + 1
        if gram is not None and np.shape(gram) != (size, size):
            raise InputError(f"a joint Gram of {', '.join(self.names)} is {size} x {size}, got {np.shape(gram)}")
        self.gram = np.zeros((size, size)) if gram is None else np.asarray(gram, np.float64)

    @property
    def n(self) -> int:
        """Images accumulated (the ones column's sum of squares)."""
        return int(round(self.gram[-1, -1]))

    def add(self, features: Sequence[np.ndarray]) -> None:
        """Fold in one batch: one (n, width) array per model, rows the same images in the same order."""
        z = np.empty((len(features[0]), self.gram.shape[0]))
        for name, f in zip(self.names, features):
            z[:, self.slices[name]] = f
        z[:, -1] = 1.0
        add_gram(self.gram, z)  # not numpy's z.T @ z: its OpenBLAS kernel crashes at the thesis's width

    def merge(self, other: JointGram) -> JointGram:
        """Add another Gram of the same models over other images (a shard, an actor's checkpoint)."""
        self.gram += other.gram
        return self

    def moments(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and the sums block of ``name`` against every column: (d, D)."""
        s = self.slices[name]
        return self.gram[s, -1] / self.gram[-1, -1], self.gram[s]


@dataclass(frozen=True)
class AffineMap:
    """``x_B ~ x_A @ weight + bias``.

    rcond: reciprocal condition number of the system solved; r2: the share of the
    target features' total variance the map explains on the training images
    (1 for an exact affine relation).
    """

    source: str
    target: str
    weight: np.ndarray  # (d_A, d_B)
    bias: np.ndarray  # (d_B,)
    rcond: float
    r2: float = float("nan")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


def fit_affine(gram: JointGram, source: str, targets: Sequence[str], ridge: float = 0.0) -> list[AffineMap]:
    """Least-squares affine maps from ``source`` to each target, from the accumulated Gram alone.

    Solved in centred coordinates (the intercept absorbs the means, which keeps
    the system as well conditioned as the features allow): with covariances
    ``S``, ``weight = (S_AA + ridge I)^-1 S_AB`` and ``bias = mean_B - mean_A @ weight``,
    by one Cholesky factorisation per source for all its targets. ``ridge`` is
    added to the diagonal of the feature covariance (it does not shrink the
    intercept); 0 is ordinary least squares.

    Raises
    ------
    InputError
        If the system is underdetermined (no more images than the source has
        features) or numerically singular, and ``ridge`` is 0: the fit would be
        meaningless, so say so rather than return it.
    """
    n, d = gram.n, gram.widths[gram.names.index(source)]
    if ridge < 0:
        raise InputError(f"--ridge must be at least 0, got {ridge}")
    if ridge == 0 and n <= d:
        raise InputError(
            f"underdetermined: {n} training images for the {d} features (+ bias) of {source}; "
            "use more images than features, or pass --ridge L > 0"
        )
    mean_a, sums_a = gram.moments(source)
    s = gram.slices[source]
    cov_aa = sums_a[:, s] / n - np.outer(mean_a, mean_a)
    cov_aa[np.diag_indices(d)] += ridge
    try:
        factor = scipy.linalg.cho_factor(cov_aa)
        rcond = float(scipy.linalg.lapack.dpocon(factor[0], np.abs(cov_aa).sum(axis=0).max())[0])
    except scipy.linalg.LinAlgError:
        rcond = 0.0
    if rcond < RCOND_MIN:
        raise InputError(
            f"the features of {source} are (numerically) linearly dependent on the training images "
            f"(reciprocal condition {rcond:.1e}): pass --ridge L > 0" + (f" larger than {ridge}" if ridge else "")
        )
    maps = []
    for target in targets:
        mean_b, sums_b = gram.moments(target)
        t = gram.slices[target]
        cov_ab = sums_a[:, t] / n - np.outer(mean_a, mean_b)
        weight = scipy.linalg.cho_solve(factor, cov_ab)
        # residual variance tr(S_BB) - 2 tr(W'S_AB) + tr(W'S_AA W), where S_AA W = S_AB - ridge W
        total = float(np.trace(sums_b[:, t]) / n - mean_b @ mean_b)
        explained = float(np.sum(weight * cov_ab)) + ridge * float(np.sum(weight * weight))
        r2 = 1 - (total - explained) / total if total > 0 else float("nan")
        maps.append(AffineMap(source, target, weight, mean_b - mean_a @ weight, rcond, r2))
    return maps


@dataclass(frozen=True)
class LogitMap(AffineMap):
    """The logit-compatibility map; rank is that of the target classifier's weight matrix."""

    rank: int = 0
    n_classes: int = 0

    @property
    def full_row_rank(self) -> bool:
        return self.rank == self.n_classes


def logit_map(source: str, target: str, w_a: np.ndarray, b_a: np.ndarray, w_b: np.ndarray, b_b: np.ndarray) -> LogitMap:
    """``x_B = pinv(W_B) (W_A x_A + b_A - b_B)``: A's logits, carried into B's feature space.

    With W (classes, features) and b (classes,) each CNN's final linear
    classifier. When W_B has full row rank (rank = classes, which needs at least
    as many features as classes), ``W_B pinv(W_B) = I`` and B's classifier gives
    back exactly A's logits: no loss at all. ``rank`` says whether that holds.
    """
    pinv_b = np.linalg.pinv(w_b.astype(np.float64))  # (d_B, classes)
    weight = w_a.astype(np.float64).T @ pinv_b.T
    bias = (b_a.astype(np.float64) - b_b) @ pinv_b.T
    rank = int(np.linalg.matrix_rank(w_b.astype(np.float64)))
    return LogitMap(source, target, weight, bias, rcond=float("nan"), rank=rank, n_classes=w_b.shape[0])


def naive_map(source: str, target: str, d_a: int, d_b: int) -> AffineMap:
    """The baseline: A's features fed straight to B, truncated or zero-padded to B's width."""
    return AffineMap(source, target, np.eye(d_a, d_b), np.zeros(d_b), rcond=float("nan"))


def classifier_head(mapping: AffineMap, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The target's linear classifier composed with a map: one linear classifier on the source's features.

    Parameters
    ----------
    mapping : AffineMap
        ``x_B ~ x_A @ weight + bias``, weight (d_A, d_B), bias (d_B,).
    w : ndarray, (classes, d_B) float
    b : ndarray, (classes,) float
        The target CNN's final linear classifier.

    Returns
    -------
    (ndarray, (classes, d_A), ndarray, (classes,)), float64
        ``(w_AB, b_AB)`` with ``x_A @ w_AB.T + b_AB == mapping(x_A) @ w.T + b`` (to rounding): the logits without
        the d_B-wide mapped features. ``w_AB`` is the transpose of a C-ordered (d_A, classes) array.
    """
    return (mapping.weight @ w.T).T, mapping.bias @ w.T + b


def correct_count(
    features: np.ndarray, labels: np.ndarray, mapping: AffineMap | None, w: np.ndarray, b: np.ndarray, rows: int = 4096
) -> int:
    """How many images a linear classifier (w, b) puts in their class, on (optionally mapped) features.

    Parameters
    ----------
    features : array-like, (n, d_A) real
        One row per image; read in chunks of ``rows`` rows, cast to float64.
    labels : ndarray, (n,) int
        Each image's class.
    mapping : AffineMap or None
        Applied to the features first; None: the features as they are.
    w : ndarray, (classes, d) float
    b : ndarray, (classes,) float
        The classifier: logits ``x @ w.T + b``, its top-1 the argmax (the first on a tie).

    Returns
    -------
    int
        Images whose top-1 class is their label.
    """
    correct = 0
    for lo in range(0, len(features), rows):
        x = np.asarray(features[lo : lo + rows], np.float64)
        if mapping is not None:
            x = mapping(x)
        correct += int(np.count_nonzero((x @ w.T + b).argmax(axis=1) == labels[lo : lo + rows]))
    return correct


def accuracy(
    features: np.ndarray, labels: np.ndarray, mapping: AffineMap | None, w: np.ndarray, b: np.ndarray, rows: int = 4096
) -> float:
    """Top-1 accuracy of a linear classifier (w, b) on (optionally mapped) features: :func:`correct_count` / n.

    Shapes as :func:`correct_count`; returns a float in [0, 1].
    """
    return correct_count(features, labels, mapping, w, b, rows) / len(features)
