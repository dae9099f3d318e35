"""Similarity structure of representations: z-scored rows whose Gram product is Pearson r."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.precision import UNIT_ROUNDOFF, dtype_of, gamma, matmul_error_factor

# A row whose standard deviation is below this fraction of its mean is constant to
# float32 precision: its "z-scores" would be rounding noise blown up to norm 1.
RELATIVE_STD_FLOOR = 1e-6


def zscore_rows(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre each row and scale it to unit L2 norm, so that ``z @ z.T`` is Pearson r.

    Parameters
    ----------
    x : Tensor, (n, ...) any real dtype
        One row per item (image); trailing dimensions are flattened.
    out_dtype : torch.dtype
        dtype of the result; the statistics and the scaling are computed in
        float32 (float64 for float64 input), then cast.

    Returns
    -------
    Tensor, (n, d) out_dtype, a new tensor (never a view of x)
        Row i has mean 0 and L2 norm 1. A zero-variance row has no defined
        correlation with anything and comes back as all zeros (norm 0), which
        every consumer of these rows rejects by name.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # oneDNN and cuDNN often run convolutions channels-last. Mean and norm do not
        # depend on the order of the features, so normalise in memory order and put
        # the features back in (C, H, W) order during the final cast: one copy, not two.
        n, c, h, w = x.shape
        z = zscore_rows(x.permute(0, 2, 3, 1), out_dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
        return z.view(n, h, w, c).permute(0, 3, 1, 2).to(out_dtype, memory_format=torch.contiguous_format).view(n, -1)
    rows = x.reshape(x.shape[0], -1)
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    d = rows.shape[1]
    # One fused pass for mean, variance and the scaling: layer_norm over the whole
    # row, with a constant weight that turns unit variance into unit L2 norm.
    weight = torch.full((d,), d**-0.5, dtype=rows.dtype, device=rows.device)
    z, mean, rstd = torch.native_layer_norm(rows, (d,), weight, None, 0.0)
    constant = ~torch.isfinite(rstd) | (rstd * mean.abs() > 1 / RELATIVE_STD_FLOOR)
    if constant.any():
        z = z.masked_fill(constant.view(-1, 1), 0.0)
    return z if z.dtype == out_dtype else z.to(out_dtype)


def add_gram(out: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``out += zᵀ z`` in float64, in place, through torch's BLAS; returns ``out``.

    ``z`` (n, D) real; ``out`` (D, D) float64, writable. Not numpy's ``z.T @ z``: numpy hands aᵀa to its
    bundled OpenBLAS's symmetric rank-k update (dsyrk), whose multi-threaded copy kernel
    (``dgemm_oncopy_SKYLAKEX``) segfaults on AMD EPYC for widths D >= about 20,000 (numpy issue #19685): the
    thesis's ten CNNs have a joint width of 23,777. ``Tensor.addmm_`` is a plain gemm of torch's own BLAS
    (MKL in the x86 wheels; cuBLAS on a GPU), which that kernel is no part of, and it accumulates into ``out``
    without a D x D temporary.
    """
    x = torch.from_numpy(np.ascontiguousarray(z, np.float64))
    torch.from_numpy(out).addmm_(x.T, x)
    return out


