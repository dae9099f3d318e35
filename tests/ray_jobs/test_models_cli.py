"""``semprobe models [--layers KIND] NAME``: a model's layers, their shapes and feature counts, without images."""

import json
import math

import pytest
import timm
import torch

from semprobe.ray_jobs.cli import main


def _hooked_shapes(model: torch.nn.Module, paths: list[str], size: int) -> dict[str, tuple[int, ...]]:
    """The reference: each module's output shape (per image) from its own forward hook on a zero image."""
    shapes = {}
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: shapes.__setitem__(p, tuple(o.shape[1:])))
        for p in paths
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def test_models_lists_blocks_with_their_shapes_and_features(capsys):
    assert main(["models", "--layers", "blocks", "timm:convnext_atto?pretrained=false"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "timm:convnext_atto?pretrained=false: 12 layers of 'blocks', input 3x224x224 (tokens: all)"
    assert out[1].split() == ["index", "layer", "kind", "shape", "features"]
    rows = [line.split() for line in out[2:-1]]
    # ConvNeXt-Atto: stages of 2, 2, 6, 2 blocks
    model = timm.create_model("convnext_atto")
    paths = [f"stages.{s}.blocks.{b}" for s, d in enumerate((2, 2, 6, 2)) for b in range(d)]
    expected = _hooked_shapes(model, paths, 224)
    assert len(rows) == 12
    for i, (row, path) in enumerate(zip(rows, paths)):
        shape = expected[path]
        assert row == [str(i), f"{path}.add", "blocks", "x".join(map(str, shape)), str(math.prod(shape))]
    assert out[-1].startswith("kinds: pixels 1, activations 12, concat 0, mixed 0, blocks 12, pool 1, logits 1")


def test_models_json_and_tokens_class(capsys):
    name = "timm:vit_tiny_patch16_224?pretrained=false"
    assert main(["models", "--json", "--layers", "blocks,logits", name]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["model"] == name and listing["input"] == [3, 224, 224]
    model = timm.create_model("vit_tiny_patch16_224")
    paths = [f"blocks.{i}" for i in range(12)]  # ViT-Ti: 12 blocks
    expected = _hooked_shapes(model, [*paths, "head"], 224)
    assert [r["name"] for r in listing["layers"]] == [f"{p}.add_1" for p in paths] + ["head"]
    assert [tuple(r["shape"]) for r in listing["layers"]] == [expected[p] for p in [*paths, "head"]]
    assert [r["features"] for r in listing["layers"]] == [math.prod(expected[p]) for p in [*paths, "head"]]
    assert listing["layers"][0]["shape"] == [197, 192]
    assert main(["models", "--json", "--tokens", "class", name]) == 0
    first = json.loads(capsys.readouterr().out)["layers"]
    assert [r["shape"] for r in first] == [[192]] * 12 and [r["features"] for r in first] == [192] * 12


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "timm:nope"], "unknown model 'timm:nope': choose one of efficientnet_lite0"),
        (["models", "--layers", "bloks", "fractalnet_tiny"], "unknown layer 'bloks': choose kinds pixels"),
        (["models", "--tokens", "class", "fractalnet_tiny"], None),  # no token sequences: listed whole
    ],
)
def test_models_bad_input_exits_2_naming_the_culprit(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
    else:
        assert code == 2 and message in err
