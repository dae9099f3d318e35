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

Two implementations. numpy (``device=None``) is the reference. torch (``device="cpu"``, ``"cuda"``, ...) is one
code path for every device: the activations' correlations through one product on the device
(:func:`bounded_reference_correlations`), each row normalised once, and the permutations of a null stacked into
products of ``BATCH_ENTRIES`` entries, drawn exactly as numpy's (same null for any split into shards, any device).
The jobs run torch on CPUs too: at n = 1000 images, R = 100, d = 100,000 features (2 shared cores)
:func:`reference_correlations` took 213 s in numpy (a float64 copy of the rows and one dot product per pair) against
13.2 s in torch fp64 and 4.4 s in fp32; 1000 permutations of either null took 1.6-1.8 s in numpy against 1.5-2.3 s
(fp64) and 1.0-1.3 s (fp32) in torch.

``precision="fp32"`` computes in float32 and proves its decisions: each margin comes with a bound E32 on its error
against exact arithmetic and E64 on the float64 evaluation's (:class:`_Margins` derives them), and every margin
within E32 + E64 of the threshold is recomputed in float64, activations' correlations included
(:class:`Correlations` carries their bounds and their float64 recomputation), so every decision is fp64's.
``rechecked`` counts those decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.precision import UNIT_ROUNDOFF, dtype_of, gamma, matmul_error_factor
from semprobe.analysis.similarity import (
    BOUND_SAFETY,
    centred_gram,
    centred_unit_rows,
    centring_error,
    correlation_matrix,
    direction_error,
)
from semprobe.analysis.twovtwo import TIE_TOLERANCE, permutations


@dataclass(frozen=True)
class OneVsTwo:
    """accuracy: fraction of images passed; passed: (n,) bool; rechecked: how many of the n decisions the fp32
    evaluation left to float64 (0 in fp64)."""

    accuracy: float
    passed: np.ndarray
    rechecked: int = 0


@dataclass(frozen=True)
class OneVsTwoNull:
    """accuracy: (n_perm,) float64, the fraction of images passed under each permutation; rechecked: how many of
    the n_perm x n decisions the fp32 evaluation left to float64 (0 in fp64)."""

    accuracy: np.ndarray
    rechecked: int = 0


@dataclass(frozen=True)
class Correlations:
    """(n, R) correlations computed in some precision, with what makes decisions on them exact.

    values : (n, R) float64, the computed correlations
    error : (n, R) float64, a bound on ``|values - exact|``
    fp64_error : (n, R) float64, a bound on the same evaluation's error in float64
    exact : rows -> (len(rows), R) float64, the float64 evaluation of those rows (what a fp64 run computes)
    """

    values: np.ndarray
    error: np.ndarray
    fp64_error: np.ndarray
    exact: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of(cls, values) -> Correlations:
        """Given float64 values, taken as exact."""
        values = np.atleast_2d(np.asarray(values, np.float64))
        zero = np.zeros_like(values)
        return cls(values, zero, zero, lambda rows: values[rows])

    def take(self, members: Sequence[int]) -> Correlations:
        """The rows ``members``, in that order."""
        members = np.asarray(members, np.int64)
        return Correlations(
            self.values[members], self.error[members], self.fp64_error[members], lambda rows: self.exact(members[rows])
        )


