"""Significance: permutation p-values and Benjamini-Hochberg-Yekutieli correction."""

from __future__ import annotations

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
