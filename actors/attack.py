"""Targeted adversarial examples: the Momentum Iterative Method (Dong et al. 2018) on foolbox.

foolbox 3.3.4's ``LinfMomentumIterativeFastGradientMethod`` takes the sign of
the gradient before accumulating momentum. Dong et al. (and cleverhans)
accumulate the gradient divided by its mean absolute value per image and take
the sign of the accumulated momentum only for the step:

    g = grad / mean(|grad|);  m = mu m + g;  x = clip(x -+ step sign(m))

(minus for a targeted attack, which descends the cross-entropy of the target),
then projection onto the L-inf ball of radius eps and the input bounds.
"""

from __future__ import annotations

import math

import eagerpy as ep
import foolbox
import numpy as np
import torch
from foolbox.attacks.gradient_descent_base import LinfBaseGradientDescent, Optimizer

from semprobe.actors.extractor import pick_device
from semprobe.actors.zoo import LoadedModel, load_model
from semprobe.analysis.errors import InputError

# The input spaces an attack's eps can be measured in, and their bounds.
SPACES = {"[0,1]": (0.0, 1.0), "[-1,1]": (-1.0, 1.0)}


class _MomentumSign(Optimizer):
    """Accumulate the (already normalised) gradient with decay ``momentum``; step by the sign of the sum."""

    def __init__(self, x: ep.Tensor, stepsize: float, momentum: float):
        self.stepsize, self.momentum = stepsize, momentum
        self.accumulated = ep.zeros_like(x)

    def __call__(self, gradient: ep.Tensor) -> ep.Tensor:
        self.accumulated = self.momentum * self.accumulated + gradient
        return self.stepsize * self.accumulated.sign()


class MomentumIterativeMethod(LinfBaseGradientDescent):
    """Dong et al.'s MIM as a foolbox attack: pass ``abs_stepsize`` (the step) and ``epsilon`` to ``attack(...)``."""

    def __init__(
        self,
        *,
        momentum: float = 1.0,
        rel_stepsize: float = 0.2,
        abs_stepsize: float | None = None,
        steps: int = 20,
        random_start: bool = False,
    ):
        super().__init__(rel_stepsize=rel_stepsize, abs_stepsize=abs_stepsize, steps=steps, random_start=random_start)
        self.momentum = momentum

    def normalize(self, gradients: ep.Tensor, *, x: ep.Tensor, bounds) -> ep.Tensor:
        mean_abs = gradients.abs().mean(axis=tuple(range(1, gradients.ndim)), keepdims=True)
        return gradients / ep.maximum(mean_abs, 1e-12)

    def get_optimizer(self, x: ep.Tensor, stepsize: float) -> Optimizer:
        return _MomentumSign(x, stepsize, self.momentum)


def foolbox_model(loaded: LoadedModel, space: str, device=None) -> foolbox.PyTorchModel:
    """The model with inputs in ``space`` ("[0,1]" or "[-1,1]", RGB, NCHW), so that eps is measured there.

    The model's own normalisation, ``(x01 - mean) / std``, becomes foolbox
    preprocessing expressed in that space.
    """
    if space not in SPACES:
        raise InputError(f"unknown input space '{space}': choose one of {', '.join(SPACES)}")
    low, high = SPACES[space]
    scale = high - low  # x = low + scale * x01
    pre = loaded.preprocess
    mean = [low + scale * m for m in pre.mean]
    std = [scale * s for s in pre.std]
    # eagerpy's gradient calls loss.backward(), which would also fill every weight's .grad: only the input's is needed
    loaded.module.requires_grad_(False)
    return foolbox.PyTorchModel(
        loaded.module.eval(), bounds=(low, high), device=device, preprocessing={"mean": mean, "std": std, "axis": -3}
    )


class TargetedAttacker:
    """One CNN on a device and the MIM attack on it: 8-bit images and target classes in, 8-bit adversarial images out.

    The attack runs in ``space``; its result is put back on the 8-bit grid the
    images are stored on (rounded, then clipped into the eps ball, so the stored
    perturbation never exceeds eps), and success is judged on that stored image.

    Parameters
    ----------
    model : a model string (see :mod:`semprobe.actors.zoo`)
    space : "[0,1]" or "[-1,1]", where ``eps`` and ``step`` are measured
    eps, step, steps, momentum : the attack's L-inf radius, step size, iterations and decay
    """

    def __init__(
        self,
        model: str,
        space: str,
        eps: float,
        step: float,
        steps: int,
        momentum: float,
        device: str = "auto",
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(model)
        self.model_name, self.preprocess = loaded.name, loaded.preprocess
        self.device = pick_device(device)
        self.fmodel = foolbox_model(loaded, space, device=self.device)
        self.low, high = SPACES[space]
        self.scale = high - self.low
        self.eps = eps
        self.levels = math.floor(eps / self.scale * 255 + 1e-9)  # the eps ball on the 8-bit grid
        self.attack = MomentumIterativeMethod(momentum=momentum, abs_stepsize=step, steps=steps)

    def to_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) float pixel values 0..255 -> the attack's space."""
        return self.low + pixels * (self.scale / 255)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.fmodel(x).argmax(1).cpu().numpy()

    def __call__(self, pixels: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Attack a batch.

        Parameters
        ----------
        pixels : (n, size, size, 3) uint8 RGB, the model's input geometry
        targets : (n,) int, the target class of each image

        Returns
        -------
        dict: "clean_predicted" (n,) int, "adversarial" (n, size, size, 3) uint8,
        "predicted" (n,) int (on the 8-bit adversarial image), "linf" (n,) float
        (the perturbation's L-inf norm in the attack's space)
        """
        p = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float()
        x0 = self.to_space(p)
        target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=self.device)
        _, adv, _ = self.attack(self.fmodel, x0, foolbox.criteria.TargetedMisclassification(target), epsilons=self.eps)
        q = torch.round((adv - self.low) * (255 / self.scale))
        q = torch.minimum(torch.maximum(q, p - self.levels), p + self.levels).clamp(0, 255)
        return {
            "clean_predicted": self.predict(x0),
            "adversarial": q.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy(),
            "predicted": self.predict(self.to_space(q)),
            "linf": ((q - p).abs().amax(dim=(1, 2, 3)) * (self.scale / 255)).cpu().numpy(),
        }
