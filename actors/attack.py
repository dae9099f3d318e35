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

from typing import Optional

import eagerpy as ep
import foolbox
from foolbox.attacks.gradient_descent_base import LinfBaseGradientDescent, Optimizer

from actors.zoo import LoadedModel
from analysis.errors import InputError

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

    def __init__(self, *, momentum: float = 1.0, rel_stepsize: float = 0.2, abs_stepsize: Optional[float] = None,
                 steps: int = 20, random_start: bool = False):
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
    return foolbox.PyTorchModel(loaded.module.eval(), bounds=(low, high), device=device,
                                preprocessing={"mean": mean, "std": std, "axis": -3})
