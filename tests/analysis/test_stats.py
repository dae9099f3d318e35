import numpy as np
import pytest

from semprobe.analysis.stats import permutation_p_value, permutation_tests


def naive_bhy(p, alpha):
    """Benjamini-Yekutieli step-up by hand: p_(i) m c(m) / i, made monotone from the largest down, capped at 1."""
    m = len(p)
    c = sum(1 / k for k in range(1, m + 1))
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m * c / rank)
        adjusted[i] = running
    return adjusted, [a <= alpha for a in adjusted]


def test_permutation_tests_match_a_loop_over_the_tests():
    rng = np.random.default_rng(7)
    m, n_perm = 12, 400
    nulls = rng.integers(0, 20, size=(m, n_perm)) / 20  # accuracies are fractions: ties with the observed happen
    observed = np.concatenate([[0.95, 1.0, 1.0, 0.975], rng.integers(0, 20, size=m - 4) / 20])
    tests = permutation_tests(observed, nulls, alpha=0.1)
    for field in ("null_mean", "null_std", "p_value", "p_bhy", "significant"):
        assert getattr(tests, field).shape == (m,)
    assert tests.significant.dtype == bool
    for i in range(m):
        null = list(nulls[i])
        mean = sum(null) / n_perm
        assert tests.null_mean[i] == pytest.approx(mean, abs=1e-15)
        assert tests.null_std[i] == pytest.approx(np.sqrt(sum((x - mean) ** 2 for x in null) / n_perm), abs=1e-15)
        assert tests.p_value[i] == (1 + sum(x >= observed[i] for x in null)) / (1 + n_perm)
        assert tests.p_value[i] == permutation_p_value(nulls[i], observed[i])
    adjusted, significant = naive_bhy(list(tests.p_value), 0.1)
    np.testing.assert_allclose(tests.p_bhy, adjusted, rtol=1e-12)
    assert list(tests.significant) == significant and 0 < sum(significant) < m
    assert tests.p_value[1] == 1 / (1 + n_perm)  # nothing in the null reaches 1.0


def test_permutation_tests_need_a_null_per_test():
    with pytest.raises(ValueError, match=r"\(m, n_perm >= 1\) nulls"):
        permutation_tests([0.5, 0.6], np.zeros((2, 0)))
    with pytest.raises(ValueError, match="got \\(3,\\) and \\(2, 5\\)"):
        permutation_tests([0.5, 0.6, 0.7], np.zeros((2, 5)))
