import numpy as np
import pytest

from semprobe.analysis.affine import (
    AffineMap,
    JointGram,
    accuracy,
    classifier_head,
    correct_count,
    fit_affine,
    logit_map,
    naive_map,
)
from semprobe.analysis.errors import InputError


def gram_of(feats: dict, shards: int = 1) -> JointGram:
    g = JointGram(list(feats), [f.shape[1] for f in feats.values()])
    for rows in np.array_split(np.arange(len(next(iter(feats.values())))), shards):
        part = JointGram(list(feats), [f.shape[1] for f in feats.values()])
        part.add([f[rows] for f in feats.values()])
        g.merge(part)
    return g


def lstsq_map(x, y):
    """The single-machine reference: numpy's lstsq on [x, 1]."""
    coef = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    return coef[:-1], coef[-1]


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12)) * rng.uniform(0.1, 30, 12) + rng.uniform(-50, 50, 12)  # scales and offsets
    exact = a @ rng.normal(size=(12, 9)) + rng.normal(size=9)  # an exact affine image of a
    other = np.tanh(a[:, :7] / 20) + 0.1 * rng.normal(size=(400, 7))  # not affine in a
    return {"a": a, "exact": exact, "other": other}


def test_exact_affine_transforms_are_recovered_to_numerical_precision(feats):
    exact, other = fit_affine(gram_of(feats), "a", ["exact", "other"])
    np.testing.assert_allclose(exact(feats["a"]), feats["exact"], atol=1e-8)
    assert exact.r2 == pytest.approx(1, abs=1e-12)
    residual = feats["other"] - other(feats["a"])
    expected = 1 - (residual**2).sum() / ((feats["other"] - feats["other"].mean(0)) ** 2).sum()
    assert other.r2 == pytest.approx(expected, abs=1e-10) and other.r2 < 0.99


