import foolbox
import numpy as np
import pytest
import torch
from torch import nn

from semprobe.actors.attack import MomentumIterativeMethod, foolbox_model
from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError


def reference_mim(net, x0, target, mean, std, eps, step, steps, mu, bounds=(0, 1)):
    """Dong et al. 2018 in plain torch, targeted: normalise by mean |grad|, accumulate, step by the sign."""
    x, m = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        x_ = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(net((x_ - mean) / std), target, reduction="none").sum()
        (g,) = torch.autograd.grad(loss, x_)
        g = g / torch.clamp(g.abs().mean(dim=(1, 2, 3), keepdim=True), min=1e-12)
        m = mu * m + g
        x = x - step * m.sign()
        x = torch.clamp(x0 + torch.clamp(x - x0, -eps, eps), *bounds)
    return x


def test_mim_on_foolbox_matches_the_plain_torch_reference_to_the_pixel():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    x0 = torch.rand(6, 3, 16, 16)
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    fmodel = foolbox.PyTorchModel(
        net, bounds=(0, 1), preprocessing={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "axis": -3}
    )
    attack = MomentumIterativeMethod(momentum=1.0, abs_stepsize=0.01, steps=10)
    _, adv, _ = attack(fmodel, x0, foolbox.criteria.TargetedMisclassification(target), epsilons=0.05)
    expected = reference_mim(net, x0, target, mean, std, eps=0.05, step=0.01, steps=10, mu=1.0)
    assert torch.equal(adv, expected)
    assert (adv - x0).abs().max() <= 0.05 + 1e-7
    # foolbox's own MI-FGSM takes the sign before accumulating: a different attack
    theirs = foolbox.attacks.LinfMomentumIterativeFastGradientMethod(momentum=1.0, abs_stepsize=0.01, steps=10)
    _, other, _ = theirs(fmodel, x0, foolbox.criteria.TargetedMisclassification(target), epsilons=0.05)
    assert not torch.equal(other, expected)


def test_lite0_in_the_minus_one_one_space_sees_its_own_normalisation():
    loaded = load_model("efficientnet_lite0")
    fmodel = foolbox_model(loaded, "[-1,1]")
    x = torch.rand(1, 3, 224, 224) * 2 - 1  # [-1, 1]
    pixels = (x + 1) / 2 * 255
    with torch.no_grad():
        np.testing.assert_allclose(fmodel(x).numpy(), loaded.module((pixels - 127) / 128).numpy(), atol=1e-4)
    with pytest.raises(InputError, match="unknown input space '0,255'"):
        foolbox_model(loaded, "0,255")
