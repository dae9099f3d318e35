"""Modern architectures (issue 18, section 1): blocks found generically, and a ViT's token sequences flattened."""

import numpy as np
import pytest
import timm
import torch

from semprobe.actors.layers import LayerCatalog, block_paths
from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError

# model -> (expected blocks, what a block is), each count taken from the architecture's definition
EXPECTED_BLOCKS = {
    # ViT-Ti/16 (Touvron et al. 2021, Table 1; timm depth=12): 12 transformer encoder blocks
    "timm:vit_tiny_patch16_224": (12, "transformer block (attention + MLP)"),
    # DeiT-Ti: the ViT-Ti architecture, depth 12
    "timm:deit_tiny_patch16_224": (12, "transformer block (attention + MLP)"),
    # ConvNeXt-Atto (timm): depths (2, 2, 6, 2) over its 4 stages = 12 ConvNeXt blocks
    "timm:convnext_atto": (12, "ConvNeXt block (7x7 depthwise conv + MLP, residual)"),
    # Swin-T (Liu et al. 2021, Table 7): depths (2, 2, 6, 2) = 12 Swin transformer blocks
    "timm:swin_tiny_patch4_window7_224": (12, "Swin block ((shifted) window attention + MLP)"),
    # RegNetY-200MF (Radosavovic et al. 2020, Table 7 of the appendix): depths (1, 1, 4, 7) = 13 Y blocks
    "timm:regnety_002": (13, "RegNet Y bottleneck block (with SE)"),
    # MobileNetV3-Small (Howard et al. 2019, Table 2): 11 bneck blocks; the 1x1 conv after them is no block
    "timm:mobilenetv3_small_100": (11, "bneck (depthwise-separable / inverted residual)"),
    # EfficientNet-B0 (Tan & Le 2019, Table 1): MBConv repeats 1+2+2+3+3+4+1 = 16
    "timm:efficientnet_b0": (16, "MBConv (depthwise-separable / inverted residual)"),
    # ResNet-18 (He et al. 2016, Table 1): [2, 2, 2, 2] basic blocks = 8
    "torchvision:resnet18": (8, "basic residual block"),
    # ViT-B/16 (Dosovitskiy et al. 2021, Table 1): 12 layers
    "torchvision:vit_b_16": (12, "transformer encoder block"),
}

_BUILT: dict[str, tuple] = {}  # each model built (and traced) once per module: swin_tiny and vit_b_16 take seconds


def built(name: str):
    """(loaded model, its catalog) of ``name`` untrained, through the model-name option tests use."""
    if name not in _BUILT:
        loaded = load_model(f"{name}?pretrained=false")
        _BUILT[name] = loaded, LayerCatalog(loaded.module, loaded.preprocess.size)
    return _BUILT[name]


@pytest.mark.parametrize("name", list(EXPECTED_BLOCKS))
def test_blocks_are_found_in_every_modern_architecture(name):
    loaded, catalog = built(name)
    expected, _ = EXPECTED_BLOCKS[name]
    paths = block_paths(loaded.module)
    assert len(paths) == expected
    assert len(catalog.kinds["blocks"]) == expected
    # a block's layer is its module's output: the last node executed inside it
    modules = dict(loaded.module.named_modules())
    for path, node in zip(paths, catalog.kinds["blocks"]):
        assert node == path or node.startswith(path + "."), (path, node)
        assert modules[path] is not None
    # no block inside another
    assert not any(a != b and b.startswith(a + ".") for a in paths for b in paths)
    # the blocks' outputs are different tensors, in execution order
    order = {q: i for i, q in enumerate(catalog.names())}
    assert [order[n] for n in catalog.kinds["blocks"]] == sorted(order[n] for n in catalog.kinds["blocks"])
    assert len(set(catalog.kinds["blocks"])) == expected


def test_blocks_are_the_architectures_units():
    # the stage structure each count comes from, read off the built modules
    vit = built("timm:vit_tiny_patch16_224")[0].module
    assert block_paths(vit) == [f"blocks.{i}" for i in range(12)]
    convnext = built("timm:convnext_atto")[0].module
    depths = [len(stage.blocks) for stage in convnext.stages]
    assert depths == [2, 2, 6, 2]
    assert block_paths(convnext) == [f"stages.{s}.blocks.{b}" for s, d in enumerate(depths) for b in range(d)]
    regnet = built("timm:regnety_002")[0].module
    depths = [len(list(getattr(regnet, f"s{i}").children())) for i in range(1, 5)]
    assert depths == [1, 1, 4, 7]
    assert block_paths(regnet) == [f"s{s}.b{b}" for s, d in enumerate(depths, 1) for b in range(1, d + 1)]
    tv_vit = built("torchvision:vit_b_16")[0].module
    assert block_paths(tv_vit) == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    mobilenet = built("timm:mobilenetv3_small_100")[0].module
    # stage 5 is the single 1x1 ConvBnAct after the 11 bnecks
    assert "blocks.5.0" not in block_paths(mobilenet)


