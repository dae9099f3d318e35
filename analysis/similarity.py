"""Similarity structure of representations: z-scored rows whose Gram product is Pearson r."""

from __future__ import annotations

import torch


def zscore_rows(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre each row and scale it to unit L2 norm, so that ``z @ z.T`` is Pearson r.

    Parameters
    ----------
    x : Tensor, (n, ...) any real dtype
        One row per item (image); trailing dimensions are flattened.
    out_dtype : torch.dtype
        dtype of the result; the statistics are always computed in float32 or
        better (float64 input stays float64), then cast.

    Returns
    -------
    Tensor, (n, d) out_dtype
        Row i has mean 0 and L2 norm 1. A zero-variance row has no defined
        correlation with anything and comes back as all zeros (norm 0), which
        every consumer of these rows rejects by name.
    """
    rows = x.reshape(x.shape[0], -1)
    work = rows.double() if rows.dtype == torch.float64 else rows.float()
    # A fresh tensor: the caller's x may be a layer output that an in-place op
    # (ReLU(inplace=True), +=) overwrites right after we read it.
    centred = work - work.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return (centred * scale).to(out_dtype)