class GramAccumulator:
    """Pearson correlations between w rows, accumulated over chunks of their features.

    For rows too long to hold at once (VGG-16's first layer has 3.2 M features per
    image): ``add`` each (w, d_chunk) slice of the rows in turn, from one process
    or several (``merge`` sums partial accumulators), then ``correlation``. Each
    chunk's Gram product runs in ``compute`` precision (float32 or float64); the
    running sums are float64.

    Pearson r is invariant to a constant shift of each row, and the sums are most
    accurate when the rows are centred: pass ``shift`` (w,), e.g. the row means,
    for raw data; z-scored rows, as the activation store holds them, need none.
    """

    def __init__(self, w: int, compute: str = "float32", shift: np.ndarray | None = None):
        if compute not in ("float32", "float64"):
            raise InputError(f"unknown compute precision '{compute}': choose float32 or float64")
        self.compute = np.dtype(compute)
        self.shift = None if shift is None else np.asarray(shift, self.compute).reshape(w, 1)
        self.gram = np.zeros((w, w), np.float64)
        self.sums = np.zeros(w, np.float64)
        self.n_features = 0

    def add(self, chunk: np.ndarray) -> None:
        """Fold in a (w, d_chunk) slice of the rows' features (any real dtype; or a scipy.sparse matrix,
        whose sparse Gram product is the only one made: no row is densified)."""
        if scipy.sparse.issparse(chunk):
            if self.shift is not None:
                raise InputError("a shift would densify sparse rows: pass them unshifted")
            x = scipy.sparse.csr_array(chunk, dtype=self.compute)
            self.gram += (x @ x.T).toarray()
            self.sums += np.asarray(x.sum(axis=1), np.float64).ravel()
            self.n_features += x.shape[1]
            return
        x = np.asarray(chunk, self.compute)
        if self.shift is not None:
            x = x - self.shift
        self.gram += x @ x.T
        self.sums += x.sum(axis=1, dtype=np.float64)
        self.n_features += x.shape[1]

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add another accumulator's sums over other features of the same rows (same shift)."""
        self.gram += other.gram
        self.sums += other.sums
        self.n_features += other.n_features
        return self

    def correlation(self) -> np.ndarray:
        """(w, w) float64 Pearson r; raises ZeroVarianceError naming constant rows."""
        d = self.n_features
        cov = self.gram - np.outer(self.sums, self.sums) / d
        var = np.diag(cov).copy()
        # A row whose variance is below float rounding of its sum of squares is constant.
        constant = var <= RELATIVE_STD_FLOOR**2 * np.maximum(np.diag(self.gram), np.finfo(np.float64).tiny)
        if constant.any():
            rows = np.flatnonzero(constant).tolist()
            raise ZeroVarianceError(f"zero-variance row(s) {rows[:5]}: their correlations are undefined", rows)
        scale = 1 / np.sqrt(var)
        r = cov * scale[:, None] * scale[None, :]
        np.fill_diagonal(r, 1.0)
        return np.clip(r, -1.0, 1.0, out=r)


