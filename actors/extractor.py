"""The activation extractor: one CNN on a device, returning chosen layers z-scored.

A Ray batch-inference callable: ``__init__`` loads the model once,
``__call__(batch) -> dict`` does one batch. Writing tables is not its business.
"""

from __future__ import annotations

import numpy as np
import torch

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import Preprocess, load_model

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )


def normalise(pixels: np.ndarray, preprocess: Preprocess, device: torch.device) -> torch.Tensor:
    """(n, h, w, 3) uint8 RGB -> (n, 3, h, w) float32 model input ``(x/255 - mean)/std`` on the device."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
    # one affine map on the raw 0..255 pixels
    return (x.permute(0, 3, 1, 2).float() - mean * 255) * (1.0 / (std * 255))


class ActivationExtractor:
    """Run ``model`` on decoded images and capture ``layers``.

    Parameters
    ----------
    model : a model string (see :mod:`semprobe.actors.zoo`)
    layers : a layer spec (see :mod:`semprobe.actors.layers`)
    dtype : "float16" or "float32", the dtype of the returned rows
    device : "auto" (CUDA when present), "cpu", "cuda:1", ...
    threads : torch intra-op threads on the CPU (None: leave torch's choice)
    """

    def __init__(
        self, model: str, layers: str, dtype: str = "float16", device: str = "auto", threads: int | None = None
    ):
        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(model)
        self.model_name = loaded.name
        self.preprocess = loaded.preprocess
        catalog = LayerCatalog(loaded.module, loaded.preprocess.size)
        self.layers = catalog.select(layers)
        self.device = pick_device(device)
        self.net = catalog.capture_module(self.layers, TORCH_DTYPES[dtype]).to(self.device).eval()

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, h, w, 3) uint8 RGB -> (n, 3, h, w) float32 model input on the device."""
        return normalise(pixels, self.preprocess, self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch.

        Parameters
        ----------
        batch : {"pixels": (n, size, size, 3) uint8, any other columns passed through}

        Returns
        -------
        dict with the pass-through columns, "predicted_index" (n,) int32,
        "predicted_prob" (n,) float32, and one (n, dim) array per layer, keyed
        by layer name.
        """
        logits, captured = self.net(self.normalise(batch["pixels"]))
        probs = torch.softmax(logits.float(), dim=1)
        top_prob, top = probs.max(dim=1)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["predicted_index"] = top.to(torch.int32).cpu().numpy()
        out["predicted_prob"] = top_prob.cpu().numpy()
        for layer, values in zip(self.layers, captured):
            out[layer.name] = values.cpu().numpy()
        return out
