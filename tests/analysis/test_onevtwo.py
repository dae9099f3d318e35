import numpy as np
import pytest
import torch

from semprobe.analysis import onevtwo
from semprobe.analysis.errors import InputError
from semprobe.analysis.onevtwo import (
    NULLS,
    bounded_reference_correlations,
    margin_bounds,
    one_vs_two,
    one_vs_two_null,
    reference_correlations,
    row_permutations,
)
from semprobe.analysis.similarity import centred_unit_rows
from semprobe.analysis.twovtwo import TIE_TOLERANCE, permutations


def naive(i_x, d_t, d_p):
    """As the papers state it, image by image, with numpy's Pearson r."""
    r = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    return np.array([r(i, t) - r(i, p) > 1e-9 for i, t, p in zip(i_x, d_t, d_p)])


def structured(n=30, r=12, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    d_t, d_p = rng.normal(size=(n, r)), rng.normal(size=(n, r))
    i_x = d_t + noise * rng.normal(size=(n, r))  # the image side follows the true class
    return i_x, d_t, d_p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_naive_loop_image_by_image(seed):
    i_x, d_t, d_p = structured(seed=seed)
    result = one_vs_two(i_x, d_t, d_p)
    np.testing.assert_array_equal(result.passed, naive(i_x, d_t, d_p))
    assert result.accuracy == naive(i_x, d_t, d_p).mean() and result.accuracy > 0.7
    flipped = one_vs_two(i_x, d_p, d_t)  # swapping true and predicted flips every decided image
    assert flipped.accuracy == pytest.approx(1 - result.accuracy)


def test_column_null_shuffles_reference_concepts_on_the_word_side_and_is_shard_independent():
    i_x, d_t, d_p = structured(n=25, r=10, seed=3)
    null = one_vs_two_null(i_x, d_t, d_p, n_perm=30, seed=5, null="columns").accuracy
    expected = [naive(i_x, d_t[:, p], d_p[:, p]).mean() for p in permutations(10, 30, seed=5)]
    np.testing.assert_array_equal(null, expected)
    parts = np.concatenate(
        [one_vs_two_null(i_x, d_t, d_p, n, seed=5, start=s, null="columns").accuracy for s, n in [(0, 11), (11, 19)]]
    )
    np.testing.assert_array_equal(parts, null)
    assert abs(null.mean() - 0.5) < 0.15 and one_vs_two(i_x, d_t, d_p).accuracy > np.quantile(null, 0.95)


def naive_row_null(i_x, d_t, d_p, n_perm, seed):
    """The authors' null written out: per permutation, image j keeps its i_x but takes d_t of image pt[j] and d_p of
    image pp[j], pt and pp two independent shuffles of the images (drawn in that order from default_rng([seed, k]))."""
    n, null = len(i_x), []
    for k in range(n_perm):
        rng = np.random.default_rng([seed, k])
        pt, pp = rng.permutation(n), rng.permutation(n)
        passed = []
        for j in range(n):
            r_t = np.corrcoef(i_x[j], d_t[pt[j]])[0, 1]
            r_p = np.corrcoef(i_x[j], d_p[pp[j]])[0, 1]
            passed.append(r_t - r_p > 1e-9)
        null.append(np.mean(passed))
    return np.array(null)


def test_row_null_is_the_authors_shuffle_of_images_and_is_shard_independent():
    i_x, d_t, d_p = structured(n=25, r=10, seed=3)
    null = one_vs_two_null(i_x, d_t, d_p, n_perm=40, seed=5).accuracy  # rows: the default
    np.testing.assert_array_equal(null, naive_row_null(i_x, d_t, d_p, 40, seed=5))
    np.testing.assert_array_equal(one_vs_two_null(i_x, d_t, d_p, 40, seed=5, null="rows").accuracy, null)
    parts = np.concatenate([one_vs_two_null(i_x, d_t, d_p, n, seed=5, start=s).accuracy for s, n in [(0, 7), (7, 33)]])
    np.testing.assert_array_equal(parts, null)
    assert abs(null.mean() - 0.5) < 0.1 and one_vs_two(i_x, d_t, d_p).accuracy > null.max()
    # the two sides are shuffled apart: the true side's permutation differs from the predicted side's
    true, pred = row_permutations(25, 40, seed=5)
    assert (true != pred).any(axis=1).all()
    np.testing.assert_array_equal(true[7:], row_permutations(25, 33, seed=5, start=7)[0])
    # and the null is not the column null's
    assert not np.array_equal(null[:30], one_vs_two_null(i_x, d_t, d_p, 30, seed=5, null="columns").accuracy)


def test_row_null_of_images_that_share_a_word_side_is_the_observed():
    """Shuffling identical rows changes nothing: every permutation gives the observed accuracy."""
    i_x, d_t, d_p = structured(n=6, r=8, seed=4)
    d_t[:], d_p[:] = d_t[0], d_p[0]
    observed = one_vs_two(i_x, d_t, d_p).accuracy
    np.testing.assert_array_equal(one_vs_two_null(i_x, d_t, d_p, 10, seed=1).accuracy, np.full(10, observed))
    with pytest.raises(InputError, match="unknown 1 vs. 2 null 'images': choose one of rows, columns"):
        one_vs_two_null(i_x, d_t, d_p, 10, seed=1, null="images")


def test_ties_and_constant_rows():
    i_x, d_t, _ = structured(n=4, r=6)
    assert one_vs_two(i_x, d_t, d_t).accuracy == 0.0  # t = p: every image ties, and ties fail
    d_t[2] = 0.3
    with pytest.raises(InputError, match="zero-variance row 2 in the true-class word correlations"):
        one_vs_two(i_x, d_t, i_x)


def test_reference_correlations_are_numpy_pearson_item_by_item():
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(9, 30)).astype(np.float32) * 4 + 1
    items, references = [0, 4, 4], [[1, 2, 3, 5], [0, 1, 2, 8], [8, 7, 6, 5]]
    result = reference_correlations(rows, items, references)
    assert result.shape == (3, 4) and result.dtype == np.float64
    for k, (item, refs) in enumerate(zip(items, references)):
        for j, r in enumerate(refs):
            expected = np.corrcoef(rows[item].astype(np.float64), rows[r].astype(np.float64))[0, 1]
            assert result[k, j] == pytest.approx(expected, abs=1e-14)
    # an item's row does not depend on the others asked for with it
    np.testing.assert_array_equal(reference_correlations(rows, items[1:], references[1:]), result[1:])
    assert reference_correlations(rows, [], []).shape == (0, 0)
    rows[5] = 2.0
    with pytest.raises(InputError, match="zero-variance row 5 in the activations"):
        reference_correlations(rows, items, references, "the activations")


