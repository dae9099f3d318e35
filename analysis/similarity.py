"""Similarity structure of representations: z-scored rows whose Gram product is Pearson r."""

from __future__ import annotations

import torch

# A row whose standard deviation is below this fraction of its mean is constant to
# float32 precision: its "z-scores" would be rounding noise blown up to norm 1.
RELATIVE_STD_FLOOR = 1e-6


def zscore_rows(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre each row and scale it to unit L2 norm, so that ``z @ z.T`` is Pearson r.

    Parameters
    ----------
    x : Tensor, (n, ...) any real dtype
        One row per item (image); trailing dimensions are flattened.
    out_dtype : torch.dtype
        dtype of the result; the statistics and the scaling are computed in
        float32 (float64 for float64 input), then cast.

    Returns
    -------
    Tensor, (n, d) out_dtype, a new tensor (never a view of x)
        Row i has mean 0 and L2 norm 1. A zero-variance row has no defined
        correlation with anything and comes back as all zeros (norm 0), which
        every consumer of these rows rejects by name.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # oneDNN and cuDNN often run convolutions channels-last. Mean and norm do not
        # depend on the order of the features, so normalise in memory order and put
        # the features back in (C, H, W) order during the final cast: one copy, not two.
        n, c, h, w = x.shape
        z = zscore_rows(x.permute(0, 2, 3, 1), out_dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
        return z.view(n, h, w, c).permute(0, 3, 1, 2).to(out_dtype, memory_format=torch.contiguous_format).view(n, -1)
    rows = x.reshape(x.shape[0], -1)
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    d = rows.shape[1]
    # One fused pass for mean, variance and the scaling: layer_norm over the whole
    # row, with a constant weight that turns unit variance into unit L2 norm.
    weight = torch.full((d,), d**-0.5, dtype=rows.dtype, device=rows.device)
    z, mean, rstd = torch.native_layer_norm(rows, (d,), weight, None, 0.0)
    constant = ~torch.isfinite(rstd) | (rstd * mean.abs() > 1 / RELATIVE_STD_FLOOR)
    if constant.any():
        z = z.masked_fill(constant.view(-1, 1), 0.0)
    return z if z.dtype == out_dtype else z.to(out_dtype)
