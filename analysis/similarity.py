"""Similarity structure of representations: z-scored rows whose Gram product is Pearson r."""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from semprobe.analysis.errors import InputError, ZeroVarianceError

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


def correlation_matrix(x, compute: str = "float64", block: int | None = None) -> np.ndarray:
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

    Raises
    ------
    ZeroVarianceError
        If a row is constant: its correlation with anything is undefined.
    """
    w = x.shape[0]
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
