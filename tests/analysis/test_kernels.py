"""The torch 2 vs. 2 kernels (any device, stacked, fp64 and fp32 with a float64 recheck) against the numpy
reference and the papers' definition."""

import numpy as np
import pytest
import torch

from semprobe.analysis import kernels, twovtwo
from semprobe.analysis.errors import InputError
from semprobe.analysis.kernels import stacked_two_vs_two
from semprobe.analysis.twovtwo import TIE_TOLERANCE, permutation_null, two_vs_two

PRECISIONS = ["fp64", "fp32"]
# The CPU here and in CI; on a machine with a GPU the same tests run there too (the device check's script).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def related(w, seed, dims=300):
    """Image- and word-side correlation matrices of features sharing a component, as in the benchmarks."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((w, dims))
    return [np.corrcoef(0.5 * shared + rng.standard_normal((w, dims))) for _ in range(2)]


def margin(a, b, i, j):
    """Pair (i, j)'s margin as the papers define it: four Pearson r's of the rows without columns i and j."""
    keep = [m for m in range(len(a)) if m not in (i, j)]
    r = lambda x, y: np.corrcoef(x, y)[0, 1]  # noqa: E731
    return r(a[i, keep], b[i, keep]) + r(a[j, keep], b[j, keep]) - r(a[i, keep], b[j, keep]) - r(a[j, keep], b[i, keep])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("w", [4, 9, 60, 838])
def test_two_vs_two_on_torch_decides_every_pair_as_numpy(w, precision, device):
    a, b = related(w, w)
    ref = two_vs_two(a, b)
    got = kernels.two_vs_two(a, b, device, precision)
    np.testing.assert_array_equal(got.passed, ref.passed)
    assert got.accuracy == ref.accuracy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("w", [6, 50, 838])
def test_null_on_torch_equals_numpy_for_every_permutation(w, precision, device):
    a, b = related(w, 1)
    a2, _ = related(w, 2)
    n = 3 if w == 838 else 40
    ref = permutation_null([a, a2], b, n, seed=7, start=5)
    got = kernels.permutation_null([a, a2], b, n, seed=7, start=5, device=device, precision=precision)
    np.testing.assert_array_equal(got.passes, ref.passes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_stacked_over_matrices_words_and_permutations_equals_one_test_at_a_time(precision, device):
    w = 30
    images = [related(w, s)[0] for s in range(5)]
    words = [related(w, s)[1] for s in range(10, 13)]
    observed = stacked_two_vs_two(images, words, device=device, precision=precision)
    null = stacked_two_vs_two(images, words, n_perm=25, seed=3, device=device, precision=precision)
    for m, b in enumerate(words):
        for k, a in enumerate(images):
            ref = two_vs_two(a, b)
            assert observed.passes[0, m, k] == ref.passed.sum() // 2
            np.testing.assert_array_equal(observed.concept_passes[m, k], ref.passed.sum(1))
        np.testing.assert_array_equal(null.passes[:, m, :], permutation_null(images, b, 25, seed=3).passes)
    assert observed.decided == 3 * 5 * w * (w - 1) // 2 and null.decided == 25 * observed.decided


@pytest.mark.parametrize("precision", PRECISIONS)
def test_null_does_not_depend_on_shards_or_block_sizes(precision):
    images = [related(40, s)[0] for s in range(4)]
    words = [related(40, 9)[1], related(40, 8)[1]]
    whole = stacked_two_vs_two(images, words, n_perm=30, seed=11, precision=precision).passes
    parts = [stacked_two_vs_two(images, words, n_perm=n, seed=11, start=s, precision=precision) for s, n in
             [(0, 7), (7, 20), (27, 3)]]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([p.passes for p in parts]), whole)
    tiny = stacked_two_vs_two(images, words, n_perm=30, seed=11, precision=precision, memory_mb=1)
    np.testing.assert_array_equal(tiny.passes, whole)


def bisect(f, lo, hi, steps=80):
    """The final bracket [lo, hi] of bisection for f's sign change in [lo, hi]."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) * f(lo) > 0 else (lo, mid)
    return lo, hi


def near_ties(w, seed, gaps):
    """Matrices and pairs whose margins are ``TIE_TOLERANCE + gaps[k]`` (to about 1e-15).

    The pairs are vertex-disjoint pairs whose margins are small already; pair k's margin is moved by
    bisection on word-matrix entry (i, c_k), c_k a concept of no tuned pair. A move touches only rows i and
    c_k, so the tuned pairs stay independent."""
    a, b = related(w, seed, dims=20)
    all_pairs = sorted((abs(margin(a, b, i, j)), i, j) for i in range(w) for j in range(i + 1, w))
    pairs, used = [], set()
    for _, i, j in all_pairs:
        if len(pairs) < len(gaps) and not {i, j} & used:
            pairs.append((i, j))
            used |= {i, j}
    free = [c for c in range(w) if c not in used]
    tuned = []
    for gap, (i, j) in zip(gaps, pairs):
        target = TIE_TOLERANCE + gap
        for c in free:

            def f(eps, i=i, j=j, c=c, base=b[i, c], target=target):
                b[i, c] = b[c, i] = base + eps
                return margin(a, b, i, j) - target

            if f(-0.9) * f(0.9) < 0:
                lo, hi = bisect(f, -0.9, 0.9)
                f(hi if (f(hi) > 0) == (gap > 0) else lo)  # the side of the threshold the gap names
                free.remove(c)
                tuned.append((i, j))
                break
            f(0.0)
    assert len(tuned) == len(gaps)
    return a, b, tuned