def reference_correlations(
    rows,
    items: Sequence[int],
    references: Sequence[Sequence[int]],
    what: str = "the rows",
    device=None,
    precision: str = "fp64",
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
    device : str or torch.device, optional
        Unset (and fp64): the numpy reference, one float64 dot product per pair. Set: the torch path on that
        device (:func:`bounded_reference_correlations`), which the jobs use on CPU and GPU alike.
    precision : "fp64" or "fp32"

    Returns
    -------
    ndarray, (n, R) float64
        ``[k, j]``: Pearson r of rows ``items[k]`` and ``references[k][j]``.
    """
    if device is None and precision == "fp64" or scipy.sparse.issparse(rows):
        dtype_of(precision)
        return _numpy_reference_correlations(rows, items, references, what)
    return bounded_reference_correlations(rows, items, references, what, device or "cpu", precision).values


def _numpy_reference_correlations(rows, items, references, what) -> np.ndarray:
    if scipy.sparse.issparse(rows):
        return _sparse_reference_correlations(rows, items, references, what)
    z = centred_unit_rows(rows, what)
    result = np.empty((len(items), len(references[0]) if len(items) else 0))
    for k, (item, refs) in enumerate(zip(items, references)):
        # one dot product per pair, so a row's numbers do not depend on which other rows came along
        result[k] = [z[item] @ z[r] for r in refs]
    return result


def bounded_reference_correlations(
    rows,
    items: Sequence[int],
    references: Sequence[Sequence[int]],
    what: str = "the rows",
    device="cpu",
    precision: str = "fp64",
) -> Correlations:
    """:func:`reference_correlations` on ``device`` in ``precision``, with error bounds (:class:`Correlations`).

    One product of the distinct items' centred rows with the distinct references' on the device
    (:func:`semprobe.analysis.similarity.centred_gram`: float64 sums of ``GRAM_CHUNK``-feature products, and the
    bound on each correlation), then each item's R references picked out of it. ``exact`` recomputes rows in
    float64 the same way. Sparse rows go through the exact numpy path (error 0).
    """
    dtype_of(precision)
    if scipy.sparse.issparse(rows):
        return Correlations.of(_sparse_reference_correlations(rows, items, references, what))
    n, r = len(items), len(references[0]) if len(items) else 0
    if n == 0:
        return Correlations.of(np.zeros((0, 0)))
    firsts, refs = sorted(set(items)), sorted({j for refs in references for j in refs})
    gram = centred_gram(rows, firsts, refs, device=device, precision=precision, what=what)
    at_item, at_ref = {j: k for k, j in enumerate(firsts)}, {j: k for k, j in enumerate(refs)}
    ia = torch.tensor([at_item[j] for j in items], device=gram.gram.device)[:, None]
    ib = torch.tensor([[at_ref[j] for j in rs] for rs in references], device=gram.gram.device).reshape(n, r)
    values, error, error64 = (m[ia, ib].cpu().numpy() for m in (gram.correlation(), gram.error(), gram.error(True)))
    if precision == "fp64":
        return Correlations(values, error, error64, lambda k: values[k])

    def exact(k: np.ndarray) -> np.ndarray:
        chosen = [int(j) for j in k]
        return bounded_reference_correlations(
            rows, [items[j] for j in chosen], [references[j] for j in chosen], what, device, "fp64"
        ).values

    return Correlations(values, error, error64, exact)


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


SIDES = (
    "the image-reference correlations",
    "the true-class word correlations",
    "the predicted-class word correlations",
)
# Entries of a stacked (permutations, images, R) product in flight at once: 64 MB of float32.
BATCH_ENTRIES = 1 << 24


@dataclass(frozen=True)
class _Side:
    """One input's rows normalised on the device: ``z`` (k, R) in the working precision, its float64 norms, and
    bounds on ``||z - z_exact||`` of this evaluation (``direction``) and of the float64 one (``fp64_direction``)."""

    z: torch.Tensor
    norm: torch.Tensor
    direction: torch.Tensor
    fp64_direction: torch.Tensor


def _normalise(x: Correlations, dtype: torch.dtype, device: torch.device, what: str) -> _Side:
    """Centre each row and scale it to unit norm in ``dtype``, with the bounds of the module's derivation."""
    values = torch.from_numpy(x.values).to(device)
    constant = values.amax(-1) == values.amin(-1)
    if constant.any():
        rows = torch.nonzero(constant).flatten().tolist()
        raise ZeroVarianceError(f"zero-variance row {rows[0]} in {what}: its correlation is undefined", rows)
    r = values.shape[-1]
    u, u64 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float64]
    w = values.to(dtype)
    c = w - w.mean(-1, keepdim=True)
    z = c / c.square().sum(-1, keepdim=True).sqrt()
    # the bounds, in float64 on magnitudes
    error, error64 = (torch.from_numpy(e).to(device) for e in (x.error, x.fp64_error))
    centred = c.double().norm(dim=-1)
    into = error + (u if dtype != torch.float64 else 0.0) * values.abs()  # |w - exact|: upstream, then the rounding
    mean_error = gamma(r + 1, dtype) * w.double().abs().mean(-1) + into.mean(-1)
    eps = centring_error(into.norm(dim=-1) + math.sqrt(r) * mean_error, u, centred)
    magnitude64 = values.abs() + error + error64  # |x_64| of the float64 evaluation's inputs
    mean_error64 = gamma(r + 1, torch.float64) * magnitude64.mean(-1) + error64.mean(-1)
    eps64 = centring_error(error64.norm(dim=-1) + math.sqrt(r) * mean_error64, u64, centred + eps)
    low = centred - eps
    return _Side(
        z,
        z.double().norm(dim=-1),
        direction_error(eps, low) + _scaling_error(r, dtype),
        direction_error(eps64, low) + _scaling_error(r, torch.float64),
    )


