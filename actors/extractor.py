"""The activation extractor: one CNN on a device, returning chosen layers z-scored.

A Ray batch-inference callable: ``__init__`` loads the model once,
``__call__(batch) -> dict`` does one batch; :meth:`ActivationExtractor.correlations` runs a whole
image set and keeps only each layer's concept correlation matrix (``--store similarity``).
Writing tables is not its business.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from semprobe.actors.layers import Layer, LayerCatalog
from semprobe.actors.zoo import Preprocess, load_model
from semprobe.analysis.similarity import correlation_block, correlation_from_rows

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
    tokens : "all" or "class": how a transformer's token sequences are flattened (see ``LayerCatalog.select``)
    """

    def __init__(
        self,
        model: str,
        layers: str,
        dtype: str = "float16",
        device: str = "auto",
        threads: int | None = None,
        tokens: str = "all",
    ):
        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(model)
        self.model_name = loaded.name
        self.preprocess = loaded.preprocess
        self.catalog = LayerCatalog(loaded.module, loaded.preprocess.size)
        self.layers = self.catalog.select(layers, tokens)
        self.device = pick_device(device)
        self.dtype = TORCH_DTYPES[dtype]
        self.net = self.catalog.capture_module(self.layers, self.dtype).to(self.device).eval()
        self._nets: dict[tuple[str, ...], torch.nn.Module] = {}

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

    def _capturing(self, layers: list[Layer]) -> torch.nn.Module:
        """The model capturing only ``layers`` (built once per chunk of layers)."""
        names = tuple(layer.name for layer in layers)
        if names not in self._nets:
            self._nets[names] = self.catalog.capture_module(layers, self.dtype).to(self.device).eval()
        return self._nets[names]

    def _batches(self, pixels: np.ndarray, layers: list[Layer], batch_size: int, top: list, top_prob: list):
        """Run ``pixels`` through the network in batches of ``batch_size`` capturing only ``layers``; yield each
        batch's first row and its captured z-scored rows (one tensor per layer, on the device) and append its
        top-1 class indices and probabilities to ``top`` and ``top_prob``."""
        net = self._capturing(layers)
        for lo in range(0, len(pixels), batch_size):
            logits, captured = net(self.normalise(pixels[lo : lo + batch_size]))
            prob, index = torch.softmax(logits.float(), dim=1).max(dim=1)
            top.append(index.to(torch.int32).cpu())
            top_prob.append(prob.cpu())
            yield lo, captured

    @torch.inference_mode()
    def predict(self, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-1 class index (int32) and probability (float32) of each image, capturing no layer."""
        top, top_prob = [], []
        for _ in self._batches(pixels, [], batch_size, top, top_prob):
            pass
        return torch.cat(top).numpy(), torch.cat(top_prob).numpy()

    @torch.inference_mode()
    def correlations(
        self,
        pixels: np.ndarray,
        layers: list[Layer],
        batch_size: int,
        compute: str = "float32",
        block_values: int | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Each of ``layers``' (w, w) Pearson r between the w images of ``pixels``, computed on the device.

        The images go through the network in batches of ``batch_size``, capturing only ``layers``;
        each layer's z-scored rows of all w images stay resident on the device (w x d in the
        extractor's dtype, as the activation store would hold them); at the end one Gram code path
        (:func:`semprobe.analysis.similarity.correlation_from_rows`) turns them into correlations.

        Parameters
        ----------
        pixels : (w, size, size, 3) uint8, one image per row (concept) of the matrices
        layers : a chunk of this extractor's layers
        batch_size : images per forward pass
        compute : precision of the Gram product of each feature chunk (sums in float64)
        block_values : at most this many values (w x features) per feature chunk of the Gram

        Returns
        -------
        matrices : layer name -> (w, w) float32; a zero-variance row and column are NaN
        predicted_index : (w,) int32, predicted_prob : (w,) float32
        """
        w = len(pixels)
        rows = [torch.empty((w, layer.dim), dtype=self.dtype, device=self.device) for layer in layers]
        top, top_prob = [], []
        for lo, captured in self._batches(pixels, layers, batch_size, top, top_prob):
            for held, values in zip(rows, captured):
                held[lo : lo + len(values)] = values
        matrices = {}
        for layer, held in zip(layers, rows):
            block = max(1, (block_values or held.numel()) // max(w, 1))
            r = correlation_from_rows(held, compute, block=block, constant="nan")
            matrices[layer.name] = r.to(torch.float32).cpu().numpy()
        return matrices, torch.cat(top).numpy(), torch.cat(top_prob).numpy()

    @torch.inference_mode()
    def reference_correlations(
        self, pixels: np.ndarray, n_references: int, layers: list[Layer], batch_size: int
    ) -> dict[str, np.ndarray]:
        """Each of ``layers``' Pearson r of every image after the first ``n_references`` with each of those
        reference images, computed on the device (``semprobe misclassified --store similarity``).

        The references go through the network first and their z-scored rows stay resident on the device
        (n_references x d per layer, in the extractor's dtype, as the activation store would hold them); the
        other images then follow in batches of ``batch_size``, each batch's rows correlated with the
        references' in float64 (:func:`semprobe.analysis.similarity.correlation_block`, the 1 vs. 2 test's
        product) and let go, so the resident memory does not grow with the number of images.

        Returns
        -------
        layer name -> (len(pixels) - n_references, n_references) float64; NaN in the row (column) of an image
        (reference) whose layer output is constant.
        """
        n = len(pixels) - n_references
        if not n_references or not n:
            return {layer.name: np.zeros((max(n, 0), n_references)) for layer in layers}
        resident = [torch.empty((n_references, layer.dim), dtype=self.dtype, device=self.device) for layer in layers]
        top, top_prob = [], []  # the top-1 is the predictions pass's business
        for lo, captured in self._batches(pixels[:n_references], layers, batch_size, top, top_prob):
            for held, values in zip(resident, captured):
                held[lo : lo + len(values)] = values
        blocks: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
        for _, captured in self._batches(pixels[n_references:], layers, batch_size, top, top_prob):
            for layer, values, references in zip(layers, captured, resident):
                blocks[layer.name].append(correlation_block(values, references, "fp64", constant="nan").cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in blocks.items()}


def memory_budget(device: str = "auto", share: float = 1.0) -> int:
    """Bytes the resident rows of ``--store similarity`` may take on ``device`` by default: half the free
    memory of a GPU (``torch.cuda.mem_get_info``), a quarter of the node's available RAM on the CPU
    (``MemAvailable``), times ``share`` (the fraction of the device one actor has). The rest is for the
    model, its forward pass and the Gram's temporaries."""
    dev = pick_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.5 * share)
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # not Linux: physical pages not in use
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * 0.25 * share)