@pytest.mark.parametrize("device", DEVICES)
def test_near_ties_that_fp32_alone_gets_wrong_are_decided_as_in_fp64(device):
    gaps = [s * g for g in (1e-10, 3e-9, 1e-8, 3e-8, 1e-7) for s in (1, -1)]
    a, b, pairs = near_ties(48, 5, gaps)
    ref = two_vs_two(a, b).passed
    # the reference decides as the gaps say: these pairs really sit on either side of the threshold
    assert [bool(ref[p]) for p in pairs] == [g > 0 for g in gaps]
    # float32 arithmetic alone cannot resolve them: its raw margins put some on the wrong side
    a64, b64 = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    perms = torch.arange(48)[None]
    img = kernels._ImageTerms.build(a64, torch.float32)
    word = kernels._WordTerms.build(b64)
    raw = kernels._stacked_margins(img, *kernels._permuted_words(word, perms, torch.float32), 0, 1)[0, 0]
    assert sum(bool(raw[p] > TIE_TOLERANCE) != ref[p] for p in pairs) >= 1
    # the recheck does: every pair as numpy's float64, near ties included
    got = stacked_two_vs_two([a], [b], device=device, precision="fp32")
    np.testing.assert_array_equal(kernels.two_vs_two(a, b, device, "fp32").passed, ref)
    assert got.rechecked >= len(gaps)
    # the counts and each concept's count take the rechecked decisions, not the raw ones
    assert got.passes[0, 0, 0] == ref.sum() // 2
    np.testing.assert_array_equal(got.concept_passes[0, 0], ref.sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_error_band_bounds_the_actual_error(dtype):
    """|m(dtype) - m(exact)| <= R_i + R_j: the float32 margins against the float64 ones (whose own error is
    below 1e-13) for every pair and permutation, the float64 margins against the papers' definition."""
    w = 70
    a, b = related(w, 3)
    perms = torch.from_numpy(twovtwo.permutations(w, 6, 0))
    a64, b64 = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    word = kernels._WordTerms.build(b64)
    margins = {}
    for dt in {dtype, torch.float64}:
        img = kernels._ImageTerms.build(a64, dt)
        margins[dt] = kernels._stacked_margins(img, *kernels._permuted_words(word, perms, dt), 0, 1)[0].double()
    img = kernels._ImageTerms.build(a64, dtype)
    r = kernels._row_bounds(img, word, perms, dtype, torch.device("cpu"))[0]
    band = r[:, :, None] + r[:, None, :]
    iu = torch.triu_indices(w, w, 1)
    if dtype == torch.float32:
        err = (margins[dtype] - margins[torch.float64]).abs()
        err, band = err[:, iu[0], iu[1]], band[:, iu[0], iu[1]]
        assert (err <= band).all() and err.max() > 0
        assert band.max() < 1e-2  # useful: the band is small next to typical margins
    else:
        for p, perm in enumerate(perms.numpy()):
            bp = b[perm][:, perm]
            for i, j in [(0, 1), (5, 9), (20, 68), (33, 34)]:
                assert abs(margins[dtype][p, i, j].item() - margin(a, bp, i, j)) <= band[p, i, j] + 1e-13


def test_real_activations_decide_alike_in_both_precisions_and_few_pairs_are_rechecked():
    from semprobe.actors.extractor import ActivationExtractor
    from semprobe.datasets.decode import decode_image, read_bytes
    from semprobe.datasets.images import resolve_images

    extractor = ActivationExtractor("efficientnet_lite0", "blocks", dtype="float32", device="cpu")
    pre = extractor.preprocess
    uris = resolve_images("sample:imagenet").images["uri"].to_pylist()
    pixels = np.stack([decode_image(read_bytes(u), pre.size, pre.resize_size, pre.interpolation) for u in uris])
    out = extractor({"pixels": pixels})
    images = [np.corrcoef(out[layer.name].astype(np.float64)) for layer in extractor.layers]
    words = [np.corrcoef(np.random.default_rng(0).standard_normal((len(uris), 50)))]
    fp64 = stacked_two_vs_two(images, words, n_perm=100, seed=0, precision="fp64")
    fp32 = stacked_two_vs_two(images, words, n_perm=100, seed=0, precision="fp32")
    np.testing.assert_array_equal(fp32.passes, fp64.passes)
    np.testing.assert_array_equal(fp64.passes[:, 0, :], permutation_null(images, words[0], 100, seed=0).passes)
    assert fp64.rechecked == 0
    assert 0 < fp32.rechecked < 0.05 * fp32.decided


def test_bad_stacks_are_refused():
    a, b = related(10, 0)
    with pytest.raises(InputError, match="over 10 concepts, word matrices over 9"):
        stacked_two_vs_two([a], [b[:9, :9]])
    with pytest.raises(InputError, match="unknown precision 'fp16'"):
        stacked_two_vs_two([a], [b], precision="fp16")
    flat = np.ones((5, 5)) + np.eye(5)
    with pytest.raises(InputError, match="zero-variance row in image matrix 1"):
        stacked_two_vs_two([a[:5, :5], flat], [b[:5, :5]])
