"""The 2 vs. 2 on torch: one code path on any device, stacked over image matrices, word matrices and permutations.

The same margins as :func:`semprobe.analysis.twovtwo._margins` (the numpy reference), for L image matrices
(every layer x image set of a model) against M word matrices under P permutations of the word side at once:
the w x w x w products are one gemm per image matrix over all (permutation, word model) pairs, and the
O(w^2) terms are in-place elementwise passes over the (L, P*M, w, w) block. Precision and the exact
decisions: :mod:`semprobe.analysis.precision` and :func:`_row_bounds`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from semprobe.analysis.errors import InputError
from semprobe.analysis.precision import UNIT_ROUNDOFF, dtype_of, gamma, matmul_error_factor
from semprobe.analysis.twovtwo import TIE_TOLERANCE, NullDistribution, TwoVsTwo, _check, permutations

# Pairs rechecked per batch: their (pairs, 2, w) rows stay far below glibc's 32 MB mmap threshold, so the
# batches reuse heap memory instead of faulting in fresh pages (which costs more than the recheck on a VM).
RECHECK_CHUNK = 1 << 10

# Default memory per stacked block: about this many MB of (L, P*M, w, w) margins in the compute dtype.
STACK_MEMORY_MB = 512


def stack_matrices(w: int, precision: str, memory_mb: int) -> int:
    """How many (w, w) image matrices one call of :func:`stacked_two_vs_two` holds in ``memory_mb`` MB (at
    least 1): each keeps itself and five row-term matrices in float64 and in the compute precision, plus its
    float32 input; the blocks of margins come on top (``STACK_MEMORY_MB``)."""
    itemsize = torch.finfo(dtype_of(precision)).bits // 8
    return max(1, memory_mb * 2**20 // (w * w * (6 * 8 + 6 * itemsize + 4)))


def _row_sums(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., w) each: the row sums without the diagonal, and n times the sums of squares without it."""
    n = m.shape[-1] - 2
    d = torch.diagonal(m, dim1=-2, dim2=-1)
    return m.sum(-1) - d, n * ((m * m).sum(-1) - d * d)