def _zscored(x: np.ndarray) -> np.ndarray:
    """The reference z-scoring: each row centred, then scaled to unit L2 norm, in float64."""
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    "name, blocks", [("timm:vit_tiny_patch16_224", "blocks"), ("torchvision:vit_b_16", "encoder.layers")]
)
def test_vit_tokens_all_and_class_match_the_models_own_hooks(name, blocks):
    loaded, catalog = built(name)
    model = loaded.module
    container = model.get_submodule(blocks)
    seen = {}
    hooks = [
        block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.detach().clone()))
        for k, block in enumerate(container)
    ]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    every, first = catalog.select("blocks"), catalog.select("blocks", tokens="class")
    tokens, width = seen[0].shape[1:]
    assert tokens == 197  # 14 x 14 patches of 16 pixels + the class token
    assert [layer.shape for layer in every] == [(tokens, width)] * 12
    assert [layer.shape for layer in first] == [(width,)] * 12 and all(layer.token == 0 for layer in first)
    with torch.no_grad():
        _, rows_all = catalog.capture_module(every).eval()(x)
        _, rows_class = catalog.capture_module(first).eval()(x)
    for k in range(12):
        out = seen[k].numpy()  # (2, tokens, width)
        # all tokens, token-major: token t's features at t*width .. (t+1)*width
        np.testing.assert_allclose(rows_all[k].numpy(), _zscored(out), atol=2e-5)
        flat = np.concatenate([out[:, t, :] for t in range(tokens)], axis=1)
        np.testing.assert_allclose(rows_all[k].numpy(), _zscored(flat), atol=2e-5)
        # the class token: row 0 of the sequence
        np.testing.assert_allclose(rows_class[k].numpy(), _zscored(out[:, 0, :]), atol=2e-5)


def test_tokens_class_needs_a_class_token_and_leaves_cnn_layers_whole():
    pooled = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg").eval()
    with pytest.raises(InputError, match="no class token.*choose --tokens all"):
        LayerCatalog(pooled, 224).select("blocks", tokens="class")
    _, resnet = built("torchvision:resnet18")
    assert resnet.select("blocks", tokens="class") == resnet.select("blocks")
    with pytest.raises(InputError, match="unknown token flattening 'cls': choose one of all, class"):
        resnet.select("blocks", tokens="cls")


# --- timm:hf-hub:ORG/NAME --------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a Hub that cannot be reached (whatever this machine's network)."""
    import huggingface_hub.constants

    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("semprobe.actors.zoo.socket.create_connection", unreachable)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    return tmp_path


