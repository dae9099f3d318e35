import pytest
import torch
import torchvision

from semprobe.actors.layers import LayerCatalog
from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import zscore_rows


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def resnet_catalog(resnet50):
    return LayerCatalog(resnet50, 64)


def test_resnet50_counts(resnet_catalog):
    kinds = resnet_catalog.kinds
    # 1 stem ReLU + 16 bottlenecks x 3 applications of the same in-place ReLU module
    assert len(kinds["activations"]) == 49
    assert kinds["activations"][:4] == ["relu", "layer1.0.relu", "layer1.0.relu_1", "layer1.0.relu_2"]
    assert len(kinds["blocks"]) == 16
    assert kinds["blocks"][0] == "layer1.0.relu_2"
    assert kinds["pool"] == ["avgpool"]
    assert kinds["logits"] == ["fc"]
    assert kinds["concat"] == []


def test_inception_v3_counts():
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    kinds = LayerCatalog(model, 299).kinds
    assert len(kinds["activations"]) == 94  # one functional F.relu per BasicConv2d
    assert len(kinds["concat"]) == 15  # Keras' mixed0..mixed10 plus the four inner E-block concatenations
    assert len(kinds["blocks"]) == 11
    assert kinds["blocks"][0] == "Mixed_5b.cat"


def test_vgg16_counts():
    kinds = LayerCatalog(torchvision.models.vgg16(weights=None), 64).kinds
    assert len(kinds["activations"]) == 15  # 13 conv + 2 fc
    assert kinds["activations"][-2:] == ["classifier.1", "classifier.4"]


def test_select_orders_and_numbers_layers(resnet_catalog):
    layers = resnet_catalog.select("logits,pool,layer2.0,relu")
    assert [(layer.name, layer.layer_index, layer.kind) for layer in layers] == [
        ("relu", 0, "node"),
        ("layer2.0.relu_2", 1, "node"),
        ("avgpool", 2, "pool"),
        ("fc", 3, "logits"),
    ]
    assert layers[1].shape == (512, 8, 8)
    assert layers[2].dim == 2048


def test_select_unknown_layer_names_it(resnet_catalog):
    with pytest.raises(InputError, match=r"unknown layer 'layer1.0.rleu'.*did you mean layer1.0.relu"):
        resnet_catalog.select("activations,layer1.0.rleu")


def test_deepest_kind_is_refused_for_other_models(resnet_catalog):
    with pytest.raises(InputError) as err:
        resnet_catalog.select("deepest,logits")
    assert str(err.value) == (
        "layer kind 'deepest' (the deepest column of Dharmaretnam et al.'s FractalNet analysis) needs a FractalNet, "
        "not ResNet: choose kinds activations, concat, blocks, pool, logits or node names"
    )


def test_capture_is_true_output_despite_inplace_relu(resnet50, resnet_catalog):
    """bn1's output is overwritten by the in-place ReLU right after it; the capture must predate that."""
    names = ["layer1.0.bn1", "layer1.0.relu", "layer1.0.relu_1", "layer1.0.bn3", "layer1.0.relu_2", "avgpool"]
    layers = resnet_catalog.select(names)
    capture = resnet_catalog.capture_module(layers)
    x = torch.randn(3, 3, 64, 64)
    block = resnet50.layer1[0]
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: a hook's return value would replace the output
            seen.setdefault(name, output.clone())

        return hook

    hooks = [
        block.bn1.register_forward_hook(keep("layer1.0.bn1")),
        block.bn3.register_forward_hook(keep("layer1.0.bn3")),
        resnet50.avgpool.register_forward_hook(keep("avgpool")),
    ]
    with torch.no_grad():
        reference_logits = resnet50(x)
        logits, captured = capture(x)
    for h in hooks:
        h.remove()
    ref_bn1 = seen["layer1.0.bn1"]
    assert (ref_bn1 < 0).any()  # the pre-activation has negatives that an in-place ReLU would erase
    expected = {
        "layer1.0.bn1": ref_bn1,
        "layer1.0.relu": ref_bn1.relu(),
        "layer1.0.bn3": seen["layer1.0.bn3"],
        "avgpool": seen["avgpool"],
    }
    by_name = dict(zip(names, captured))
    for name, ref in expected.items():
        torch.testing.assert_close(by_name[name], zscore_rows(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, reference_logits)