# --- the torch path (any device; CPU here) against the numpy reference, and fp32 with exact decisions ---


def with_offset(n, r, seed, offset=1e3):
    """Structured inputs whose image side sits far from zero: float32 loses digits when it centres them, so fp32
    margins err by ~1e-5 and near-tie decisions need the float64 recheck."""
    i_x, d_t, d_p = structured(n=n, r=r, seed=seed)
    return i_x * 0.01 + offset, d_t, d_p


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("n, r", [(4, 3), (40, 12), (300, 100)])
def test_torch_equals_numpy_decision_by_decision(n, r, precision):
    i_x, d_t, d_p = with_offset(n, r, seed=n)
    reference = one_vs_two(i_x, d_t, d_p)
    got = one_vs_two(i_x, d_t, d_p, device="cpu", precision=precision)
    np.testing.assert_array_equal(got.passed, reference.passed)
    np.testing.assert_array_equal(got.passed, naive(i_x, d_t, d_p))
    assert got.accuracy == reference.accuracy and (precision == "fp32" or got.rechecked == 0)
    for null in NULLS:
        expected = one_vs_two_null(i_x, d_t, d_p, 60, seed=2, null=null).accuracy
        drawn = one_vs_two_null(i_x, d_t, d_p, 60, seed=2, null=null, device="cpu", precision=precision)
        np.testing.assert_array_equal(drawn.accuracy, expected)
        # any split into shards, and any stacking, gives the same null
        parts = [
            one_vs_two_null(i_x, d_t, d_p, k, seed=2, start=s, null=null, device="cpu", precision=precision).accuracy
            for s, k in [(0, 1), (1, 22), (23, 37)]
        ]
        np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_stacked_null_chunks_do_not_change_it(monkeypatch):
    i_x, d_t, d_p = with_offset(30, 10, seed=9)
    whole = {null: one_vs_two_null(i_x, d_t, d_p, 25, 3, null=null).accuracy for null in NULLS}
    monkeypatch.setattr(onevtwo, "BATCH_ENTRIES", 30 * 10 * 4)  # 4 permutations per stacked product
    for null in NULLS:
        for precision in ("fp64", "fp32"):
            got = one_vs_two_null(i_x, d_t, d_p, 25, 3, null=null, device="cpu", precision=precision).accuracy
            np.testing.assert_array_equal(got, whole[null])


