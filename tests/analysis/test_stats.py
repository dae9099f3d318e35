import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from semprobe.analysis.stats import bhy_reach, permutation_p_value, permutation_tests


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


def test_bhy_reach_against_a_hand_computation():
    # m = 500 tests of 1000 permutations at alpha 0.05 (an NN2021-scale family): c(500) = H_500 = 6.79282342...
    reach = bhy_reach(500, 1000, 0.05)
    c_m = 6.79282342999052
    assert reach.first_threshold == pytest.approx(0.05 / (500 * c_m), rel=1e-12)  # 1.4722e-5
    assert reach.min_p == 1 / 1001
    # rejecting k tests at p = 1/1001 needs 1/1001 <= k 0.05 / (500 c_m): k >= 500 c_m / (1001 0.05) = 67.86
    assert reach.needed == 68 and not reach.lone_test_can_be_rejected and reach.can_reject
    # a lone test needs 1 / (P + 1) <= 1.4722e-5: P >= 67927.2, so 67928 permutations
    assert reach.permutations_for_a_lone_test == 67928
    assert bhy_reach(500, 67928, 0.05).needed == 1 and bhy_reach(500, 67927, 0.05).needed == 2
    # 16 layers (the embedded default): c(16) = 3.3807; k >= 16 * 3.3807 / (1001 * 0.05) = 1.08, so 2
    assert bhy_reach(16, 1000, 0.05).needed == 2 and bhy_reach(16, 1000, 0.1).needed == 1
    # nothing can be rejected when even m tests at 1/(P+1) stay above alpha / c(m): 1/41 > 0.05 / c(4) = 0.024
    assert bhy_reach(4, 40, 0.05).needed is None and not bhy_reach(4, 40, 0.05).can_reject
    assert bhy_reach(4, 40, 0.06).needed == 4  # 1/41 = 0.0244 <= 0.06 / 2.0833 = 0.0288


@pytest.mark.parametrize("m, n_perm, alpha", [(500, 1000, 0.05), (16, 1000, 0.05), (30, 200, 0.1), (7, 99, 0.05)])
def test_bhy_reach_is_what_statsmodels_rejects(m, n_perm, alpha):
    """`needed` tests at the smallest p (the others at 1) are rejected by BHY; one fewer, none is."""
    reach = bhy_reach(m, n_perm, alpha)
    p_min = 1 / (n_perm + 1)
    for k in range(1, m + 1):
        p = np.array([p_min] * k + [1.0] * (m - k))
        assert multipletests(p, alpha=alpha, method="fdr_by")[0].any() == (
            reach.needed is not None and k >= reach.needed
        )
