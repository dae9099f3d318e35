import numpy as np
import pytest
import torch

from semprobe.analysis import similarity
from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.similarity import (
    GramAccumulator,
    centred_gram,
    centred_unit_rows,
    correlation_matrix,
    paired_cosine,
    zscore_rows,
)


def test_zscore_rows_gram_is_pearson():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 4, 5)) * rng.uniform(0.1, 10, size=(6, 1, 1, 1)) + 3
    z = zscore_rows(torch.from_numpy(x)).numpy()
    assert z.shape == (6, 60)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(z @ z.T, np.corrcoef(x.reshape(6, -1)), atol=1e-6)


def test_zscore_rows_float64_and_half_output():
    x = torch.arange(12, dtype=torch.float64).reshape(2, 6) ** 2
    z64 = zscore_rows(x, out_dtype=torch.float64)
    ref = x.numpy() - x.numpy().mean(axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(z64.numpy(), ref, rtol=1e-12)
    z16 = zscore_rows(x.float(), out_dtype=torch.float16)
    assert z16.dtype == torch.float16
    np.testing.assert_allclose(z16.float().numpy(), ref, atol=1e-3)


def test_zscore_rows_zero_variance_is_zero_not_nan():
    x = torch.tensor([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]])
    z = zscore_rows(x)
    assert torch.equal(z[0], torch.zeros(3))
    np.testing.assert_allclose(z[1].numpy(), [-1 / np.sqrt(2), 0, 1 / np.sqrt(2)], rtol=1e-6)


def test_zscore_rows_does_not_alias_input():
    x = torch.randn(3, 8)
    z = zscore_rows(x)
    x.zero_()
    assert z.abs().sum() > 0


def test_zscore_rows_channels_last_keeps_chw_order():
    x = torch.randn(3, 4, 5, 6)
    z = zscore_rows(x.to(memory_format=torch.channels_last), out_dtype=torch.float16)
    assert z.shape == (3, 120) and z.is_contiguous()
    torch.testing.assert_close(z, zscore_rows(x.contiguous(), out_dtype=torch.float16))


def test_zscore_rows_constant_nonzero_row_is_zero():
    x = torch.tensor([[0.1] * 1000, [3.0] * 999 + [3.0000002]])
    assert torch.count_nonzero(zscore_rows(x)) == 0


def test_correlation_matrix_one_product_and_blocked_equal_numpy_pearson():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 4, 25)) * rng.uniform(0.1, 5, size=(9, 1, 1)) + 100  # far from centred
    expected = np.corrcoef(x.reshape(9, -1))
    np.testing.assert_allclose(correlation_matrix(x), expected, atol=1e-12)
    np.testing.assert_allclose(correlation_matrix(x, block=7), expected, atol=1e-12)
    np.testing.assert_allclose(
        correlation_matrix(x.astype(np.float32), compute="float32", block=16), expected, atol=1e-5
    )


def test_gram_accumulators_merge_across_workers():
    rng = np.random.default_rng(6)
    z = zscore_rows(torch.from_numpy(rng.normal(size=(7, 60)))).numpy().astype(np.float16)  # as stored
    left, right = GramAccumulator(7), GramAccumulator(7)
    for lo in range(0, 30, 8):
        left.add(z[:, lo : min(lo + 8, 30)])
    right.add(z[:, 30:])
    np.testing.assert_allclose(left.merge(right).correlation(), np.corrcoef(z.astype(np.float64)), atol=1e-6)
    assert left.n_features == 60


def test_correlation_matrix_names_constant_rows():
    x = np.random.default_rng(0).normal(size=(5, 12))
    x[3] = 2.5
    with pytest.raises(ZeroVarianceError, match=r"row\(s\) \[3\]") as err:
        correlation_matrix(x)
    assert err.value.rows == [3]
    stored = zscore_rows(torch.from_numpy(x)).numpy()  # the store keeps a constant row as zeros
    with pytest.raises(ZeroVarianceError):
        correlation_matrix(stored, block=5)