def near_ties(n=400, r=50, seed=0, offset=1e3):
    """Inputs whose margins corr(i_x, d_t) - corr(i_x, d_p) lie within 1e-7 of TIE_TOLERANCE, on both sides: d_p =
    c z_i + sqrt(1 - c^2) w with w a centred unit vector orthogonal to z_i has corr(i_x, d_p) = c exactly, and c is
    set to corr(i_x, d_t) - TIE_TOLERANCE - delta. Returns the inputs and the deltas (the exact margin minus the
    threshold, up to float64 rounding, far below |delta|)."""
    rng = np.random.default_rng(seed)
    i_x = rng.normal(size=(n, r)) * 0.01 + offset
    d_t = i_x - offset + rng.normal(size=(n, r)) * 0.01
    z_i = centred_unit_rows(i_x)
    z_t = centred_unit_rows(d_t)
    delta = rng.uniform(1e-9, 1e-7, n) * np.where(np.arange(n) % 2, 1, -1)
    c = np.einsum("ij,ij->i", z_i, z_t) - TIE_TOLERANCE - delta
    w = centred_unit_rows(rng.normal(size=(n, r)))
    w -= np.einsum("ij,ij->i", w, z_i)[:, None] * z_i
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    d_p = c[:, None] * z_i + np.sqrt(1 - c**2)[:, None] * w
    return i_x, d_t, d_p, delta


def float32_alone(i_x, d_t, d_p):
    """The margins decided in float32 with no recheck, the same operations as the torch path."""

    def unit(x):
        x = torch.from_numpy(x).float()
        c = x - x.mean(-1, keepdim=True)
        return c / c.square().sum(-1, keepdim=True).sqrt()

    return ((unit(i_x) * (unit(d_t) - unit(d_p))).sum(-1) > TIE_TOLERANCE).numpy()


