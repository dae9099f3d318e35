"""Significance: permutation p-values and Benjamini-Hochberg-Yekutieli correction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Accuracies are counts over pairs (at least 1 / (K n_pairs) apart); this absorbs
# the last-bit difference between two ways of averaging the same counts.
ACCURACY_TIE = 1e-12


def permutation_p_value(null: np.ndarray, observed: float) -> float:
    """(1 + #{null >= observed}) / (1 + n_perm): never 0, exact for a seeded null."""
    null = np.asarray(null, np.float64)
    return float((1 + np.count_nonzero(null >= observed - ACCURACY_TIE)) / (1 + null.size))


def bhy(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg-Yekutieli FDR control over one family of tests.

    Returns (significant, adjusted p) from
    ``statsmodels.stats.multitest.multipletests(method="fdr_by")``, which holds
    under any dependence between the tests (the layers of one CNN are far from
    independent).
    """
    # statsmodels (and the polars and pandas it pulls in) is imported here, by the reducer that corrects a family,
    # not by every Ray worker whose task module imports this one for the permutation p-value.
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, np.float64)
    if p.size == 0:
        return np.zeros(0, bool), np.zeros(0)
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="fdr_by")
    return reject, adjusted


@dataclass(frozen=True)
class BhyReach:
    """What BHY at ``alpha`` can reject in a family of ``m`` tests whose p-values come from ``n_perm`` permutations.

    With n_perm permutations the smallest p-value is ``min_p = 1 / (n_perm + 1)``; BHY's k-th threshold is
    ``k alpha / (m c(m))``, ``c(m) = 1 + 1/2 + ... + 1/m``, and it rejects the k smallest p-values when the
    k-th is at most its threshold.
    """

    m: int
    n_perm: int
    alpha: float
    first_threshold: float  # alpha / (m c(m)): the p a lone test must reach
    min_p: float  # 1 / (n_perm + 1)
    needed: int | None  # the fewest tests at min_p for BHY to reject any (1: a lone test can); None: not even all m

    @property
    def lone_test_can_be_rejected(self) -> bool:
        return self.needed == 1

    @property
    def can_reject(self) -> bool:
        return self.needed is not None

    @property
    def permutations_for_a_lone_test(self) -> int:
        """The fewest permutations whose minimal p, 1 / (n_perm + 1), passes the first threshold."""
        n = max(0, int(np.ceil(1 / self.first_threshold)) - 2)  # one below: the float quotient may round up
        while 1 / (n + 1) > self.first_threshold:
            n += 1
        return n


def bhy_reach(m: int, n_perm: int, alpha: float) -> BhyReach:
    """Whether BHY at ``alpha`` over ``m`` permutation tests of ``n_perm`` permutations can reject anything.

    The thresholds are those of ``multipletests(method="fdr_by")`` (``k / m / c(m) * alpha``, in that order),
    so ``needed`` is exact: ``needed`` p-values at ``min_p`` (and the rest anywhere) are rejected, one fewer
    and none is. E.g. m = 500 tests of 1000 permutations at alpha 0.05: c(m) = 6.793, the first threshold
    1.47e-5 lies far below min_p = 1/1001, and 68 tests must reach min_p before BHY rejects any.
    """
    if m < 1 or n_perm < 1:
        raise ValueError(f"BHY reach needs m >= 1 tests and n_perm >= 1 permutations, got {m} and {n_perm}")
    c_m = float(np.sum(1.0 / np.arange(1, m + 1)))
    thresholds = np.arange(1, m + 1) / m / c_m * alpha
    min_p = 1 / (n_perm + 1)
    reached = np.flatnonzero(min_p <= thresholds)
    needed = int(reached[0]) + 1 if reached.size else None
    return BhyReach(m, n_perm, alpha, float(thresholds[0]), min_p, needed)


@dataclass(frozen=True)
class PermutationTests:
    """m observed scores against their permutation nulls, BHY-corrected as one family; every field is (m,)."""

    null_mean: np.ndarray  # float64
    null_std: np.ndarray  # float64, population std (ddof 0) of the null
    p_value: np.ndarray  # float64, as permutation_p_value
    p_bhy: np.ndarray  # float64, BHY-adjusted over the m tests
    significant: np.ndarray  # bool, the BHY decision at alpha


def permutation_tests(observed, nulls, alpha: float = 0.05) -> PermutationTests:
    """Summarise m tests' nulls, their permutation p-values, and BHY over the m of them as one family.

    Parameters
    ----------
    observed : array-like, (m,) float
        Each test's observed score (an accuracy).
    nulls : array-like, (m, n_perm) float, n_perm >= 1
        Row i: test i's scores under the permutations.
    alpha : float
        The false discovery rate BHY controls.

    Returns
    -------
    PermutationTests
        null mean and std of each row, ``p_value[i] = permutation_p_value(nulls[i], observed[i])``, and
        ``significant, p_bhy = bhy(p_value, alpha)``.
    """
    observed = np.asarray(observed, np.float64)
    nulls = np.asarray(nulls, np.float64)
    if nulls.ndim != 2 or nulls.shape[0] != observed.size or nulls.shape[1] == 0:
        raise ValueError(
            f"permutation tests need (m,) observed and (m, n_perm >= 1) nulls, got {observed.shape} and {nulls.shape}"
        )
    exceed = np.count_nonzero(nulls >= observed[:, None] - ACCURACY_TIE, axis=1)
    p_value = (1 + exceed) / (1 + nulls.shape[1])
    significant, p_bhy = bhy(p_value, alpha)
    return PermutationTests(nulls.mean(axis=1), nulls.std(axis=1), p_value, p_bhy, significant)