def _torch_side(m: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`_Side`'s s and r for a stack (N, w, w) of float64 matrices."""
    n = m.shape[-1] - 2
    e, f = _row_sums(m)
    s = torch.sub(e[..., :, None], m)
    var = torch.mul(m, m).mul_(-n).add_(f[..., :, None]).addcmul_(s, s, value=-1)  # in place: one buffer
    var.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    bad = var <= 0
    if bad.any():
        k, i, j = (int(v) for v in torch.nonzero(bad)[0])
        raise InputError(f"zero-variance row in {side} matrix {k}: concept {i} with columns {i}, {j} removed")
    return s, var.rsqrt_()


def _empty(buffers: dict | None, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, a view of the buffer ``name`` of ``buffers`` (grown when too small) or a fresh
    one without them. The blocks reuse their buffers: on the CPU a fresh tensor of many MB costs a page fault
    per page on first touch (the allocator hands large blocks back to the system), as much as a pass over it."""
    n = int(np.prod(shape))
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = buffers.get(name)
    if flat is None or flat.numel() < n or flat.dtype != dtype:
        flat = buffers[name] = torch.empty(n, dtype=dtype, device=device)
    return flat[:n].view(shape)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.flatten()[index]``, shaped like ``index``: ``index_select`` on the flat view, which on the CPU is
    tens of times faster than ``torch.take`` or advanced indexing."""
    return t.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)


def _off_diagonal_row_max(t: torch.Tensor) -> torch.Tensor:
    """(..., w): the largest |t[..., i, j]| over j != i."""
    a = t.abs()
    a.diagonal(dim1=-2, dim2=-1).zero_()
    return a.amax(-1)


@dataclass
class _ImageTerms:
    """The image side's terms of the margins for a stack (L, w, w), float64 and in the compute dtype, with the
    row maxima and norms the error bound needs."""

    a64: torch.Tensor
    terms64: dict[str, torch.Tensor]  # x, xt, yt, u, v: (L, w, w); d: (L, w)
    terms: dict[str, torch.Tensor]  # the same in the compute dtype, -xt as "nxt"; "a": the matrices
    row_max: dict[str, torch.Tensor]  # x, xt, yt, u, v: (L, w) float64
    norm: torch.Tensor  # (L, w) float64: |a_i|
    d_abs: torch.Tensor  # (L, w) float64: |a_ii|

    @classmethod
    def build(cls, a64: torch.Tensor, dtype: torch.dtype) -> _ImageTerms:
        n = a64.shape[-1] - 2
        s, r = _torch_side(a64, "image")
        d = torch.diagonal(a64, dim1=-2, dim2=-1)
        x = n * r
        xt = x.mT.contiguous()
        y = x * a64
        u = xt * d[:, None, :] - y
        z = s * r
        t64 = {"x": x, "xt": xt, "yt": y.mT.contiguous(), "u": u, "v": z.mT - z, "d": d.contiguous()}
        terms = {k: v.to(dtype) for k, v in t64.items() if k != "xt"} | {"nxt": (-xt).to(dtype), "a": a64.to(dtype)}
        row_max = {k: _off_diagonal_row_max(t64[k]) for k in ("x", "xt", "yt", "u", "v")}
        return cls(a64, t64, terms, row_max, torch.linalg.vector_norm(a64, dim=-1), d.abs())


@dataclass
class _WordTerms:
    """The word side's matrices and row terms for a stack (M, w, w), float64, with row maxima and norms."""

    b64: torch.Tensor
    s64: torch.Tensor
    r64: torch.Tensor
    row_max: dict[str, torch.Tensor]  # b, s, r: (M, w) float64, over j != i
    norm: torch.Tensor  # (M, w): |b_i|
    d_abs: torch.Tensor  # (M, w): |b_ii|

    @classmethod
    def build(cls, b64: torch.Tensor) -> _WordTerms:
        s, r = _torch_side(b64, "word")
        row_max = {"b": _off_diagonal_row_max(b64), "s": _off_diagonal_row_max(s), "r": _off_diagonal_row_max(r)}
        d_abs = torch.diagonal(b64, dim1=-2, dim2=-1).abs()
        return cls(b64, s, r, row_max, torch.linalg.vector_norm(b64, dim=-1), d_abs)


def _row_bounds(
    img: _ImageTerms,
    word: _WordTerms,
    perms: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    lo: int = 0,
    hi: int | None = None,
) -> torch.Tensor:
    """(hi - lo, P*M, w) float64, for image matrices lo..hi-1 (default: all): R[l, pm, i] bounds, over every
    j != i, the error of the computed T[i, j] of :func:`_margins` in ``dtype`` against exact arithmetic on the
    float64 terms, plus the rounding of the margin ``T_ij + T_ji`` that falls to it; so
    ``|m_ij(dtype) - m_ij(exact)| <= R_i + R_j``.

    Derivation. ``T_ij = rb_ij (x_ij o_i + yt_ij db_i - xt_ij q_ij + u_ij b_ij + v_ij sb_ij)`` with the own
    dot ``o_i = q_ii - d_i db_i`` and ``q = b a^T``. Every term and matrix entry is rounded once to ``dtype``
    (relative error u; the float64 path's terms are exact by definition), a product rounds once, the five
    products are summed with at most four roundings on any path, and ``rb`` scales with one rounding plus its
    own: at most 9 roundings per term (``o_i``: 4 more: d, db, their product and the difference), and the
    margin's sum one more, so (Higham, Lemma 3.1) the elementwise part errs by at most
    ``gamma(14) S_ij`` where ``S_ij = |rb_ij| (|x_ij| (|q_ii| + |d_i db_i|) + |yt_ij||db_i| + |xt_ij||q_ij| +
    |u_ij||b_ij| + |v_ij||sb_ij|)``. The products err by ``|dq_ij| <= c sum_k |b_ik a_jk|`` with ``c`` the
    matmul factor (:func:`semprobe.analysis.precision.matmul_error_factor`) plus ``2u`` for rounding the
    matrices to ``dtype``, which then passes through at most 9 roundings: ``(1 + gamma(9)) |rb_ij|
    (|xt_ij| |dq_ij| + |x_ij| |dq_ii|)``. Cauchy-Schwarz bounds ``|q_ij|`` and ``sum_k |b_ik a_jk|`` by
    ``|b_i| |a_j|``, and each per-pair factor by its row's largest value over j != i, so R needs only
    (L, P*M, w) work. A permutation p relabels the word side: its row i is row p_i of the stack, with the same
    norm and off-diagonal row maxima.
    """
    w = img.a64.shape[-1]
    rows = slice(lo, hi)
    f64 = torch.float64
    u = UNIT_ROUNDOFF[dtype]
    c = matmul_error_factor(w, dtype, device) + (2 * u if dtype != f64 else 0.0)
    g14, g9 = gamma(14, dtype), gamma(9, dtype)
    # Word-side quantities of every (permutation, word model) pair: (P*M, w), row i from row p_i.
    take = lambda t: t[:, perms].permute(1, 0, 2).reshape(-1, w)  # noqa: E731  (M, w) -> (P*M, w)
    rb, bb, sb = (take(word.row_max[k]) for k in ("r", "b", "s"))
    nb, db = take(word.norm), take(word.d_abs)
    im = {k: v[rows, None, :] for k, v in img.row_max.items()}  # (L, 1, w)
    na, da = img.norm[rows, None, :], img.d_abs[rows, None, :]
    na_max = img.norm[rows].amax(-1)[:, None, None]
    rb, bb, sb, nb, db = (t[None] for t in (rb, bb, sb, nb, db))  # (1, P*M, w)
    s = im["x"] * (nb * na + da * db) + im["yt"] * db + im["xt"] * nb * na_max + im["u"] * bb + im["v"] * sb
    dq = (1 + g9) * (im["xt"] * c * nb * na_max + im["x"] * c * nb * na)
    # 1 + 2^-20: room for the rounding of this float64 bound and of the band's comparison in ``dtype``.
    return rb * (g14 * s + dq) * (1 + 2.0**-20)


def _permuted_words(word: _WordTerms, perms: torch.Tensor, dtype: torch.dtype, buffers: dict | None = None):
    """Every word matrix under every permutation, ``m[p][:, p]``, (permutation, word model) flattened in that
    order, in ``dtype``: b, sb, rb (P*M, w, w), gathered from :class:`_WordTerms`' (as the numpy reference
    gathers them), and diag(b) (P*M, w)."""
    M, w = word.b64.shape[:2]
    device = perms.device
    offsets = torch.arange(M, device=device)[None, :, None, None] * (w * w)
    idx = _empty(buffers, "index", (len(perms), M, w, w), torch.int64, device)  # flat indices of m[p][:, p]
    torch.add(perms[:, None, :, None] * w + offsets, perms[:, None, None, :], out=idx)
    gathered = []
    for name, t in (("b", word.b64), ("sb", word.s64), ("rb", word.r64)):
        out = _empty(buffers, name, (len(perms) * M, w, w), dtype, device)
        torch.index_select(t.to(dtype).view(-1), 0, idx.view(-1), out=out.view(-1))
        gathered.append(out)
    diag = torch.diagonal(word.b64, dim1=-2, dim2=-1)[:, perms].transpose(0, 1).reshape(-1, w)
    return (*gathered, diag.to(dtype))


def _stacked_margins(img: _ImageTerms, bp, sbp, rbp, dbp, lo: int, hi: int, buffers: dict | None = None):
    """(hi - lo, P*M, w, w): the margins of image matrices lo..hi-1 against every permuted word matrix; the
    diagonal (no pair) is -inf. Same formula and order of operations as :func:`_margins`, in place, in the
    buffers "q" (the products, then the half-margins T) and "m"."""
    t_img = {k: v[lo:hi, None] for k, v in img.terms.items()}
    n_img, n_word, w = hi - lo, bp.shape[0], bp.shape[-1]
    q = _empty(buffers, "q", (n_img, n_word, w, w), bp.dtype, bp.device)
    for k in range(n_img):  # one gemm per image matrix: (P*M*w, w) @ (w, w)
        torch.mm(bp.reshape(-1, w), t_img["a"][k, 0].T, out=q[k].view(-1, w))
    own = torch.diagonal(q, dim1=-2, dim2=-1)[..., :, None] - t_img["d"][..., :, None] * dbp[None, :, :, None]
    t = q.mul_(t_img["nxt"])
    t.addcmul_(t_img["x"], own)
    t.addcmul_(t_img["yt"], dbp[None, :, :, None])
    t.addcmul_(t_img["u"], bp[None])
    t.addcmul_(t_img["v"], sbp[None])
    t.mul_(rbp[None])
    m = torch.add(t, t.mT, out=_empty(buffers, "m", t.shape, t.dtype, t.device))
    m.diagonal(dim1=-2, dim2=-1).fill_(-torch.inf)
    return m


def _recheck(img: _ImageTerms, word: _WordTerms, perms: torch.Tensor, where: torch.Tensor):
    """The float64 margins of the pairs ``where`` (F, 4): (image matrix, (permutation, word model), i, j); each
    pair from its own dot products, so a pair's value does not depend on which others come along."""
    M, w = word.b64.shape[:2]
    li, pm, i, j = where.unbind(1)
    p, mw = pm // M, pm % M

    def at(t, *index):  # t[index] for flat tensors of indices
        flat = index[0]
        for k, n in zip(index[1:], t.shape[1:]):
            flat = flat * n + k
        return _take(t, flat)

    pi, pj = at(perms, p, i), at(perms, p, j)
    # q[i, j], q[i, i], q[j, i], q[j, j] of every pair: one batched product of its two permuted word rows
    # (row i of m[p][:, p] is row p_i of m, in the order p) and two image rows (flat index_select: far faster
    # than multi-index gathers on the CPU)
    order = perms.index_select(0, p)[:, None, :].expand(-1, 2, -1)
    rows = word.b64.view(-1, w).index_select(0, torch.stack([mw * w + pi, mw * w + pj], 1).view(-1))
    rows = rows.view(-1, 2, w).gather(2, order)
    cols = img.a64.view(-1, w).index_select(0, torch.stack([li * w + i, li * w + j], 1).view(-1)).view(-1, 2, w)
    q = torch.bmm(rows, cols.mT)  # (F, 2, 2): q[f, 0, 1] = row i . a_j

    def half(i, j, pi, pj, q_ij, q_ii):
        # T_ij in float64, as :func:`_margins` evaluates it; the permuted word terms are those of rows p_i, p_j
        b_ij, db_i = at(word.b64, mw, pi, pj), at(word.b64, mw, pi, pi)
        x, yt, xt, u, v = (at(img.terms64[k], li, i, j) for k in ("x", "yt", "xt", "u", "v"))
        t = x * (q_ii - at(img.terms64["d"], li, i) * db_i)
        t = t + yt * db_i
        t = t - xt * q_ij
        t = t + u * b_ij
        t = t + v * at(word.s64, mw, pi, pj)
        return t * at(word.r64, mw, pi, pj)

    return half(i, j, pi, pj, q[:, 0, 1], q[:, 0, 0]) + half(j, i, pj, pi, q[:, 1, 0], q[:, 1, 1])


@dataclass(frozen=True)
class Decided:
    """One stacked block after the float64 recheck: ``counts`` (L, P*M) int64, pairs passed; ``rows`` (L, P*M, w)
    int64, each concept's pairs passed, and ``passed`` (L, P*M, w, w) bool, symmetric, False on the diagonal,
    when asked for; ``rechecked`` the pairs (i < j) recomputed in float64, ``pairs`` all pairs."""

    counts: torch.Tensor
    rows: torch.Tensor | None
    passed: torch.Tensor | None
    rechecked: int
    pairs: int


DETAILS = ("counts", "rows", "pairs")


def _decide(
    img: _ImageTerms,
    word: _WordTerms,
    perms: torch.Tensor,
    lo: int,
    hi: int,
    dtype: torch.dtype,
    words_p,
    buffers: dict | None = None,
    detail: str = "counts",
) -> Decided:
    """Image matrices lo..hi-1 against every word matrix under ``perms``: each pair passes iff its margin
    exceeds TIE_TOLERANCE, where every pair within the error band of the threshold (its bound in ``dtype``
    plus the float64 evaluation's) is decided by its float64 recomputation (:func:`_recheck`). ``detail``
    (DETAILS): the counts alone, with each concept's, or with every pair's decision."""
    device = img.a64.device
    m = _stacked_margins(img, *words_p, lo, hi, buffers)
    # Pass flags as 0/1 in the margins' dtype, in the free product buffer: their float sums are exact and far
    # faster than a bool count on the CPU. The counts are of both triangles (m is symmetric bit for bit).
    flags = torch.gt(m, TIE_TOLERANCE, out=_empty(buffers, "q", m.shape, m.dtype, device))
    counts = flags.sum((-1, -2), dtype=torch.float64).to(torch.int64)
    rows = flags.sum(-1, dtype=torch.float64).to(torch.int64) if detail == "rows" else None
    passed = flags > 0.5 if detail == "pairs" else None
    r = _row_bounds(img, word, perms, dtype, device, lo, hi)
    if dtype != torch.float64:
        r = r + _row_bounds(img, word, perms, torch.float64, device, lo, hi)
    # Candidates against the block's largest band, then each against its own pair's band R_i + R_j.
    block = 2 * r.amax(-1)  # (L, P*M)
    gap = m.sub_(TIE_TOLERANCE).abs_()
    near = torch.le(gap, block[..., None, None].to(m.dtype), out=_empty(buffers, "near", m.shape, torch.bool, device))
    cand = torch.nonzero(near.triu_(1))
    w = m.shape[-1]
    if len(cand):
        row = (cand[:, 0] * m.shape[1] + cand[:, 1]) * w
        band = _take(r, row + cand[:, 2]) + _take(r, row + cand[:, 3])
        cand = cand[_take(gap, (row + cand[:, 2]) * w + cand[:, 3]).double() <= band]
    for chunk in torch.split(cand, RECHECK_CHUNK):
        exact = _recheck(img, word, perms, chunk + torch.tensor([lo, 0, 0, 0], device=device)) > TIE_TOLERANCE
        li, pm, i, j = chunk.unbind(1)
        delta = exact.long() - (_take(flags, ((li * m.shape[1] + pm) * w + i) * w + j) > 0.5).long()
        counts.index_put_((li, pm), 2 * delta, accumulate=True)
        if rows is not None:
            rows.index_put_((li, pm, i), delta, accumulate=True)
            rows.index_put_((li, pm, j), delta, accumulate=True)
        if passed is not None:
            passed[li, pm, i, j] = passed[li, pm, j, i] = exact
    return Decided(counts // 2, rows, passed, len(cand), m.shape[0] * m.shape[1] * w * (w - 1) // 2)


def _stack(matrices, what: str, device: torch.device) -> torch.Tensor:
    """(N, w, w) float64 on ``device`` from an array (N, w, w) or a sequence of (w, w) matrices."""
    t = torch.stack([torch.from_numpy(np.array(m, np.float64)) for m in matrices]).to(device)
    if t.ndim != 3 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 4:
        raise InputError(f"{what} must be square matrices over the same w >= 4 concepts, got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True)
class StackedTests:
    """The 2 vs. 2 of L image matrices against M word matrices, observed or under permutations, as counts.

    passes : (n_perm, M, L) int64 (observed: n_perm = 1), pairs passed; concept_passes : (M, L, w) int32,
    observed only, each concept's pairs passed; rechecked, decided : pairs recomputed in float64 and all pairs.
    """

    passes: np.ndarray
    concept_passes: np.ndarray | None
    rechecked: int
    decided: int


def stacked_two_vs_two(
    images,
    words,
    n_perm: int | None = None,
    seed: int = 0,
    start: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp64",
    memory_mb: int = STACK_MEMORY_MB,
) -> StackedTests:
    """The 2 vs. 2 of every image matrix against every word matrix: observed (``n_perm`` None) or under the
    word-side permutations ``start`` .. ``start + n_perm - 1`` of ``seed`` (:func:`permutations`).

    One code path on any torch ``device``. Per permutation block, the w x w x w products of all L image
    matrices (every layer x image set of a model) against all M word matrices (every word model) are one gemm
    per image matrix over the stacked (permutation, word model) rows: not a product per (layer, set, word
    model). The blocks hold at most about ``memory_mb`` MB of margins; the result does not depend on it.

    ``precision`` "fp64" computes in float64; "fp32" in float32 (TF32 on CUDA), and every pair whose margin
    lies within its proven error bound (:func:`_row_bounds`: the float32 and the float64 evaluation's) of
    TIE_TOLERANCE is recomputed in float64 from its own dot products, in both precisions. So every decision
    equals the float64 decision, and does not depend on the device, the block sizes or the split into tasks:
    a pair whose exact margin lies within the float64 band (about 1e-13) of the threshold is decided by its
    own recomputation, the same wherever it is made (up to the device's float64 dot product).

    Parameters
    ----------
    images : (L, w, w) array or sequence of (w, w)
    words : (M, w, w) array or sequence of (w, w)
    n_perm, seed, start : int
    device, precision, memory_mb

    Raises
    ------
    InputError
        On shapes that differ or a row that has no variance once shortened by a pair.
    """
    w = np.shape(images[0])[-1]
    observed = n_perm is None
    P = 1 if observed else n_perm
    M, L = len(words), len(images)
    passes = np.zeros((P, M, L), np.int64)
    concept_passes = np.zeros((M, L, w), np.int32) if observed else None
    rechecked = decided = 0
    detail = "rows" if observed else "counts"
    for p_lo, lo, d in _blocks(images, words, n_perm, seed, start, device, precision, memory_mb, detail):
        n_block, hi = d.counts.shape[1] // M, lo + d.counts.shape[0]
        passes[p_lo : p_lo + n_block, :, lo:hi] = d.counts.T.reshape(n_block, M, hi - lo).cpu().numpy()
        if observed:
            concept_passes[:, lo:hi] = d.rows.transpose(0, 1).cpu().numpy()
        rechecked, decided = rechecked + d.rechecked, decided + d.pairs
    return StackedTests(passes, concept_passes, rechecked, decided)


def _blocks(images, words, n_perm, seed, start, device, precision, memory_mb=STACK_MEMORY_MB, detail="counts"):
    """(first permutation, first image matrix, :class:`Decided`) of each block of :func:`stacked_two_vs_two`."""
    dtype = dtype_of(precision)
    device = torch.device(device)
    a64, b64 = _stack(images, "the image matrices", device), _stack(words, "the word matrices", device)
    L, w, M = a64.shape[0], a64.shape[-1], b64.shape[0]
    if b64.shape[-1] != w:
        raise InputError(f"image matrices over {w} concepts, word matrices over {b64.shape[-1]}")
    perms = torch.arange(w)[None] if n_perm is None else torch.from_numpy(permutations(w, n_perm, seed, start))
    perms = perms.to(device)
    img, word = _ImageTerms.build(a64, dtype), _WordTerms.build(b64)
    P, itemsize = len(perms), torch.finfo(dtype).bits // 8
    # Bytes per (image matrix, permutation) pair of a block: the products (then the flags), the margins and
    # the band's flags; per permutation: the gathered word matrices and their indices.
    per_pair, per_perm = M * w * w * (2 * itemsize + 1), M * w * w * (3 * itemsize + 8)
    memory = memory_mb * 2**20
    p_step = max(1, min(P, memory // (per_perm + per_pair)))
    l_step = max(1, min(L, (memory - p_step * per_perm) // (p_step * per_pair)))
    buffers = {}
    context = _tf32() if dtype == torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), context:
        for p_lo in range(0, P, p_step):
            block = perms[p_lo : p_lo + p_step]
            words_p = _permuted_words(word, block, dtype, buffers)
            for lo in range(0, L, l_step):
                hi = min(L, lo + l_step)
                yield p_lo, lo, _decide(img, word, block, lo, hi, dtype, words_p, buffers, detail)


def decide_all(images, words, n_perm, device, precision, seed: int = 0) -> Decided:
    """The one block of a small problem (one image and one word matrix, no permutation or one), pair by pair."""
    ((_, _, decided),) = _blocks(images, words, n_perm, seed, 0, device, precision, detail="pairs")
    return decided


@contextlib.contextmanager
def _tf32():
    """float32 products may use TF32 tensor cores (CUDA; no effect elsewhere): the bound assumes them there."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def two_vs_two(c_img, c_word, device: str | torch.device = "cpu", precision: str = "fp64") -> TwoVsTwo:
    """:func:`semprobe.analysis.twovtwo.two_vs_two` on a torch ``device`` in ``precision``: the same decisions."""
    a, b = np.asarray(c_img, np.float64), np.asarray(c_word, np.float64)
    w = _check(a, b)
    passed = decide_all(a[None], b[None], None, device, precision).passed[0, 0].cpu().numpy()
    return TwoVsTwo(np.count_nonzero(passed) / (w * (w - 1)), passed)


def permutation_null(
    c_img_sets, c_word, n_perm: int, seed: int, start: int = 0, device: str | torch.device = "cpu",
    precision: str = "fp64",
) -> NullDistribution:  # fmt: skip
    """:func:`semprobe.analysis.twovtwo.permutation_null` on a torch ``device`` in ``precision``: the same
    counts."""
    b = np.asarray(c_word, np.float64)
    sets = [np.asarray(a, np.float64) for a in c_img_sets]
    w = _check(sets[0], b)
    for a in sets[1:]:
        _check(a, b)
    stacked = stacked_two_vs_two(sets, [b], n_perm, seed, start, device, precision)
    return NullDistribution(stacked.passes[:, 0, :], w * (w - 1) // 2)
