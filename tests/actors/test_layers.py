import pytest
import torch
import torchvision
import torchvision.models.inception as tv_inception

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import untrained
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
    assert len(kinds["mixed"]) == 11
    assert kinds["pixels"] == ["pixels"] and kinds["softmax"] == ["softmax"]


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """The reference: each image's values flattened, centred, scaled to unit L2 norm."""
    rows = x.flatten(1).double()
    rows = rows - rows.mean(dim=1, keepdim=True)
    return (rows / rows.norm(dim=1, keepdim=True)).float()


def test_inception_v3_mixed_are_the_11_inception_modules_outputs():
    """Keras' mixed0..mixed10: the outputs of InceptionA x3, B, C x4, D, E x2, not the concatenations inside E.
    transform_input=True (as the pretrained model): ``pixels`` is the tensor the model receives, before it."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    model.eval()
    catalog = LayerCatalog(model, 96)
    assert len(catalog.kinds["activations"]) == 94
    blocks = (tv_inception.InceptionA, tv_inception.InceptionB, tv_inception.InceptionC, tv_inception.InceptionD,
              tv_inception.InceptionE)  # fmt: skip
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, blocks)]
    counts = {cls.__name__: sum(isinstance(m, cls) for _, m in modules) for cls in blocks}
    assert counts == {"InceptionA": 3, "InceptionB": 1, "InceptionC": 4, "InceptionD": 1, "InceptionE": 2}
    layers = catalog.select("pixels,mixed,softmax")
    assert [layer.kind for layer in layers] == ["pixels"] + ["mixed"] * 11 + ["softmax"]
    assert [layer.name.rpartition(".")[0] for layer in layers[1:-1]] == [name for name, _ in modules]
    assert [layer.name for layer in layers if layer.name.startswith("Mixed_7")] == [
        "Mixed_7a.cat", "Mixed_7b.cat_2", "Mixed_7c.cat_2"
    ]  # fmt: skip
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o)) for name, m in modules]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        reference_logits = model(x)
        logits, captured = catalog.capture_module(layers)(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(captured[0], _zscore(x), rtol=1e-5, atol=1e-6)
    for (name, _), rows in zip(modules, captured[1:-1]):
        assert rows.shape == (2, seen[name][0].numel())
        torch.testing.assert_close(rows, _zscore(seen[name]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference_logits)
    torch.testing.assert_close(captured[-1], _zscore(torch.softmax(reference_logits, dim=1)), rtol=1e-4, atol=1e-6)


def test_vgg16_counts():
    kinds = LayerCatalog(torchvision.models.vgg16(weights=None), 64).kinds
    assert len(kinds["activations"]) == 15  # 13 conv + 2 fc
    assert kinds["activations"][-2:] == ["classifier.1", "classifier.4"]
    assert kinds["mixed"] == kinds["concat"] == []


def test_pixels_and_softmax_rows_and_order(resnet50, resnet_catalog):
    """NAACL's VGG-16 setup, pixels,activations,softmax: the input first, the softmax after the logits."""
    layers = resnet_catalog.select("softmax,logits,activations,pixels")
    assert [layer.name for layer in layers[:2]] == ["pixels", "relu"]
    assert [(layer.name, layer.kind) for layer in layers[-2:]] == [("fc", "logits"), ("softmax", "softmax")]
    assert len(layers) == 1 + 49 + 2
    assert (layers[0].shape, layers[-1].shape) == ((3, 64, 64), (1000,))
    assert [layer.layer_index for layer in layers] == list(range(len(layers)))
    picked = [layers[0], layers[-1]]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference_logits = resnet50(x)
        logits, (pixels, softmax) = resnet_catalog.capture_module(picked)(x)
    torch.testing.assert_close(logits, reference_logits)  # the model is unchanged: its output is the logits
    torch.testing.assert_close(pixels, _zscore(x), rtol=1e-5, atol=1e-6)
    probs = torch.softmax(reference_logits, dim=1)
    torch.testing.assert_close(softmax, _zscore(probs), rtol=1e-4, atol=1e-6)
    assert pixels.shape == (3, 3 * 64 * 64) and softmax.shape == (3, 1000)
    # by name too: both are layer names as well as kinds
    assert [layer.kind for layer in resnet_catalog.select("pixels,softmax")] == ["pixels", "softmax"]


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
        "not ResNet: choose kinds pixels, activations, concat, mixed, blocks, pool, logits, softmax or node names"
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


def test_googlenet_mixed_are_its_9_inception_modules_and_it_normalises_as_googles():
    """Inception-v1 (thesis-affine): the 9 Inception modules' concatenations (3a..5b), and the TensorFlow port's
    input re-normalisation on, as torchvision's own builder sets it for the pretrained weights."""
    loaded = untrained("torchvision:googlenet?weights=IMAGENET1K_V1")
    catalog = LayerCatalog(loaded.module, loaded.preprocess.size)
    modules = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    assert catalog.kinds["mixed"] == [f"inception{m}.cat" for m in modules]
    assert loaded.module.transform_input and loaded.module.aux1 is not None  # the state dict holds the aux heads