def correlation_from_rows(
    z: torch.Tensor, compute: str = "float32", block: int | None = None, constant: str = "raise"
) -> torch.Tensor:
    """(w, w) float64 Pearson r between the rows of ``z``, on ``z``'s device: the torch twin of
    :class:`GramAccumulator`, for rows already resident on a device (``semprobe run --store similarity``).

    Parameters
    ----------
    z : Tensor, (w, d) any real dtype (float16 as the activation store keeps rows)
        One row per concept, e.g. :func:`zscore_rows`' output. Need not be centred: as in
        :class:`GramAccumulator`, the float64 row sums remove the means.
    compute : "float32" or "float64"
        Precision of each feature chunk's Gram product; the Gram and the row sums are accumulated
        across chunks in float64, exactly as :meth:`GramAccumulator.add` does.
    block : int, optional
        Features per chunk (default: all at once), so that at most w x block values are converted
        to ``compute`` at a time.
    constant : "raise" or "nan"
        A zero-variance row (the same test as :meth:`GramAccumulator.correlation`: its variance is
        below float rounding of its sum of squares) raises ZeroVarianceError naming the rows, or,
        with "nan", gets NaN in its row and column, so that a caller holding more rows than it
        needs can decide later whether the constant row matters.

    Returns
    -------
    Tensor, (w, w) float64 on z's device; diagonal 1 (NaN for a constant row with "nan"), clipped to [-1, 1].
    """
    if compute not in ("float32", "float64"):
        raise InputError(f"unknown compute precision '{compute}': choose float32 or float64")
    if constant not in ("raise", "nan"):
        raise InputError(f"unknown constant-row handling '{constant}': choose raise or nan")
    w, d = z.shape
    dtype = getattr(torch, compute)
    gram = torch.zeros((w, w), dtype=torch.float64, device=z.device)
    sums = torch.zeros(w, dtype=torch.float64, device=z.device)
    step = max(1, min(d, block or d))
    # float32 means float32: TF32 (which a job may allow for its statistics) would round the products to 10 bits.
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        for lo in range(0, d, step):
            x = z[:, lo : lo + step].to(dtype)
            gram += (x @ x.T).to(torch.float64)  # the product in `compute`, the running sum in float64
            sums += x.sum(dim=1, dtype=torch.float64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    cov = gram - torch.outer(sums, sums) / d
    var = torch.diagonal(cov).clone()
    floor = torch.clamp_min(torch.diagonal(gram), torch.finfo(torch.float64).tiny)
    flat = var <= RELATIVE_STD_FLOOR**2 * floor
    if flat.any() and constant == "raise":
        rows = torch.nonzero(flat).flatten().tolist()
        raise ZeroVarianceError(f"zero-variance row(s) {rows[:5]}: their correlations are undefined", rows)
    scale = 1 / torch.sqrt(torch.where(flat, torch.ones_like(var), var))
    r = cov * scale[:, None] * scale[None, :]
    r.fill_diagonal_(1.0)
    r = r.clamp_(-1.0, 1.0)
    if flat.any():
        r[flat, :] = float("nan")
        r[:, flat] = float("nan")
    return r


def chunk_layers(dims: list[int], w: int, itemsize: int, budget_bytes: int) -> list[list[int]]:
    """Group layers, in catalog order, into chunks whose resident rows fit a memory budget.

    The rule of ``semprobe run --store similarity``: consecutive layers join a chunk while
    ``w x sum(d) x itemsize``, the z-scored rows of one image set of every layer in the chunk, stays
    within ``budget_bytes``; a layer whose own rows exceed the budget gets a chunk of its own.

    Parameters
    ----------
    dims : features d of each layer, in catalog order
    w : rows per layer (the image set's images)
    itemsize : bytes per value (2 for float16)
    budget_bytes : the memory the rows may take

    Returns
    -------
    list of chunks, each a list of positions into ``dims``, in order; together every position once.
    """
    chunks: list[list[int]] = []
    used = 0
    for i, d in enumerate(dims):
        size = w * d * itemsize
        if chunks and used + size <= budget_bytes:
            chunks[-1].append(i)
            used += size
        else:
            chunks.append([i])
            used = size
    return chunks


def correlation_matrix(
    x, compute: str = "float64", block: int | None = None, device=None, precision: str = "fp64"
) -> np.ndarray:
    """(w, w) Pearson correlations between the rows of ``x``.

    Parameters
    ----------
    x : array-like, (w, ...) real, or a (w, d) scipy.sparse matrix
        One row per item (a concept's activation or word vector); trailing
        dimensions are flattened. Any object with numpy slicing works,
        including a memory-mapped array. Sparse rows (``nondist:`` word vectors,
        171,839 binary features) go through one sparse Gram product and are never
        densified; for binary rows with ``|a|`` ones of n the result is
        ``(n|a∩b| - |a||b|) / sqrt((n|a| - |a|²)(n|b| - |b|²))``.
    compute : "float64" (default) or "float32"
        Precision of the Gram products; sums are float64 either way.
    block : int, optional
        Features per chunk. Unset, the rows are z-scored and multiplied in one
        Gram product; set, the Gram is summed over chunks of ``block`` features
        (see :class:`GramAccumulator`), so no more than w x block values are
        converted at a time.
    device : str or torch.device, optional
        Unset: the numpy reference above (``compute`` and ``block`` apply). Set (``"cpu"``, ``"cuda"``, ...): the
        torch path, :func:`centred_gram` on that device (``compute`` and ``block`` do not apply).
    precision : "fp64" (default) or "fp32"
        Precision of the torch path's products (:mod:`semprobe.analysis.precision`); its sums are float64.

    Raises
    ------
    ZeroVarianceError
        If a row is constant: its correlation with anything is undefined.
    """
    w = x.shape[0]
    if device is not None and not scipy.sparse.issparse(x):
        return centred_gram(x, device=device, precision=precision).correlation().cpu().numpy()
    if scipy.sparse.issparse(x):
        acc = GramAccumulator(w, "float64")  # exact for 0/1 rows: integer counts
        acc.add(x)
        return acc.correlation()
    rows = x.reshape(w, -1)
    d = rows.shape[1]
    if block is None:
        z = zscore_rows(torch.as_tensor(np.asarray(rows, compute)), out_dtype=getattr(torch, compute)).numpy()
        acc = GramAccumulator(w, compute)
        acc.add(z)
        return acc.correlation()
    means = np.zeros(w, np.float64)
    for start in range(0, d, block):
        means += rows[:, start : start + block].sum(axis=1, dtype=np.float64)
    acc = GramAccumulator(w, compute, shift=means / d)
    for start in range(0, d, block):
        acc.add(rows[:, start : start + block])
    return acc.correlation()


# Features per product of the torch Gram: its error bound grows with the length of the float32 dot products, so they
# are kept this short and their results summed in float64 (gamma_1024 of float32 is 6.1e-5, gamma_d at d = 10^5 0.6%).
GRAM_CHUNK = 1024
# The bounds are evaluated in float64 on magnitudes: their own relative rounding, at most gamma_(d+8) of float64,
# is below 2**-20 for any d under 2**32 features; this factor covers it.
BOUND_SAFETY = 1 + 2.0**-20


def centring_error(a: torch.Tensor, unit_roundoff: float, centred_norm: torch.Tensor) -> torch.Tensor:
    """A bound on ``||c - xbar||_2``, the computed centred row ``c`` against the exact one, given the part ``a`` of
    the bound that does not depend on ``c`` and an upper bound on ``||c||``: ``c_r = (x_r - mu)(1 + delta)`` with
    ``|delta| <= u`` adds ``u/(1-u) |c_r|``, and ``||c|| <= centred_norm`` (or, solving ``e <= a + u'(N + e)``
    for a norm ``N`` of the exact row, the same form divided by ``1 - u'``, which this always applies)."""
    u = unit_roundoff / (1 - unit_roundoff)
    return BOUND_SAFETY * (a + u * centred_norm) / (1 - u)


def direction_error(eps: torch.Tensor, norm_low: torch.Tensor) -> torch.Tensor:
    """A bound on ``||c/||c|| - xbar/||xbar||||`` from ``eps >= ||c - xbar||`` and ``norm_low <= ||xbar||``:
    ``2 eps / ||xbar||`` (for any v, w != 0, ``||v/|v| - w/|w||| <= ||v - w||/|w| + ||w| - |v||/|w| <= 2 ||v -
    w||/|w|``); infinite when ``norm_low`` is not positive (the row's direction is then unknown, and every decision
    on it is rechecked)."""
    return torch.where(norm_low > 0, 2 * eps / norm_low.clamp_min(torch.finfo(torch.float64).tiny), math.inf)


@dataclass(frozen=True)
class CentredGram:
    """Products of centred rows, summed in float64, and what bounds their errors (:func:`centred_gram`).

    ``gram[i, j]`` is the computed ``<c_a_i, c_b_j>`` of the centred rows ``c`` (working precision, products of
    ``GRAM_CHUNK`` features, their results summed in float64); ``norm_*`` the float64 norms ``||c||``;
    ``direction_*`` (:func:`direction_error`) and ``fp64_direction_*`` bound ``||c/||c|| - xbar/||xbar||||`` for
    this evaluation and for the same one in float64; ``product`` and ``fp64_product`` the ``k`` with
    ``|gram - <c_a, c_b>| <= k ||c_a|| ||c_b||`` of each.
    """

    gram: torch.Tensor
    norm_a: torch.Tensor
    norm_b: torch.Tensor
    direction_a: torch.Tensor
    direction_b: torch.Tensor
    fp64_direction_a: torch.Tensor
    fp64_direction_b: torch.Tensor
    product: float
    fp64_product: float
    d: int

    def correlation(self) -> torch.Tensor:
        """(a, b) float64: Pearson r of each pair of rows, clipped to [-1, 1] (clipping only moves it closer)."""
        return (self.gram / self.norm_a[:, None] / self.norm_b[None, :]).clamp_(-1.0, 1.0)

    def error(self, fp64: bool = False) -> torch.Tensor:
        """(a, b) float64: a bound on ``|correlation() - r_exact|`` of this evaluation (or, ``fp64``, of the same
        evaluation in float64 on the same inputs).

        ``r = <c_a, c_b> / (||c_a|| ||c_b||)`` is computed from the float64 sums: dividing by the computed norms
        adds a relative ``theta = gamma_(d+6)`` of float64 (the sums of squares, two square roots, two divisions),
        so ``|r_computed - <c_a/||c_a||, c_b/||c_b||>| <= k (1 + theta) + theta``, and by Cauchy-Schwarz
        ``|<c_a/||c_a||, c_b/||c_b||> - <z_a, z_b>| <= e_a + e_b + e_a e_b`` with the direction errors ``e``.
        """
        k = self.fp64_product if fp64 else self.product
        e_a, e_b = (self.fp64_direction_a, self.fp64_direction_b) if fp64 else (self.direction_a, self.direction_b)
        theta = gamma(self.d + 6, torch.float64)
        return BOUND_SAFETY * (k * (1 + theta) + theta + e_a[:, None] + e_b[None, :] + e_a[:, None] * e_b[None, :])


def centred_gram(
    x,
    rows_a: Sequence[int] | None = None,
    rows_b: Sequence[int] | None = None,
    device="cpu",
    precision: str = "fp64",
    what: str = "the rows",
) -> CentredGram:
    """Pearson products of rows ``rows_a`` with rows ``rows_b`` of ``x``, on ``device``, with proven error bounds.

    One code path for every device. Two passes over the features in chunks of ``GRAM_CHUNK``: the first sums
    ``x``, ``|x|`` and ``x**2`` per row in float64 (the mean ``mu``); the second centres each chunk in the working
    precision (``c = x - fl(mu)``) and adds the chunk's ``c_a @ c_b.T`` to float64 sums: the working-precision dot
    products are ``GRAM_CHUNK`` long whatever ``d``, which keeps the bound small. Not numpy's ``z.T @ z`` (see
    :func:`add_gram`): torch's gemm, on any width.

    The bound on the centred rows (``u`` the working unit roundoff, ``u_in`` the rounding of the input into it:
    0 for float16/float32 data in float32 and for any data in float64): ``|fl(mu) - mu| <= u |mu| +
    gamma_(d+1) sum|x| / d`` (float64 sums, then one rounding) and ``c_r = (fl(x_r) - fl(mu))(1 + delta)``, so
    ``||c - xbar|| <= u_in ||x|| + sqrt(d) |fl(mu) - mu| + u/(1-u) ||c||`` (:func:`centring_error`). Each chunk's
    product errs by at most ``matmul_error_factor(GRAM_CHUNK) sum|c_a c_b|`` (TF32 on CUDA in fp32) and the float64
    sum of the ``n_chunks`` results adds ``gamma_(n_chunks)`` of float64: ``product = f + gamma(n_chunks) (1 + f)``,
    ``|gram - <c_a, c_b>| <= product ||c_a|| ||c_b||`` by Cauchy-Schwarz. The float64 evaluation's bounds use the
    same formulas with float64's roundoffs and ``||c_64|| <= ||c|| + eps``.

    Parameters
    ----------
    x : array-like or Tensor, (m, ...) real
        Rows along the first axis; trailing dimensions are flattened.
    rows_a, rows_b : sequence of int, optional
        The rows to multiply (default: all, for the (m, m) matrix).
    device : str or torch.device
    precision : "fp64" or "fp32"
    what : str
        What the rows are, for the error naming a constant row.

    Raises
    ------
    ZeroVarianceError
        If a named row is constant (its centred norm is below ``RELATIVE_STD_FLOOR`` of its norm).
    """
    dtype = dtype_of(precision)
    device = torch.device(device)
    m = x.shape[0]
    rows_a = list(range(m)) if rows_a is None else [int(r) for r in rows_a]
    rows_b = rows_a if rows_b is None else [int(r) for r in rows_b]
    named = sorted({*rows_a, *rows_b})
    at = {row: k for k, row in enumerate(named)}
    data = torch.as_tensor(x[named] if not isinstance(x, torch.Tensor) else x[named]).reshape(len(named), -1)
    if not data.is_floating_point():
        data = data.double()
    data = data.to(device)
    d = data.shape[1]
    u = UNIT_ROUNDOFF[dtype]
    u_in = 0.0 if torch.finfo(data.dtype).bits <= torch.finfo(dtype).bits else u
    chunks = range(0, d, GRAM_CHUNK)
    total, absolute, squares = (torch.zeros(len(named), dtype=torch.float64, device=device) for _ in range(3))
    for lo in chunks:
        part = data[:, lo : lo + GRAM_CHUNK].double()
        total += part.sum(1)
        absolute += part.abs().sum(1)
        squares += part.square().sum(1)
    mean = total / d
    shift = mean.to(dtype)[:, None]
    ia = torch.tensor([at[r] for r in rows_a], device=device)
    ib = torch.tensor([at[r] for r in rows_b], device=device)
    gram = torch.zeros(len(rows_a), len(rows_b), dtype=torch.float64, device=device)
    centred = torch.zeros(len(named), dtype=torch.float64, device=device)
    for lo in chunks:
        c = data[:, lo : lo + GRAM_CHUNK].to(dtype) - shift
        gram += (c[ia] @ c[ib].T).double()
        centred += c.double().square().sum(1)
    norm, raw_norm = centred.sqrt(), squares.sqrt()
    constant = norm <= RELATIVE_STD_FLOOR * raw_norm
    if constant.any():
        rows = [named[k] for k in torch.nonzero(constant).flatten().tolist()]
        raise ZeroVarianceError(f"zero-variance row {rows[0]} in {what}: its correlation is undefined", rows)
    unit64 = UNIT_ROUNDOFF[torch.float64]
    mean_error = gamma(d + 1, torch.float64) * absolute / d  # the float64 mean against the exact one
    eps = centring_error(u_in * raw_norm + math.sqrt(d) * (u * mean.abs() + mean_error), u, norm)
    eps64 = centring_error(math.sqrt(d) * mean_error, unit64, norm + eps)  # ||c_64|| <= ||xbar|| + eps64
    low = norm - eps  # ||xbar|| >= ||c|| - eps
    direction, direction64 = direction_error(eps, low), direction_error(eps64, low)
    n_chunks = max(len(chunks), 1)
    factor = matmul_error_factor(min(d, GRAM_CHUNK), dtype, device)
    factor64 = matmul_error_factor(min(d, GRAM_CHUNK), torch.float64, device)
    g = gamma(n_chunks, torch.float64)
    return CentredGram(
        gram,
        norm[ia],
        norm[ib],
        direction[ia],
        direction[ib],
        direction64[ia],
        direction64[ib],
        factor + g * (1 + factor),
        factor64 + g * (1 + factor64),
        d,
    )


def correlation_block(
    a: torch.Tensor, b: torch.Tensor, precision: str = "fp64", constant: str = "raise"
) -> torch.Tensor:
    """(n_a, n_b) float64 Pearson r of each row of ``a`` with each row of ``b``, on their device.

    The block the 1 vs. 2 test reads (``semprobe misclassified --store similarity``: the misclassified images'
    rows against the reference images'), computed by :func:`centred_gram` on the rows stacked, as
    :func:`semprobe.analysis.onevtwo.bounded_reference_correlations` computes the same correlations from the
    activation store: only the n_a x n_b products are made, never the (n_a + n_b)² matrix.

    Parameters
    ----------
    a, b : Tensor, (n_a, ...) and (n_b, ...) real, on one device
        One row per image (trailing dimensions flattened to the same d), e.g. :func:`zscore_rows`' output.
    precision : "fp64" or "fp32"
        The working precision of the products (sums in float64).
    constant : "raise" or "nan"
        A zero-variance row (:func:`centred_gram`'s test) raises ZeroVarianceError naming its position in the
        stacked rows (a's first), or, with "nan", gets NaN in its row (of ``a``) or column (of ``b``), so that a
        caller holding rows it may not need decides later whether the constant row matters.

    Returns
    -------
    Tensor, (n_a, n_b) float64 on the rows' device, clipped to [-1, 1].
    """
    if constant not in ("raise", "nan"):
        raise InputError(f"unknown constant-row handling '{constant}': choose raise or nan")
    n_a, n_b = len(a), len(b)
    x = torch.cat([a.reshape(n_a, -1), b.reshape(n_b, -1)])
    result = torch.full((n_a, n_b), math.nan, dtype=torch.float64, device=x.device)
    rows_a, rows_b = list(range(n_a)), list(range(n_a, n_a + n_b))
    try:
        gram = centred_gram(x, rows_a, rows_b, device=x.device, precision=precision)
    except ZeroVarianceError as err:
        if constant == "raise":
            raise
        flat = set(err.rows)  # every constant row among those named: one retry without them settles it
        rows_a, rows_b = [r for r in rows_a if r not in flat], [r for r in rows_b if r not in flat]
        if not rows_a or not rows_b:
            return result
        gram = centred_gram(x, rows_a, rows_b, device=x.device, precision=precision)
    ia = torch.tensor(rows_a, device=x.device)[:, None]
    ib = torch.tensor([r - n_a for r in rows_b], device=x.device)[None, :]
    result[ia, ib] = gram.correlation()
    return result


def centred_unit_rows(x, what: str = "the rows") -> np.ndarray:
    """Centre each row and scale it to unit L2 norm, in float64: the dot product of two rows is their Pearson r.

    The exact numpy counterpart of :func:`zscore_rows`, for the small products of the 1 vs. 2 test.

    Parameters
    ----------
    x : array-like, (..., d) real
        Rows along the last axis (an image's activation, a class's word vector).
    what : str
        What the rows are, for the error message.

    Returns
    -------
    ndarray, (..., d) float64
        Each row minus its mean, divided by its L2 norm. Row k does not depend on the other rows.

    Raises
    ------
    ZeroVarianceError
        If a row is constant: its correlation with anything is undefined.
    """
    x = np.asarray(x, np.float64)
    z = x - x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(z, axis=-1, keepdims=True)
    if (norm == 0).any():
        rows = np.argwhere(norm[..., 0] == 0)
        raise ZeroVarianceError(
            f"zero-variance row {int(rows[0][-1])} in {what}: its correlation is undefined", rows[:, -1].tolist()
        )
    return z / norm


def paired_cosine(u, v) -> np.ndarray:
    """The cosine of row k of ``u`` and row k of ``v``, for every k.

    Parameters
    ----------
    u, v : array-like, (n, d) real, or scipy.sparse matrices (kept sparse)
        E.g. the word vectors of each misclassified image's true and predicted class.

    Returns
    -------
    ndarray, (n,) float64
        ``u_k . v_k / (|u_k| |v_k|)``; nan where a row is all zeros.
    """
    if scipy.sparse.issparse(u) or scipy.sparse.issparse(v):
        u, v = (scipy.sparse.csr_array(m, dtype=np.float64) for m in (u, v))

        def row_dots(a, b):
            return np.asarray(a.multiply(b).sum(axis=1), np.float64).ravel()

        return row_dots(u, v) / np.sqrt(row_dots(u, u) * row_dots(v, v))
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return np.einsum("ij,ij->i", u, v) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))


def paired_pearson(u, v) -> np.ndarray:
    """The Pearson r of row k of ``u`` and row k of ``v``, for every k: (n,) float64.

    ``u, v`` : array-like, (n, d) real. Raises ZeroVarianceError (an InputError) for a constant row.
    """
    return np.einsum("ij,ij->i", centred_unit_rows(u, "the first rows"), centred_unit_rows(v, "the second rows"))


# Word similarity of paired rows, by name (``semprobe adversarial --target-similarity``).
PAIRED_SIMILARITY = {"pearson": paired_pearson, "cosine": paired_cosine}