def test_near_ties_float32_alone_decides_wrongly_the_recheck_gives_fp64():
    i_x, d_t, d_p, delta = near_ties()
    truth = delta > 0  # margin - threshold = delta
    np.testing.assert_array_equal(one_vs_two(i_x, d_t, d_p).passed, truth)  # numpy fp64 resolves 1e-9
    wrong = float32_alone(i_x, d_t, d_p) != truth
    assert wrong.sum() > 50  # float32 alone gets many of them wrong, on both sides of the threshold
    assert (wrong & truth).any() and (wrong & ~truth).any()
    for precision in ("fp32", "fp64"):
        got = one_vs_two(i_x, d_t, d_p, device="cpu", precision=precision)
        np.testing.assert_array_equal(got.passed, truth)
    got = one_vs_two(i_x, d_t, d_p, device="cpu", precision="fp32")
    assert got.rechecked == len(i_x)  # every one of them lies within the bound of the threshold
    # the column null of near ties: every permutation's decisions equal numpy's
    np.testing.assert_array_equal(
        one_vs_two_null(i_x, d_t, d_p, 20, 1, null="columns", device="cpu", precision="fp32").accuracy,
        one_vs_two_null(i_x, d_t, d_p, 20, 1, null="columns").accuracy,
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_bound_bounds_on_many_random_inputs(seed):
    """|m32 - m_exact| <= E32 and |m64 - m_exact| <= E64, with the exact margin taken in 80-bit long double."""
    rng = np.random.default_rng(seed)
    worst32 = worst64 = 0.0
    for _ in range(50):
        n, r = 40, int(rng.integers(3, 400))
        i_x, d_t, d_p = structured(n=n, r=r, seed=int(rng.integers(1 << 30)), noise=rng.uniform(0.1, 3))
        i_x = i_x * 10 ** rng.uniform(-3, 3) + rng.uniform(-1, 1) * 10 ** rng.uniform(0, 4)
        d_p = d_t + rng.normal(size=d_t.shape) * 10 ** rng.uniform(-6, 0)  # near ties too

        def unit(x):
            x = np.asarray(x, np.longdouble)
            c = x - x.mean(-1, keepdims=True)
            return c / np.sqrt((c * c).sum(-1, keepdims=True))

        exact = (unit(i_x) * (unit(d_t) - unit(d_p))).sum(-1)
        m32, e32, band64 = margin_bounds(i_x, d_t, d_p, precision="fp32")
        m64, e64, _ = margin_bounds(i_x, d_t, d_p, precision="fp64")
        assert (np.abs(m64 - exact) <= band64).all()  # the E64 that widens the fp32 recheck band bounds fp64
        worst32 = max(worst32, float(np.max(np.abs(m32 - exact) / e32)))
        worst64 = max(worst64, float(np.max(np.abs(m64 - exact) / np.maximum(e64, 1e-300))))
    assert worst32 <= 1 and worst64 <= 1
    assert worst32 > 1e-4  # and it is not vacuous


def test_reference_correlations_torch_and_their_bounds():
    rng = np.random.default_rng(7)
    rows = (rng.normal(size=(30, 500)) * rng.uniform(0.1, 10, (30, 1)) + rng.uniform(-50, 50, (30, 1))).astype(
        np.float16
    )
    items = [0, 3, 3, 29]
    references = [[1, 2, 4, 5, 6], [0, 1, 2, 8, 9], [9, 8, 7, 6, 5], [10, 11, 12, 13, 14]]
    expected = reference_correlations(rows, items, references)
    for k, (item, refs) in enumerate(zip(items, references)):
        for j, ref in enumerate(refs):
            assert expected[k, j] == pytest.approx(np.corrcoef(rows[[item, ref]].astype(np.float64))[0, 1], abs=1e-14)
    for precision, tolerance in (("fp64", 1e-13), ("fp32", 1e-5)):
        got = bounded_reference_correlations(rows, items, references, device="cpu", precision=precision)
        np.testing.assert_allclose(got.values, expected, atol=tolerance)
        assert (np.abs(got.values - expected) <= got.error).all() and (got.error < 1e-3).all()
        np.testing.assert_allclose(got.exact(np.array([2, 0])), expected[[2, 0]], atol=1e-13)
        np.testing.assert_allclose(
            reference_correlations(rows, items, references, device="cpu", precision=precision), got.values
        )
    rows[12] = 4.0
    with pytest.raises(InputError, match="zero-variance row 12 in the activations"):
        reference_correlations(rows, items, references, "the activations", device="cpu")
    with pytest.raises(InputError, match="zero-variance row 1 in the true-class word correlations"):
        d_t = np.ones((3, 4))
        d_t[[0, 2]] = [[1, 2, 3, 4], [4, 2, 3, 1]]
        one_vs_two(np.random.default_rng(0).normal(size=(3, 4)), d_t, d_t[::-1], device="cpu")
    with pytest.raises(InputError, match="unknown precision 'fp16': choose one of fp64, fp32"):
        one_vs_two(*structured(n=3, r=4), device="cpu", precision="fp16")


@pytest.fixture(scope="module")
def lite0_sample():
    """efficientnet_lite0's block activations of foolbox's 20 ImageNet samples, and the GloVe words of their classes."""
    from semprobe.actors.extractor import ActivationExtractor
    from semprobe.datasets.classes import imagenet_classes
    from semprobe.datasets.concepts import match_concepts
    from semprobe.datasets.decode import decode_image, read_bytes
    from semprobe.datasets.images import resolve_images
    from semprobe.datasets.words import load_word_model

    ex = ActivationExtractor("efficientnet_lite0", "blocks", device="cpu")
    images = resolve_images("sample:imagenet").images
    pre = ex.preprocess
    pixels = np.stack([decode_image(read_bytes(u), pre.size, pre.resize_size) for u in images["uri"].to_pylist()])
    out = ex({"pixels": pixels})
    glove = load_word_model("glove-50d")
    words = {
        c["class_index"]: c["word"] for c in match_concepts(imagenet_classes(), "imagenet", [glove]).table.to_pylist()
    }
    classes = images["class_index"].to_pylist()
    layers = {k: v for k, v in out.items() if k.startswith("blocks")}
    return layers, classes, words, glove


def test_real_activations_fp32_decisions_equal_the_numpy_fp64_pipeline(lite0_sample, record_property):
    """1 vs. 2 of efficientnet_lite0's 18 block layers on the samples: image k (with a word) against the class of
    the next such image, R = 8 references among the rest; fp32 (activations' correlations included) against the
    numpy float64 pipeline, decision by decision, observed and both nulls. The fraction rechecked is reported."""
    layers, classes, words, glove = lite0_sample
    named = [k for k, c in enumerate(classes) if c in words]
    cases = []
    for pos, k in enumerate(named):
        p_image = named[(pos + 3) % len(named)]
        t, p = classes[k], classes[p_image]
        if t == p:
            continue
        refs = [j for j in named if classes[j] not in (t, p)][:8]
        cases.append((k, t, p, refs))
    vectors = {c: glove.vectors([words[c]])[0].astype(np.float64) for c in {classes[k] for k in named}}
    word_rows = np.stack([vectors[c] for c in sorted(vectors)])
    at = {c: j for j, c in enumerate(sorted(vectors))}
    ref_rows = [[at[classes[j]] for j in refs] for *_, refs in cases]
    d_t = reference_correlations(word_rows, [at[t] for _, t, _, _ in cases], ref_rows)
    d_p = reference_correlations(word_rows, [at[p] for _, _, p, _ in cases], ref_rows)
    items, references = [k for k, *_ in cases], [refs for *_, refs in cases]
    rechecked = decisions = 0
    for name, acts in layers.items():
        i_x64 = reference_correlations(acts, items, references)
        i_x32 = bounded_reference_correlations(acts, items, references, device="cpu", precision="fp32")
        assert (np.abs(i_x32.values - i_x64) <= i_x32.error).all()
        reference = one_vs_two(i_x64, d_t, d_p)
        got = one_vs_two(i_x32, d_t, d_p, device="cpu", precision="fp32")
        np.testing.assert_array_equal(got.passed, reference.passed, err_msg=name)
        rechecked, decisions = rechecked + got.rechecked, decisions + len(items)
        for null in NULLS:
            drawn = one_vs_two_null(i_x32, d_t, d_p, 100, 0, null=null, device="cpu", precision="fp32")
            np.testing.assert_array_equal(drawn.accuracy, one_vs_two_null(i_x64, d_t, d_p, 100, 0, null=null).accuracy)
            rechecked, decisions = rechecked + drawn.rechecked, decisions + 100 * len(items)
    fraction = rechecked / decisions
    record_property("rechecked_fraction", fraction)
    print(f"lite0 on sample:imagenet, {len(items)} images x 18 layers, R = 8: fp32 rechecked {fraction:.2%}")
    assert 0 <= fraction < 0.5
