"""Significance: permutation p-values and Benjamini-Hochberg-Yekutieli correction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from statsmodels.stats.multitest import multipletests

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
    p = np.asarray(p_values, np.float64)
    if p.size == 0:
        return np.zeros(0, bool), np.zeros(0)
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="fdr_by")
    return reject, adjusted


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