def _cache_hub_repo(cache, repo: str, files: dict) -> None:
    """Put ``files`` (name -> writer of that path) into the Hugging Face cache layout of ``repo``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, write in files.items():
        write(snapshot / name)


def test_hub_names_fail_fast_offline_naming_the_choices(offline_hub):
    import time

    for name in ("timm:hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "hf-hub:org/none?pretrained=false"):
        start = time.monotonic()
        with pytest.raises(InputError, match=r"unknown model '.*': its config.json is not cached .*offline.*choose one "
                           r"of efficientnet_lite0.*timm:hf-hub:ORG/NAME"):  # fmt: skip
            load_model(name)
        # huggingface_hub alone retries for ~25 s offline; the one reachability check answers at once
        assert time.monotonic() - start < 10
    with pytest.raises(InputError, match="unknown model 'timm:hf-hub:no-slash': choose one of efficientnet_lite0"):
        load_model("timm:hf-hub:no-slash")
    with pytest.raises(InputError, match="repository holds its weights; drop weights="):
        load_model("timm:hf-hub:org/x?weights=a1")


def test_hub_names_load_through_timm_from_the_cache(offline_hub):
    import json

    import safetensors.torch

    config = {"architecture": "test_resnet", "num_classes": 7, "pretrained_cfg": {"input_size": [3, 160, 160]}}
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=7).state_dict()
    _cache_hub_repo(
        offline_hub,
        "someone/tiny-resnet",
        {
            "config.json": lambda p: p.write_text(json.dumps(config)),
            "model.safetensors": lambda p: safetensors.torch.save_file(state, p),
        },
    )
    loaded = load_model("timm:hf-hub:someone/tiny-resnet")
    assert loaded.num_classes == 7 and loaded.preprocess.size == 160
    assert loaded.weights == "timm:hf-hub:someone/tiny-resnet"
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key
    bare = load_model("timm:hf-hub:someone/tiny-resnet?pretrained=false")
    assert bare.weights == "untrained (seed 0)"
    assert not torch.equal(bare.module.state_dict()["fc.weight"], state["fc.weight"])


# --- timm's own preprocessing: crop_pct and crop_mode ----------------------------------------------------------


def _images() -> list[bytes]:
    """Two foolbox ImageNet samples (square) and three generated ones of other shapes (where the crop modes
    differ), as PNG bytes."""
    import io

    from PIL import Image

    from semprobe.datasets.decode import read_bytes
    from semprobe.datasets.images import resolve_images

    uris = resolve_images("sample:imagenet").images["uri"].to_pylist()[:2]
    out = [read_bytes(u) for u in uris]
    rng = np.random.default_rng(0)
    for w, h in [(320, 200), (150, 260), (500, 499)]:
        # smooth colour ramps plus noise: resampling differences show, as on photographs
        yy, xx = np.mgrid[0:h, 0:w]
        ramp = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _ours(data: bytes, pre) -> np.ndarray:
    """semprobe's model input for one image: decode_image's crop, then the extractor's normalisation."""
    from semprobe.actors.extractor import normalise
    from semprobe.datasets.decode import decode_image

    pixels = decode_image(data, **pre.decode_args())
    return normalise(pixels[None].copy(), pre, torch.device("cpu"))[0].numpy()


def _timms(data: bytes, cfg: dict) -> np.ndarray:
    import io

    from PIL import Image

    transform = timm.data.create_transform(**cfg)
    with Image.open(io.BytesIO(data)) as im:
        return transform(im.convert("RGB")).numpy()


@pytest.mark.parametrize(
    "name, crop_mode",
    [
        ("vit_tiny_patch16_224", "center"),  # crop_pct 0.9, bicubic
        ("regnety_002", "center"),  # crop_pct 0.875, bicubic
        ("dm_nfnet_f0", "squash"),  # 192 px, crop_pct 0.9
        ("deepseek_vit_412m", "border"),  # 546 px, crop_pct 1.0: the longer side fits, the rest padded
    ],
)
def test_timm_crop_mode_and_crop_pct_match_timms_create_transform(name, crop_mode):
    from timm.data import resolve_data_config

    from semprobe.actors.zoo import timm_preprocess

    cfg = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    assert cfg["crop_mode"] == crop_mode
    pre = timm_preprocess(cfg)
    assert pre.crop_mode == crop_mode and pre.size == cfg["input_size"][-1]
    assert pre.resize_size == int(pre.size / cfg["crop_pct"])  # timm's floor(size / crop_pct)
    for data in _images():
        ours, theirs = _ours(data, pre), _timms(data, cfg)
        assert ours.shape == theirs.shape == (3, pre.size, pre.size)
        # the same PIL resize and crop: equal up to float rounding of the normalisation
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_the_zoo_gives_timm_models_their_own_preprocessing():
    from timm.data import resolve_data_config

    loaded, _ = built("timm:vit_tiny_patch16_224")
    cfg = resolve_data_config({}, model=loaded.module)
    for data in _images():
        np.testing.assert_allclose(_ours(data, loaded.preprocess), _timms(data, cfg), atol=1e-4)


def test_feature_info_marks_the_body_not_only_its_stage_outputs():
    # timm's Inception-v3 has no block container; its feature_info names the stages where the resolution drops
    # (Conv2d_2b_3x3, Conv2d_4a_3x3, Mixed_5d, Mixed_6e, Mixed_7c), while its blocks are the 11 Inception modules
    # Mixed_5b .. Mixed_7c (Szegedy et al. 2016: 3 x A, B, 4 x C, D, 2 x E), as the fixed list found them before
    model = timm.create_model("inception_v3").eval()
    assert [f["module"] for f in model.feature_info][2:] == ["Mixed_5d", "Mixed_6e", "Mixed_7c"]
    mixed = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
    assert block_paths(model) == [f"Mixed_{m}" for m in mixed]
