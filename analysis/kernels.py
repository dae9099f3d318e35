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


def _torch_side(m: torch.Tensor, e: torch.Tensor, f: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`_Side`'s s and r for a stack (N, w, w) of float64 matrices and their :func:`_row_sums` e, f. A
    permuted matrix m[p][:, p] with e[p], f[p] gives exactly (bit for bit) the permuted s and r."""
    n = m.shape[-1] - 2
    s = torch.sub(e[..., :, None], m)
    var = torch.mul(m, m).mul_(-n).add_(f[..., :, None]).addcmul_(s, s, value=-1)  # in place: one buffer
    var.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    bad = var <= 0
    if bad.any():
        k, i, j = (int(v) for v in torch.nonzero(bad)[0])
        raise InputError(f"zero-variance row in {side} matrix {k}: concept {i} with columns {i}, {j} removed")
    return s, var.rsqrt_()


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
    terms: dict[str, torch.Tensor]  # the same in the compute dtype; "a": the matrices
    row_max: dict[str, torch.Tensor]  # x, xt, yt, u, v: (L, w) float64
    norm: torch.Tensor  # (L, w) float64: |a_i|
    d_abs: torch.Tensor  # (L, w) float64: |a_ii|

    @classmethod
    def build(cls, a64: torch.Tensor, dtype: torch.dtype) -> _ImageTerms:
        n = a64.shape[-1] - 2
        s, r = _torch_side(a64, *_row_sums(a64), "image")
        d = torch.diagonal(a64, dim1=-2, dim2=-1)
        x = n * r
        xt = x.mT.contiguous()
        y = x * a64
        u = xt * d[:, None, :] - y
        z = s * r
        t64 = {"x": x, "xt": xt, "yt": y.mT.contiguous(), "u": u, "v": z.mT - z, "d": d.contiguous()}
        terms = {k: v.to(dtype) for k, v in t64.items()} | {"a": a64.to(dtype)}
        row_max = {k: _off_diagonal_row_max(t64[k]) for k in ("x", "xt", "yt", "u", "v")}
        return cls(a64, t64, terms, row_max, torch.linalg.vector_norm(a64, dim=-1), d.abs())


@dataclass
class _WordTerms:
    """The word side's matrices and row terms for a stack (M, w, w), float64, with row maxima and norms."""

    b64: torch.Tensor
    s64: torch.Tensor
    r64: torch.Tensor
    e: torch.Tensor  # (M, w): :func:`_row_sums`
    f: torch.Tensor
    row_max: dict[str, torch.Tensor]  # b, s, r: (M, w) float64, over j != i
    norm: torch.Tensor  # (M, w): |b_i|
    d_abs: torch.Tensor  # (M, w): |b_ii|

    @classmethod
    def build(cls, b64: torch.Tensor) -> _WordTerms:
        e, f = _row_sums(b64)
        s, r = _torch_side(b64, e, f, "word")
        row_max = {"b": _off_diagonal_row_max(b64), "s": _off_diagonal_row_max(s), "r": _off_diagonal_row_max(r)}
        d_abs = torch.diagonal(b64, dim1=-2, dim2=-1).abs()
        return cls(b64, s, r, e, f, row_max, torch.linalg.vector_norm(b64, dim=-1), d_abs)


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


def _permuted_words(word: _WordTerms, perms: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Every word matrix under every permutation, ``m[p][:, p]``, (permutation, word model) flattened in that
    order: b in float64, then b, sb, rb (P*M, w, w) and diag(b) (P*M, w) in ``dtype``. Only b is gathered;
    its row terms follow from it and the permuted row sums, bit for bit those of :class:`_WordTerms`."""
    M, w = word.b64.shape[:2]
    idx = (perms[:, :, None] * w + perms[:, None, :]).reshape(len(perms), 1, -1)  # flat indices of m[p][:, p]
    offsets = torch.arange(M, device=perms.device)[None, :, None] * (w * w)
    b64 = _take(word.b64, idx + offsets).reshape(-1, w, w)
    e, f = (v[:, perms].transpose(0, 1).reshape(-1, w) for v in (word.e, word.f))
    s, r = _torch_side(b64, e, f, "word")
    diag = torch.diagonal(b64, dim1=-2, dim2=-1)
    return b64, b64.to(dtype), s.to(dtype), r.to(dtype), diag.to(dtype)


def _stacked_margins(img: _ImageTerms, bp, sbp, rbp, dbp, lo: int, hi: int) -> torch.Tensor:
    """(hi - lo, P*M, w, w): the margins of image matrices lo..hi-1 against every permuted word matrix; the
    diagonal (no pair) is -inf. Same formula and order of operations as :func:`_margins`, in place."""
    t_img = {k: v[lo:hi, None] for k, v in img.terms.items()}
    n_img, n_word, w = hi - lo, bp.shape[0], bp.shape[-1]
    q = torch.empty((n_img, n_word, w, w), dtype=bp.dtype, device=bp.device)
    for k in range(n_img):  # one gemm per image matrix: (P*M*w, w) @ (w, w)
        torch.mm(bp.reshape(-1, w), t_img["a"][k, 0].T, out=q[k].view(-1, w))
    own = torch.diagonal(q, dim1=-2, dim2=-1)[..., :, None] - t_img["d"][..., :, None] * dbp[None, :, :, None]
    t = q.mul_(t_img["xt"]).neg_()
    t.addcmul_(t_img["x"], own)
    t.addcmul_(t_img["yt"], dbp[None, :, :, None])
    t.addcmul_(t_img["u"], bp[None])
    t.addcmul_(t_img["v"], sbp[None])
    t.mul_(rbp[None])
    m = t + t.mT
    m.diagonal(dim1=-2, dim2=-1).fill_(-torch.inf)
    return m


def _recheck(img: _ImageTerms, word: _WordTerms, perms: torch.Tensor, bp64: torch.Tensor, where: torch.Tensor):
    """The float64 margins of the pairs ``where`` (F, 4): (image matrix, (permutation, word model), i, j),
    ``bp64`` the permuted word matrices; each pair from its own dot products, so a pair's value does not
    depend on which others come along."""
    M, w = word.b64.shape[:2]
    li, pm, i, j = where.unbind(1)
    p, mw = pm // M, pm % M
    # q[i, j], q[i, i], q[j, i], q[j, j] of every pair: one batched product of its two word and two image rows
    # (flat index_select: far faster than multi-index gathers on the CPU)
    rows = bp64.view(-1, w).index_select(0, torch.stack([pm * w + i, pm * w + j], 1).view(-1)).view(-1, 2, w)
    cols = img.a64.view(-1, w).index_select(0, torch.stack([li * w + i, li * w + j], 1).view(-1)).view(-1, 2, w)
    q = torch.bmm(rows, cols.mT)  # (F, 2, 2): q[f, 0, 1] = row i . a_j

    def at(t, *index):  # t[index] for flat tensors of indices
        flat = index[0]
        for k, n in zip(index[1:], t.shape[1:]):
            flat = flat * n + k
        return _take(t, flat)

    def half(i, j, q_ij, q_ii):
        # T_ij in float64, as :func:`_margins` evaluates it; the permuted word terms are those of rows p_i, p_j
        pi, pj = at(perms, p, i), at(perms, p, j)
        b_ij, db_i = at(word.b64, mw, pi, pj), at(word.b64, mw, pi, pi)
        x, yt, xt, u, v = (at(img.terms64[k], li, i, j) for k in ("x", "yt", "xt", "u", "v"))
        t = x * (q_ii - at(img.terms64["d"], li, i) * db_i)
        t = t + yt * db_i
        t = t - xt * q_ij
        t = t + u * b_ij
        t = t + v * at(word.s64, mw, pi, pj)
        return t * at(word.r64, mw, pi, pj)

    return half(i, j, q[:, 0, 1], q[:, 0, 0]) + half(j, i, q[:, 1, 0], q[:, 1, 1])


@dataclass(frozen=True)
class Decided:
    """Pairs passed in one stacked block, after the float64 recheck: ``passed`` (L, P*M, w, w) bool, symmetric,
    False on the diagonal; ``rechecked`` the pairs (i < j) recomputed in float64, ``pairs`` all pairs."""

    passed: torch.Tensor
    rechecked: int
    pairs: int


def _decide(
    img: _ImageTerms, word: _WordTerms, perms: torch.Tensor, lo: int, hi: int, dtype: torch.dtype, words_p
) -> Decided:
    """Image matrices lo..hi-1 against every word matrix under ``perms``: each pair passes iff its margin
    exceeds TIE_TOLERANCE, where every pair within the error band of the threshold (its bound in ``dtype``
    plus the float64 evaluation's) is decided by its float64 recomputation (:func:`_recheck`)."""
    device = img.a64.device
    m = _stacked_margins(img, *words_p[1:], lo, hi)  # words_p[0], float64, serves the recheck
    passed = m > TIE_TOLERANCE
    r = _row_bounds(img, word, perms, dtype, device, lo, hi)
    if dtype != torch.float64:
        r = r + _row_bounds(img, word, perms, torch.float64, device, lo, hi)
    # Candidates against the block's largest band, then each against its own pair's band R_i + R_j.
    block = 2 * r.amax(-1)  # (L, P*M)
    near = m.sub_(TIE_TOLERANCE).abs_() <= block[..., None, None].to(m.dtype)
    near.triu_(1)
    cand = torch.nonzero(near)
    del near
    if len(cand):
        w = m.shape[-1]
        row = (cand[:, 0] * m.shape[1] + cand[:, 1]) * w
        band = _take(r, row + cand[:, 2]) + _take(r, row + cand[:, 3])
        gap = _take(m, (row + cand[:, 2]) * w + cand[:, 3]).double()
        cand = cand[gap <= band]
    del m
    for chunk in torch.split(cand, 1 << 12):
        shifted = chunk + torch.tensor([lo, 0, 0, 0], device=device)
        exact = _recheck(img, word, perms, words_p[0], shifted) > TIE_TOLERANCE
        li, pm, i, j = chunk.unbind(1)
        passed[li, pm, i, j] = exact
        passed[li, pm, j, i] = exact
    w = passed.shape[-1]
    return Decided(passed, len(cand), passed.shape[0] * passed.shape[1] * w * (w - 1) // 2)


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
    for p_lo, lo, d in _blocks(images, words, n_perm, seed, start, device, precision, memory_mb):
        n_block, hi = d.passed.shape[1] // M, lo + d.passed.shape[0]
        counts = d.passed.sum((-1, -2)).div_(2, rounding_mode="floor")  # (l, P*M)
        passes[p_lo : p_lo + n_block, :, lo:hi] = counts.T.reshape(n_block, M, hi - lo).cpu().numpy()
        if observed:
            concept_passes[:, lo:hi] = d.passed.sum(-1).transpose(0, 1).cpu().numpy()
        rechecked, decided = rechecked + d.rechecked, decided + d.pairs
    return StackedTests(passes, concept_passes, rechecked, decided)


def _blocks(images, words, n_perm, seed, start, device, precision, memory_mb=STACK_MEMORY_MB):
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
    P = len(perms)
    per_pair = M * w * w * 3 * torch.finfo(dtype).bits // 8  # margins, their products, the band's flags
    budget = max(1, memory_mb * 2**20 // per_pair)  # (image matrix, permutation) pairs per block
    p_step = min(max(P, 1), budget)
    l_step = max(1, min(L, budget // p_step))
    context = _tf32() if dtype == torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), context:
        for p_lo in range(0, P, p_step):
            block = perms[p_lo : p_lo + p_step]
            words_p = _permuted_words(word, block, dtype)
            for lo in range(0, L, l_step):
                yield p_lo, lo, _decide(img, word, block, lo, min(L, lo + l_step), dtype, words_p)


def decide_all(images, words, n_perm, device, precision, seed: int = 0) -> Decided:
    """The one block of a small problem (one image and one word matrix, no permutation or one)."""
    ((_, _, decided),) = _blocks(images, words, n_perm, seed, 0, device, precision)
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
