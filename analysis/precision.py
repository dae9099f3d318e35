"""Precision of the statistics' products, and the floating-point error bounds that make fp32 decisions exact.

``--precision fp64`` computes in float64. ``--precision fp32`` computes the large products in float32 (on a
GPU, TF32 tensor cores: inputs rounded to 10 mantissa bits, accumulation in float32) and then recomputes in
float64 every decision that the float32 result cannot settle: a test statistic ``m`` passes iff
``m > threshold``, and when ``|m32 - threshold| <= E32 + E64`` (the proven bounds on the float32 and the
float64 evaluation's errors against exact arithmetic on the same inputs) the float64 value decides. Outside
that band the float32 and float64 values lie on the same side of the threshold as the exact one, so every
decision equals fp64's.

The bounds are the standard ones (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma
3.1 and Eq. 3.5): with unit roundoff ``u``, a computation whose every path goes through at most ``k``
roundings has a relative error of at most ``gamma(k) = k u / (1 - k u)``, and a dot product of length ``n``
computed in any order errs by at most ``gamma(n) sum |x_i y_i|``. TF32 first rounds each input to
``u_in = 2**-11``, after which the products are exact in float32 and the sum errs as above: ``(2 u_in +
u_in**2 + gamma(n)) sum |x_i y_i|``.
"""

from __future__ import annotations

import torch

from semprobe.analysis.errors import InputError

PRECISIONS = ("fp64", "fp32")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
TF32_INPUT_ROUNDOFF = 2.0**-11  # TF32 keeps 10 explicit mantissa bits, rounded to nearest


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; InputError naming the choices otherwise."""
    if precision not in DTYPES:
        raise InputError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u) for the unit roundoff u of ``dtype``."""
    ku = k * UNIT_ROUNDOFF[dtype]
    if ku >= 1:
        raise InputError(f"no error bound for {k} roundings in {dtype}: k u = {ku:g} >= 1")
    return ku / (1 - ku)


def matmul_error_factor(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """``c`` such that every entry of a computed (., n) @ (n, .) product errs by at most ``c sum_k |x_k y_k|``.

    A float32 product on a CUDA device may run on TF32 tensor cores (``torch.backends.cuda.matmul`` allows it
    for the fp32 statistics), whose inputs are rounded to 2**-11 first: the bound assumes that there, and
    plain float32 on any other device. A bound that is too large only rechecks more pairs in float64.
    """
    base = gamma(n, dtype)
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        u_in = TF32_INPUT_ROUNDOFF
        return 2 * u_in + u_in * u_in + base
    return base