def test_centred_unit_rows_dot_products_are_numpy_pearson_row_by_row():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(7, 40)) * rng.uniform(0.1, 20, size=(7, 1)) + 5).astype(np.float16)
    z = centred_unit_rows(x)
    assert z.shape == (7, 40) and z.dtype == np.float64
    for i in range(7):
        row = x[i].astype(np.float64)
        np.testing.assert_allclose(z[i], (row - row.mean()) / np.sqrt(((row - row.mean()) ** 2).sum()), rtol=1e-13)
        for j in range(7):
            assert z[i] @ z[j] == pytest.approx(np.corrcoef(x[i].astype(np.float64), x[j].astype(np.float64))[0, 1])
    # row k does not depend on the other rows: any split gives the same bits
    np.testing.assert_array_equal(np.concatenate([centred_unit_rows(x[:3]), centred_unit_rows(x[3:])]), z)
    np.testing.assert_array_equal(centred_unit_rows(x[None])[0], z)  # (..., d)


def test_centred_unit_rows_names_a_constant_row():
    x = np.arange(12.0).reshape(3, 4)
    x[1] = 2.5
    with pytest.raises(
        ZeroVarianceError, match="zero-variance row 1 in the word vectors: its correlation is undefined$"
    ):
        centred_unit_rows(x, "the word vectors")


def test_paired_cosine_is_the_cosine_of_each_pair_of_rows():
    rng = np.random.default_rng(5)
    u, v = rng.normal(size=(6, 9)), rng.normal(size=(6, 9)).astype(np.float32)
    expected = [
        sum(a * b for a, b in zip(u[k], v[k].astype(np.float64)))
        / np.sqrt(sum(a * a for a in u[k]) * sum(float(b) * float(b) for b in v[k]))
        for k in range(6)
    ]
    cosine = paired_cosine(u, v)
    assert cosine.shape == (6,) and cosine.dtype == np.float64
    np.testing.assert_allclose(cosine, expected, rtol=1e-12)
    np.testing.assert_allclose(paired_cosine(u, 3 * u), 1.0, rtol=1e-14)
    assert paired_cosine(np.zeros((0, 9)), np.zeros((0, 9))).shape == (0,)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("w, d, dtype", [(3, 5, np.float64), (40, 2500, np.float32), (838, 1500, np.float16)])
def test_torch_correlation_matrix_is_numpy_pearson_with_a_bound_that_holds(w, d, dtype, precision):
    """The torch Gram (float64 sums of GRAM_CHUNK-feature products) against np.corrcoef, at w up to the paper's 838,
    on rows far from centred; its error bound holds entry by entry and is not vacuous."""
    rng = np.random.default_rng(w)
    x = (rng.normal(size=(w, d)) * rng.uniform(0.1, 5, (w, 1)) + rng.uniform(-20, 20, (w, 1))).astype(dtype)
    expected = np.corrcoef(x.astype(np.float64))
    got = correlation_matrix(x, device="cpu", precision=precision)
    assert got.shape == (w, w) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-12 if precision == "fp64" else 1e-5)
    gram = centred_gram(x, device="cpu", precision=precision)
    error = gram.error().numpy()
    assert (np.abs(gram.correlation().numpy() - expected) <= error).all()
    assert error.max() < (1e-8 if precision == "fp64" else 1e-2)
    assert (gram.error(fp64=True).numpy() <= error * (1 + 1e-12)).all()


def test_torch_gram_of_chosen_rows_chunked_over_features(monkeypatch):
    """Rows a x rows b of one matrix, summed over many feature chunks, equal the same entries of np.corrcoef."""
    monkeypatch.setattr(similarity, "GRAM_CHUNK", 7)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3, 10)) + 5
    expected = np.corrcoef(x.reshape(12, -1))
    gram = centred_gram(x, [4, 0, 4], [11, 2], device="cpu", precision="fp32")
    np.testing.assert_allclose(gram.correlation().numpy(), expected[np.ix_([4, 0, 4], [11, 2])], atol=1e-6)
    assert (np.abs(gram.correlation().numpy() - expected[np.ix_([4, 0, 4], [11, 2])]) <= gram.error().numpy()).all()


