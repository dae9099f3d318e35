"""The feature encoder: several CNNs on one device, each giving the features its classifier sees.

For the affine maps between CNNs (McNeely-White 2020): F(x) is the input of a
CNN's final linear classifier C (the pooled output of its last convolutional
stage), so ``C(F(x))`` are its logits. Each image is decoded once per distinct
input size; every model runs on every image of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from semprobe.actors.extractor import normalise, pick_device
from semprobe.actors.zoo import LoadedModel, Preprocess, load_model
from semprobe.analysis.errors import InputError


def final_linear(loaded: LoadedModel) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` producing the class logits."""
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear) and m.out_features == loaded.num_classes]
    if not linears:
        raise InputError(
            f"{loaded.name} has no final linear classifier with {loaded.num_classes} outputs: "
            "the affine maps need one (features -> logits)"
        )
    return linears[-1]


class FeatureEncoder:
    """Run every model on decoded images; return each one's penultimate features and top-1 class.

    Parameters
    ----------
    models : model strings (see :mod:`semprobe.actors.zoo`)
    device : "auto" (CUDA when present), "cpu", ...
    threads : torch intra-op threads on the CPU (None: leave torch's choice)
    """

    def __init__(self, models: Sequence[str], device: str = "auto", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.loaded = [load_model(m) for m in models]
        if len({m.num_classes for m in self.loaded}) > 1:
            raise InputError(
                "the models classify different label sets: "
                + ", ".join(f"{m.name} {m.num_classes}" for m in self.loaded)
            )
        self.classifiers = [final_linear(m) for m in self.loaded]
        self._captured: list[torch.Tensor | None] = [None] * len(self.loaded)
        for i, (m, fc) in enumerate(zip(self.loaded, self.classifiers)):
            m.module.to(self.device).eval()
            fc.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def capture(module, inputs, output):
            self._captured[i] = inputs[0].flatten(1)

        return capture

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.loaded]

    @property
    def preprocesses(self) -> list[Preprocess]:
        return [m.preprocess for m in self.loaded]

    @property
    def widths(self) -> list[int]:
        return [fc.in_features for fc in self.classifiers]

    def classifier(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Model i's classifier weights (classes, features) and bias (classes,), float64."""
        fc = self.classifiers[i]
        bias = fc.bias.detach() if fc.bias is not None else torch.zeros(fc.out_features)
        return fc.weight.detach().double().cpu().numpy(), bias.double().cpu().numpy()

    @torch.inference_mode()
    def __call__(self, pixels: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """pixels[i]: (n, h, w, 3) uint8 decoded for model i. Returns features (n, d_i) float32 and top-1 (n,)."""
        features, top1 = [], []
        for i, (m, x) in enumerate(zip(self.loaded, pixels)):
            logits = m.module(normalise(x, m.preprocess, self.device))
            features.append(self._captured[i].float().cpu().numpy())
            top1.append(logits.argmax(1).cpu().numpy())
        return features, top1
