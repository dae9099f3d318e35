"""--tokens: declared once in the config, in the experiment id only when not the default, and carried to the
extraction's plan and model actors."""

import json

import numpy as np
import torch

from semprobe.actors.zoo import load_model
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import ExtractConfig, RunConfig
from semprobe.ray_jobs.extraction import ExtractShards, plan_extraction

VIT = "timm:vit_tiny_patch16_224?pretrained=false"


def test_tokens_is_in_the_identity_only_when_class():
    for cls in (RunConfig, ExtractConfig):
        default, same, other = cls().validate(), cls(tokens="all").validate(), cls(tokens="class").validate()
        assert "tokens" not in default.identity()  # the ids of existing runs stay as they were
        assert default.experiment_id() == same.experiment_id()
        assert other.identity()["tokens"] == "class"
        assert other.experiment_id() != default.experiment_id()
        assert {k: v for k, v in other.identity().items() if k != "tokens"} == default.identity()


def test_tokens_flag_and_its_choices(capsys):
    assert main(["run", "--tokens", "class", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == "class"
    assert main(["extract", "--tokens", "cls", "--print-config"]) == 2
    assert "cls" in capsys.readouterr().err
    try:
        main(["run", "--help"])
    except SystemExit:  # argparse exits after printing the help
        pass
    assert "--tokens {all|class}" in capsys.readouterr().out


def test_the_plan_and_the_model_actor_take_the_class_token(tmp_path):
    cfg = ExtractConfig(model=VIT, layers="blocks", tokens="class", out=str(tmp_path / "x")).validate()
    plan = plan_extraction(cfg)
    assert [layer.shape for layer in plan.layers] == [(192,)] * 12
    assert all(layer.token == 0 for layer in plan.layers)
    actor = ExtractShards(str(tmp_path / "x"), VIT, "blocks", "float32", 2, 0, 1, tokens="class")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = actor.extractor({"pixels": pixels})
    # the reference: the last block's class token from a forward hook on the model itself (the same seeded
    # weights as the actor's: an untrained network is the same for the same string)
    model = load_model(VIT).module
    seen = []
    hook = model.get_submodule("blocks.11").register_forward_hook(lambda m, i, o: seen.append(o[:, 0].clone()))
    with torch.no_grad():
        model(actor.extractor.normalise(pixels))
    hook.remove()
    ref = seen[0].double().numpy()
    ref = ref - ref.mean(axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(out["blocks.11.add_1"], ref, atol=2e-5)