def test_torch_correlation_matrix_names_a_constant_row():
    x = np.random.default_rng(3).normal(size=(5, 40)).astype(np.float32)
    x[3] = 2.5
    with pytest.raises(ZeroVarianceError, match="zero-variance row 3 in the rows"):
        correlation_matrix(x, device="cpu")
    with pytest.raises(InputError, match="unknown precision 'fp8': choose one of fp64, fp32"):
        correlation_matrix(x, device="cpu", precision="fp8")


# --- --store similarity: the Gram of rows resident on a device, and the chunking of layers -------------------------


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("block", [None, 7, 1000])
def test_correlation_from_rows_is_numpy_pearson_and_the_accumulators_result(compute, block):
    from semprobe.analysis.similarity import correlation_from_rows

    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 50)) * rng.uniform(0.5, 3, size=(9, 1)) + rng.normal(size=(9, 1))
    z16 = zscore_rows(torch.from_numpy(x), out_dtype=torch.float16)  # as the actor holds them
    r = correlation_from_rows(z16, compute, block=block)
    assert r.dtype == torch.float64 and r.shape == (9, 9)
    # the reference: numpy's Pearson r of the very rows the actor holds
    tol = 1e-6 if compute == "float32" else 1e-12
    np.testing.assert_allclose(r.numpy(), np.corrcoef(z16.double().numpy()), atol=tol)
    acc = GramAccumulator(9, compute)  # the Gram tasks' path, chunk by chunk
    step = block or 50
    for lo in range(0, 50, step):
        acc.add(z16.numpy()[:, lo : lo + step])
    # float32 products of torch's and numpy's BLAS differ in summation order only: a few float32 ulps
    np.testing.assert_allclose(r.numpy(), acc.correlation(), atol=5e-7 if compute == "float32" else 1e-14)
    assert np.all(np.diag(r.numpy()) == 1.0)


def test_correlation_from_rows_constant_rows_raise_or_turn_nan():
    from semprobe.analysis.similarity import correlation_from_rows

    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 20))
    x[1] = 4.0
    x[3] = -1.0
    z = zscore_rows(torch.from_numpy(x))  # constant rows come out as zeros
    with pytest.raises(ZeroVarianceError, match=r"zero-variance row\(s\) \[1, 3\]") as err:
        correlation_from_rows(z)
    assert err.value.rows == [1, 3]
    r = correlation_from_rows(z, constant="nan").numpy()
    bad = np.isnan(r)
    assert bad[[1, 3], :].all() and bad[:, [1, 3]].all() and bad.sum() == 25 - 9
    keep = [0, 2, 4]  # the other rows' correlations do not depend on the constant ones
    np.testing.assert_allclose(r[np.ix_(keep, keep)], np.corrcoef(x[keep]), atol=1e-6)
    # a raw row (not z-scored) that is constant up to rounding is constant too, as GramAccumulator says
    raw = torch.from_numpy(np.stack([np.full(20, 1e3), rng.normal(size=20)]))
    with pytest.raises(ZeroVarianceError, match=r"\[0\]"):
        correlation_from_rows(raw, "float64")
    acc = GramAccumulator(2, "float64")
    acc.add(raw.numpy())
    with pytest.raises(ZeroVarianceError, match=r"\[0\]"):
        acc.correlation()


def naive_chunks(dims, w, itemsize, budget):
    """The chunking rule as the docs state it, by hand: walk the layers, open a new chunk when the next would
    overflow the budget (or the current one is empty)."""
    out, current, size = [], [], 0
    for i, d in enumerate(dims):
        need = w * d * itemsize
        if current and size + need > budget:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += need
    return out + ([current] if current else [])