def _scaling_error(r: int, dtype: torch.dtype) -> float:
    """A bound on ``||fl(c / s) - c/||c||||`` for ``s = fl(sqrt(sum c**2))``: ``s = ||c|| (1 + theta)`` with
    ``|theta| <= gamma_(r+1)`` (r - 1 additions, r squares, the root), and the division rounds once more."""
    g = gamma(r + 1, dtype)
    return (g + UNIT_ROUNDOFF[dtype]) / (1 - g)


class _Margins:
    """The margins ``m = <z_i, z_t - z_p>`` of chosen rows of the three inputs, with fp32 decisions made exact.

    Derivation of the bound. Write ``z`` for the exact unit rows, ``ẑ`` for the computed ones, ``e_x >= ||ẑ_x -
    z_x||`` (:func:`_normalise`: the centring error ``eps`` from :func:`semprobe.analysis.similarity.centring_error`
    with the inputs' own errors and their rounding into the working precision, ``|fl(mean) - mean| <=
    gamma_(R+1) mean|x| + mean|x - x_exact|``; the direction ``2 eps / ||xbar||``; the scaling
    :func:`_scaling_error`). The computed margin is ``fl(sum_r ẑ_i,r fl(ẑ_t,r - ẑ_p,r))``. Its error against
    ``<ẑ_i, ẑ_t - ẑ_p>`` is at most ``(f (1 + u) + u) ||ẑ_i|| (||ẑ_t|| + ||ẑ_p||)`` (the dot product, ``f =
    matmul_error_factor(R)``, and the subtraction's one rounding, with Cauchy-Schwarz); and ``|<ẑ_i, ẑ_t - ẑ_p> -
    <z_i, z_t - z_p>| <= e_i (||ẑ_t|| + ||ẑ_p||) + e_t + e_p`` (``||z_i|| = 1``). So

        E = (f (1 + u) + u) ||ẑ_i|| (||ẑ_t|| + ||ẑ_p||) + e_i (||ẑ_t|| + ||ẑ_p||) + e_t + e_p

    bounds ``|m_computed - m_exact|``, and the same with float64's ``u``, ``f`` and ``e`` (norms at most ``1 +
    _scaling_error``) bounds the float64 evaluation, E64. A decision ``m > TIE_TOLERANCE`` with ``|m32 -
    TIE_TOLERANCE| > E32 + E64`` is the exact one and the float64 one; every other is recomputed in float64.
    Permuting the reference columns permutes ``z`` and changes no norm, so the same bound serves the column null.
    """

    def __init__(self, i_x, d_true, d_pred, device, precision: str):
        self.dtype = dtype_of(precision)
        self.device = torch.device(device)
        self.inputs = [x if isinstance(x, Correlations) else Correlations.of(x) for x in (i_x, d_true, d_pred)]
        shapes = [x.values.shape for x in self.inputs]
        if len(set(shapes)) > 1 or shapes[0][1] < 3:
            raise InputError(
                f"1 vs. 2 needs three (n, R >= 3) matrices of one shape, got {', '.join(map(str, shapes))}"
            )
        self.n, self.r = shapes[0]
        self.sides = [_normalise(x, self.dtype, self.device, what) for x, what in zip(self.inputs, SIDES)]
        self.exact64 = self.dtype == torch.float64
        self.pending: list[tuple[torch.Tensor, ...]] = []  # (flat index, image, t row, p row, column permutation)
        f, u = matmul_error_factor(self.r, self.dtype, self.device), UNIT_ROUNDOFF[self.dtype]
        self.dot = f * (1 + u) + u
        f64, u64 = matmul_error_factor(self.r, torch.float64, self.device), UNIT_ROUNDOFF[torch.float64]
        self.dot64 = f64 * (1 + u64) + u64
        self.norm64 = 1 + _scaling_error(self.r, torch.float64)

    def bound(self, image, t, p, fp64: bool = False) -> torch.Tensor:
        """E (or E64) of the margins of rows ``image``, ``t``, ``p`` (index tensors of one shape)."""
        i_side, t_side, p_side = self.sides
        if fp64:
            pair = 2 * self.norm64
            return BOUND_SAFETY * (
                self.dot64 * self.norm64 * pair
                + i_side.fp64_direction[image] * pair
                + t_side.fp64_direction[t]
                + p_side.fp64_direction[p]
            )
        pair = t_side.norm[t] + p_side.norm[p]
        return BOUND_SAFETY * (
            self.dot * i_side.norm[image] * pair
            + i_side.direction[image] * pair
            + t_side.direction[t]
            + p_side.direction[p]
        )

    def margins(self, t: torch.Tensor | None, p: torch.Tensor | None, columns: torch.Tensor | None):
        """(c, n) margins in the working precision of the stacked cases of :meth:`decide`, and the (c, n) rows of
        each side they took."""
        zi, zt, zp = (side.z for side in self.sides)
        image = torch.arange(self.n, device=self.device).expand(len(t) if columns is None else len(columns), self.n)
        if columns is None:
            return (zi * (zt[t] - zp[p])).sum(-1), image, t, p
        return (zi * (zt - zp)[:, columns].transpose(0, 1)).sum(-1), image, image, image

    def decide(self, t: torch.Tensor | None, p: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor:
        """(c, n) bool: image j passes under each of c stacked cases. ``t``, ``p`` (c, n): the rows of the true
        and the predicted side that image j takes (the row null); or ``columns`` (c, R): the order of the reference
        columns of its own word rows (the column null). Decisions the fp32 evaluation cannot settle are queued for
        :meth:`settle`."""
        margin, image, t, p = self.margins(t, p, columns)
        passed = margin > TIE_TOLERANCE
        if self.exact64:
            return passed
        near = (margin.double() - TIE_TOLERANCE).abs() <= self.bound(image, t, p) + self.bound(image, t, p, True)
        if near.any():
            case, j = torch.nonzero(near, as_tuple=True)
            order = None if columns is None else columns[case]
            self.pending.append((passed, case, j, t[case, j], p[case, j], order))
        return passed

    def settle(self) -> int:
        """Recompute every queued decision in float64 (the inputs' float64 evaluation, ``Correlations.exact``),
        write it into its result, and return how many there were."""
        if not self.pending:
            return 0
        images = torch.unique(torch.cat([entry[2] for entry in self.pending]))
        t_rows = torch.unique(torch.cat([entry[3] for entry in self.pending]))
        p_rows = torch.unique(torch.cat([entry[4] for entry in self.pending]))
        z64 = []
        for x, rows, what in zip(self.inputs, (images, t_rows, p_rows), SIDES):
            at = torch.full((self.n,), -1, dtype=torch.int64, device=self.device)
            at[rows] = torch.arange(len(rows), device=self.device)
            exact = Correlations.of(x.exact(rows.cpu().numpy()))
            z64.append((_normalise(exact, torch.float64, self.device, what).z, at))
        (zi, ai), (zt, at), (zp, ap) = z64
        count = 0
        for passed, case, j, t, p, order in self.pending:
            if order is None:
                margin = (zi[ai[j]] * (zt[at[t]] - zp[ap[p]])).sum(-1)
            else:
                margin = (zi[ai[j]] * torch.gather(zt[at[t]] - zp[ap[p]], 1, order)).sum(-1)
            passed[case, j] = margin > TIE_TOLERANCE
            count += len(j)
        self.pending.clear()
        return count


def one_vs_two(i_x, d_true, d_pred, device=None, precision: str = "fp64") -> OneVsTwo:
    """The 1 vs. 2 test of n images at once.

    Parameters
    ----------
    i_x : (n, R) float, or :class:`Correlations`
        Row k: image k's activation correlated with the R reference activations (a :class:`Correlations` from
        :func:`bounded_reference_correlations` carries their errors, and the float64 recheck recomputes them).
    d_true, d_pred : (n, R) float
        Row k: the word vector of image k's true (source) and predicted (target)
        class, correlated with the R reference concepts' word vectors.
    device : str or torch.device, optional
        Unset (and fp64, plain arrays): the numpy reference. Set: the torch path on that device.
    precision : "fp64" or "fp32"
        fp32: margins in float32, and every image whose margin lies within the proven bound of the threshold
        recomputed in float64 (:class:`_Margins`): the decisions are fp64's; ``rechecked`` counts them.
    """
    if device is None and precision == "fp64" and not isinstance(i_x, Correlations):
        i_x, d_true, d_pred = (np.atleast_2d(np.asarray(m, np.float64)) for m in (i_x, d_true, d_pred))
        if not (i_x.shape == d_true.shape == d_pred.shape) or i_x.shape[1] < 3:
            raise InputError(
                f"1 vs. 2 needs three (n, R >= 3) matrices of one shape, got {i_x.shape}, {d_true.shape}, "
                f"{d_pred.shape}"
            )
        passed = _margins(i_x, d_true, d_pred) > TIE_TOLERANCE
        return OneVsTwo(float(passed.mean()), passed)
    margins = _Margins(i_x, d_true, d_pred, device or "cpu", precision)
    same = torch.arange(margins.n, device=margins.device)[None]
    passed = margins.decide(same, same, None)
    rechecked = margins.settle()
    passed = passed[0].cpu().numpy()
    return OneVsTwo(float(passed.mean()), passed, rechecked)


def margin_bounds(i_x, d_true, d_pred, device="cpu", precision: str = "fp32") -> tuple[np.ndarray, ...]:
    """(n,) each: the margins ``corr(i_x, d_t) - corr(i_x, d_p)`` as ``precision`` computes them on ``device``,
    the proven bound E on their error against exact arithmetic, and the bound E64 of the float64 evaluation
    (:class:`_Margins`); what :func:`one_vs_two` decides from, exposed to test and measure the bound."""
    margins = _Margins(i_x, d_true, d_pred, device, precision)
    same = torch.arange(margins.n, device=margins.device)[None]
    margin, image, t, p = margins.margins(same, same, None)
    return tuple(
        m[0].double().cpu().numpy() for m in (margin, margins.bound(image, t, p), margins.bound(image, t, p, True))
    )


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
    i_x,
    d_true,
    d_pred,
    n_perm: int,
    seed: int,
    start: int = 0,
    null: str = "rows",
    device=None,
    precision: str = "fp64",
) -> OneVsTwoNull:
    """1 vs. 2 accuracy of the n images under permutations ``start`` .. ``start + n_perm - 1``.

    Parameters
    ----------
    i_x, d_true, d_pred : (n, R) float (``i_x`` also a :class:`Correlations`)
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
    device, precision
        As :func:`one_vs_two`. The torch path normalises each row once (centring and scaling commute with
        permuting images or columns) and stacks as many permutations as ``BATCH_ENTRIES`` allows into one
        product; the same permutations, so the same null, on any device and for any split into shards.

    Returns
    -------
    OneVsTwoNull: ``accuracy`` (n_perm,) float64, the fraction of images that pass under each permutation, and
    how many decisions were rechecked in float64.
    """
    if null not in NULLS:
        raise InputError(f"unknown 1 vs. 2 null '{null}': choose one of {', '.join(NULLS)}")
    if device is None and precision == "fp64" and not isinstance(i_x, Correlations):
        i_x, d_true, d_pred = (np.atleast_2d(np.asarray(m, np.float64)) for m in (i_x, d_true, d_pred))
        one_vs_two(i_x[:1], d_true[:1], d_pred[:1])  # shapes and variances, checked once
        result = np.empty(n_perm)
        if null == "rows":
            for k, (pt, pp) in enumerate(zip(*row_permutations(len(i_x), n_perm, seed, start))):
                result[k] = np.mean(_margins(i_x, d_true[pt], d_pred[pp]) > TIE_TOLERANCE)
        else:
            for k, p in enumerate(permutations(i_x.shape[1], n_perm, seed, start)):
                result[k] = np.mean(_margins(i_x, d_true[:, p], d_pred[:, p]) > TIE_TOLERANCE)
        return OneVsTwoNull(result)
    margins = _Margins(i_x, d_true, d_pred, device or "cpu", precision)
    n, r = margins.n, margins.r
    chunk = max(1, BATCH_ENTRIES // (n * r))
    passes = []
    for lo in range(start, start + n_perm, chunk):
        size = min(chunk, start + n_perm - lo)
        if null == "rows":
            pt, pp = (torch.from_numpy(m).to(margins.device) for m in row_permutations(n, size, seed, lo))
            passes.append(margins.decide(pt, pp, None))
        else:
            columns = torch.from_numpy(permutations(r, size, seed, lo)).to(margins.device)
            passes.append(margins.decide(None, None, columns))
    rechecked = margins.settle()
    accuracy = torch.cat(passes).double().mean(1).cpu().numpy() if passes else np.zeros(0)
    return OneVsTwoNull(accuracy, rechecked)