def test_distributed_sums_equal_single_machine_lstsq_whatever_the_shards(feats):
    for src in feats:
        for m in fit_affine(gram_of(feats, 3), src, [t for t in feats if t != src]):
            weight, bias = lstsq_map(feats[src], feats[m.target])
            np.testing.assert_allclose(m.weight, weight, rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(m.bias, bias, rtol=1e-7, atol=1e-7)
    assert gram_of(feats, 7).n == 400
    for src in feats:
        targets = [t for t in feats if t != src]
        for one, seven in zip(fit_affine(gram_of(feats, 1), src, targets), fit_affine(gram_of(feats, 7), src, targets)):
            np.testing.assert_allclose(one.weight, seven.weight, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(one.bias, seven.bias, rtol=1e-9, atol=1e-10)


def test_underdetermined_is_refused_unless_ridge_and_ridge_matches_closed_form(feats):
    few = {k: v[:10] for k, v in feats.items()}  # 10 images, 12 features
    with pytest.raises(InputError, match="underdetermined: 10 training images for the 12 features .* of a; .*--ridge"):
        fit_affine(gram_of(few), "a", ["other"])
    (m,) = fit_affine(gram_of(few), "a", ["other"], ridge=0.5)
    x, y = few["a"] - few["a"].mean(0), few["other"] - few["other"].mean(0)
    reference = np.linalg.solve(x.T @ x / 10 + 0.5 * np.eye(12), x.T @ y / 10)
    np.testing.assert_allclose(m.weight, reference, rtol=1e-8, atol=1e-10)
    residual = few["other"] - m(few["a"])
    assert m.r2 == pytest.approx(1 - (residual**2).sum() / (y**2).sum(), abs=1e-10)
    dependent = {"a": np.hstack([feats["a"], feats["a"][:, :1] * 2]), "other": feats["other"]}
    with pytest.raises(InputError, match="linearly dependent"):
        fit_affine(gram_of(dependent), "a", ["other"])


def test_logit_map_keeps_predictions_exactly_when_the_target_has_full_row_rank():
    rng = np.random.default_rng(1)
    x_a = rng.normal(size=(200, 6))
    w_a, b_a = rng.normal(size=(5, 6)), rng.normal(size=5)
    w_b, b_b = rng.normal(size=(5, 8)), rng.normal(size=5)  # 5 classes, 8 features: full row rank
    m = logit_map("a", "b", w_a, b_a, w_b, b_b)
    assert (m.rank, m.full_row_rank) == (5, True)
    np.testing.assert_allclose(m(x_a) @ w_b.T + b_b, x_a @ w_a.T + b_a, atol=1e-10)
    labels = (x_a @ w_a.T + b_a).argmax(1)
    assert accuracy(x_a, labels, m, w_b, b_b, rows=64) == 1.0 == accuracy(x_a, labels, None, w_a, b_a)
    narrow = logit_map("a", "c", w_a, b_a, rng.normal(size=(5, 3)), b_b)  # 3 features < 5 classes
    assert (narrow.rank, narrow.full_row_rank) == (3, False)


def test_naive_map_truncates_or_zero_pads():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(naive_map("a", "b", 3, 2)(x), x[:, :2])
    np.testing.assert_array_equal(naive_map("a", "b", 3, 5)(x), np.hstack([x, np.zeros((2, 2))]))


def test_a_checkpointed_gram_merges_like_the_sums_of_its_images(feats):
    names, widths = list(feats), [f.shape[1] for f in feats.values()]
    halves = [JointGram(names, widths), JointGram(names, widths)]
    for half, rows in zip(halves, (slice(0, 150), slice(150, 400))):
        half.add([f[rows] for f in feats.values()])
    merged = JointGram(names, widths, halves[0].gram.copy()).merge(JointGram(names, widths, halves[1].gram))
    z = np.hstack([*feats.values(), np.ones((400, 1))])
    expected = np.zeros((z.shape[1], z.shape[1]))
    for row in z:  # one image at a time
        expected += np.outer(row, row)
    np.testing.assert_allclose(merged.gram, expected, rtol=1e-12, atol=1e-8)
    assert merged.n == 400
    with pytest.raises(InputError, match=r"a joint Gram of a, exact, other is 29 x 29, got \(3, 3\)"):
        JointGram(names, widths, np.zeros((3, 3)))


def test_correct_count_and_classifier_head_match_a_loop_over_images():
    rng = np.random.default_rng(2)
    x_a, labels = rng.normal(size=(50, 6)), rng.integers(0, 4, size=50)
    mapping = AffineMap("a", "b", rng.normal(size=(6, 5)), rng.normal(size=5), rcond=float("nan"))
    w, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    by_hand = 0
    for x, label in zip(x_a, labels):  # map, classify, compare: one image at a time
        mapped = [sum(x[i] * mapping.weight[i, j] for i in range(6)) + mapping.bias[j] for j in range(5)]
        logits = [sum(mapped[j] * w[c, j] for j in range(5)) + b[c] for c in range(4)]
        by_hand += int(max(range(4), key=lambda c: logits[c]) == label)
    assert 0 < by_hand < 50
    assert correct_count(x_a, labels, mapping, w, b, rows=7) == by_hand == correct_count(x_a, labels, mapping, w, b)
    assert accuracy(x_a, labels, mapping, w, b) == by_hand / 50
    w_ab, b_ab = classifier_head(mapping, w, b)
    assert w_ab.shape == (4, 6) and b_ab.shape == (4,)
    np.testing.assert_allclose(x_a @ w_ab.T + b_ab, mapping(x_a) @ w.T + b, rtol=1e-12, atol=1e-12)
    assert correct_count(x_a, labels, None, w_ab, b_ab) == by_hand


def test_joint_gram_at_the_thesis_width_equals_a_blockwise_reference():
    """Joint width 23,777 (the thesis's ten CNNs' features and the ones column): numpy's z.T @ z segfaults there
    on this machine (its OpenBLAS's dsyrk, numpy issue #19685). JointGram.add goes through torch's gemm
    (analysis.similarity.add_gram); two batches must equal float64 products made block by block, each block narrow
    enough for any BLAS."""
    widths = [2972] * 8  # D = 23,776 features
    g = JointGram([f"cnn{i}" for i in range(len(widths))], widths)
    rng = np.random.default_rng(0)
    # a batch of 256 images: numpy's 256 x 23,777 z.T @ z is the product that crashes
    batches = [[rng.standard_normal((n, w)).astype(np.float32) for w in widths] for n in (256, 32)]
    for batch in batches:
        g.add(batch)
    z = np.concatenate([np.concatenate([*b, np.ones((len(b[0]), 1), np.float32)], axis=1) for b in batches])
    z = z.astype(np.float64)
    assert g.gram.shape == (23_777, 23_777) and g.n == 288
    # Every entry, against products narrow enough for any BLAS: the Gram applied to random vectors equals z.T @ (z @ v)
    # (Freivalds' check: an entry off by more than the rounding moves its row of the product, whichever entry), at a
    # 60th of the cost of the whole reference product; then the corner blocks entry by entry (the first CNN's, and the
    # last CNN's with the ones column: the sums and the count).
    v = rng.standard_normal((z.shape[1], 3))
    np.testing.assert_allclose(g.gram @ v, z.T @ (z @ v), rtol=1e-10, atol=1e-6)
    for a in (slice(0, 4096), slice(-4096, None)):
        np.testing.assert_allclose(g.gram[a, a], z[:, a].T @ z[:, a], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(np.diagonal(g.gram), (z * z).sum(axis=0), rtol=1e-10, atol=1e-9)