@pytest.mark.parametrize("budget", [1, 100, 999, 1000, 5000, 10**9])
def test_chunk_layers_groups_in_order_within_the_budget(budget):
    from semprobe.analysis.similarity import chunk_layers

    dims = [10, 40, 5, 300, 1, 1, 60, 2]
    w, itemsize = 5, 2  # a layer of d features takes 10 d bytes
    chunks = chunk_layers(dims, w, itemsize, budget)
    assert chunks == naive_chunks(dims, w, itemsize, budget)
    assert [i for c in chunks for i in c] == list(range(len(dims)))
    for c in chunks:  # each chunk fits, unless it is one layer too big on its own
        assert sum(w * dims[i] * itemsize for i in c) <= budget or len(c) == 1
    if budget == 1000:  # 100 + 400 + 50 | 3000 | 10 + 10 + 600 + 20
        assert chunks == [[0, 1, 2], [3], [4, 5, 6, 7]]
    if budget == 10**9:
        assert chunks == [list(range(8))]


def test_correlation_from_rows_keeps_tf32_off_for_its_products_and_restores_the_setting(monkeypatch):
    from semprobe.analysis.similarity import correlation_from_rows

    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    before = torch.backends.cuda.matmul.allow_tf32  # a cuBLAS setting object: set and restored by hand
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x = torch.from_numpy(np.random.default_rng(3).normal(size=(4, 30)))
        r = correlation_from_rows(x, block=10)
        assert seen == [False, False, False] and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    np.testing.assert_allclose(r.numpy(), np.corrcoef(x.numpy()), atol=1e-6)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("d", [37, 3000])  # one feature chunk of centred_gram, and several
def test_correlation_block_is_numpy_pearson_of_each_row_with_each_other_row(precision, d):
    from semprobe.analysis.similarity import correlation_block

    rng = np.random.default_rng(3)
    x = rng.normal(size=(11, d)) * rng.uniform(0.5, 3, size=(11, 1)) + rng.normal(size=(11, 1))
    z16 = zscore_rows(torch.from_numpy(x), out_dtype=torch.float16)  # as the actor holds them
    a, b = z16[:4], z16[4:]
    r = correlation_block(a, b, precision)
    assert r.dtype == torch.float64 and r.shape == (4, 7)
    rows = z16.double().numpy()
    expected = np.array([[np.corrcoef(rows[i], rows[4 + j])[0, 1] for j in range(7)] for i in range(4)])
    np.testing.assert_allclose(r.numpy(), expected, atol=1e-12 if precision == "fp64" else 1e-6)
    # the rows of the 1 vs. 2 test from the activation store give the very same numbers in fp64
    if precision == "fp64":
        np.testing.assert_array_equal(
            r.numpy(), centred_gram(z16, range(4), range(4, 11), precision="fp64").correlation().numpy()
        )


def test_correlation_block_constant_rows_raise_or_turn_nan():
    from semprobe.analysis.similarity import correlation_block

    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 30))
    x[1] = 2.0  # a constant row of a
    x[5] = -3.0  # a constant row of b
    z = zscore_rows(torch.from_numpy(x))  # constant rows come out as zeros
    a, b = z[:3], z[3:]
    with pytest.raises(ZeroVarianceError) as err:
        correlation_block(a, b)
    assert err.value.rows == [1, 5]  # positions in the stacked rows: a's first
    r = correlation_block(a, b, constant="nan").numpy()
    assert np.isnan(r[1]).all() and np.isnan(r[:, 2]).all() and np.isnan(r).sum() == 4 + 3 - 1
    for i in (0, 2):
        for j in (0, 1, 3):
            assert r[i, j] == pytest.approx(np.corrcoef(x[i], x[3 + j])[0, 1], abs=1e-6)
    assert np.isnan(correlation_block(a[1:2], b, constant="nan").numpy()).all()  # nothing left to correlate
    with pytest.raises(InputError, match="unknown constant-row handling 'skip': choose raise or nan"):
        correlation_block(a, b, constant="skip")
