"""The extraction job end to end on real Ray, on an ImageFolder the test makes from foolbox's samples."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli_stderr
from PIL import Image

from semprobe.actors.zoo import load_model, resolved_weights
from semprobe.analysis.errors import InputError
from semprobe.datasets.decode import decode_image
from semprobe.datasets.images import resolve_images
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import ExtractConfig
from semprobe.ray_jobs.extraction import plan_extraction, run_extract
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import layer_folder, layer_views

SAMPLES = {Path(u).name: Path(u) for u in resolve_images("sample:imagenet").images["uri"].to_pylist()}
LAYER = "blocks.1.0.bn1"  # timm BatchNormAct2d: an in-place ReLU6 inside a leaf module


def _convert(src: Path, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.open(src).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    files = {
        "n02815834/a.jpg": SAMPLES["imagenet_02_438.jpg"].read_bytes(),  # beaker
        "n02815834/gray.jpg": _convert(SAMPLES["imagenet_02_438.jpg"], "L"),
        "n12768682/a.jpg": SAMPLES["imagenet_03_990.jpg"].read_bytes(),  # buckeye
        "n12768682/cmyk.jpg": _convert(SAMPLES["imagenet_03_990.jpg"], "CMYK"),
        "n07745940/a.jpg": SAMPLES["imagenet_04_949.jpg"].read_bytes(),  # strawberry
        "n07745940/empty.jpg": b"",
        "n04417672/a.jpg": SAMPLES["imagenet_05_853.jpg"].read_bytes(),  # thatch
        "n04417672/trunc.jpg": SAMPLES["imagenet_05_853.jpg"].read_bytes()[:3000],
        "n03594945/a.jpg": SAMPLES["imagenet_06_609.jpg"].read_bytes(),  # jeep
        "n03594945/b.jpg": SAMPLES["imagenet_07_609.jpg"].read_bytes(),
        "n03594945/c.jpg": b"GIF89a not really",
        "n02108422/a.jpg": SAMPLES["imagenet_00_243.jpg"].read_bytes(),  # bull mastiff: no GloVe word
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def config(images: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(
        images=str(images),
        model="efficientnet_lite0",
        out=str(out),
        words=["glove-50d"],
        batch_size=2,
        shard_size=4,
        layers="activations",
    )
    return ExtractConfig(**{**base, **kw}).validate()


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def extracted(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    images = make_folder(root / "images")
    summary = run_extract(config(images, root / "out"), log=lambda m: None)
    return images, root / "out", summary


def test_outputs(extracted):
    images, out, summary = extracted
    assert (summary["n_images"], summary["n_errors"], summary["n_layers"], summary["n_shards"]) == (8, 3, 33, 3)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [
        ("n03594945/c.jpg", "decode"),
        ("n04417672/trunc.jpg", "decode"),
        ("n07745940/empty.jpg", "decode"),
    ]
    concepts = pq.read_table(out / "concepts.parquet")
    assert concepts["word"].to_pylist() == ["beaker", "jeep", "thatch", "strawberry", "buckeye"]
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 11 and "n02108422/a.jpg" not in manifest["image_id"].to_pylist()
    assert manifest["shard"].to_pylist() == [0] * 4 + [1] * 4 + [2] * 3
    assert pq.read_table(out / "manifest.parquet").schema.metadata[b"semprobe.schema_version"] == b"1"
    assert json.loads((out / "summary.json").read_text())["n_images"] == 8
    assert json.loads((out / "config.json").read_text())["weights"] == resolved_weights("efficientnet_lite0")


def test_activations_are_zscored_and_readable_without_ray(extracted):
    _, out, _ = extracted
    layers = pq.read_table(out / "layers.parquet")
    assert layers.num_rows == 33 and layers["layer_index"].to_pylist() == list(range(33))
    folder = out / "activations" / "efficientnet_lite0" / LAYER
    table = pads.dataset(folder, format="arrow").to_table()
    assert table.num_rows == 8
    assert set(table["image_id"].to_pylist()) == {
        "n02815834/a.jpg",
        "n02815834/gray.jpg",
        "n12768682/a.jpg",
        "n12768682/cmyk.jpg",
        "n07745940/a.jpg",
        "n04417672/a.jpg",
        "n03594945/a.jpg",
        "n03594945/b.jpg",
    }
    assert table["shape"][0].as_py() == [96, 112, 112]
    values = table["values"].combine_chunks().to_numpy_ndarray().astype(np.float64)
    assert values.shape == (8, 96 * 112 * 112) and table.schema.field("values").type.value_type == "halffloat"
    np.testing.assert_allclose(values.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1, atol=2e-3)
    frame = pl.read_ipc(sorted(folder.glob("*.arrow"))[0])
    assert frame.columns == ["image_id", "concept_id", "set_index", "model", "layer", "layer_index", "shape", "values"]
    assert frame["layer"].unique().to_list() == [LAYER]


def test_activation_equals_reference_forward(extracted):
    """The stored row is the z-scored output of the layer, computed here by a plain forward hook."""
    images, out, _ = extracted
    loaded = load_model("efficientnet_lite0")
    pixels = decode_image((images / "n02815834/a.jpg").read_bytes(), 224, 256)
    x = torch.from_numpy((pixels.astype(np.float32) - 127) / 128).permute(2, 0, 1)[None].contiguous()
    seen = {}

    def hook(module, inputs, output):
        seen["out"] = output.detach().clone()

    loaded.module.blocks[1][0].bn1.register_forward_hook(hook)
    with torch.no_grad():
        logits = loaded.module(x)
    ref = seen["out"].double().flatten().numpy()
    ref = (ref - ref.mean()) / np.linalg.norm(ref - ref.mean())
    table = pads.dataset(out / "activations" / "efficientnet_lite0" / LAYER, format="arrow").to_table()
    row = table.filter(pads.field("image_id") == "n02815834/a.jpg")
    stored = row["values"].combine_chunks().to_numpy_ndarray()[0].astype(np.float64)
    np.testing.assert_allclose(stored, ref, rtol=2e-3, atol=2e-6)
    preds = pq.read_table(out / "predictions" / "efficientnet_lite0").to_pylist()
    pred = next(p for p in preds if p["image_id"] == "n02815834/a.jpg")
    assert pred["predicted_index"] == int(logits.argmax())


def test_rerun_skips_and_resume_recomputes_only_missing(extracted):
    images, out, _ = extracted
    before = digest(out)
    again = run_extract(config(images, out), log=lambda m: None)
    assert again["shards_computed"] == 0
    assert digest(out) == before
    # a run killed inside shard 1: its record and one layer file never landed, a temp file was left behind
    (out / "shards" / "efficientnet_lite0" / "shard-00001.json").unlink()
    (out / "activations" / "efficientnet_lite0" / LAYER / "shard-00001.arrow").unlink()
    (out / "activations" / "efficientnet_lite0" / LAYER / ".shard-00001.arrow.tmp-dead").write_bytes(b"half")
    resumed = run_extract(config(images, out), log=lambda m: None)
    assert resumed["shards_computed"] == 1
    assert digest(out) == before


def test_same_out_with_other_options_is_refused(extracted):
    images, out, _ = extracted
    with pytest.raises(InputError, match=r"holds another experiment \(it differs in layers\)"):
        run_extract(config(images, out, layers="pool"), log=lambda m: None)


def test_the_store_reader_takes_parquet_as_it_takes_arrow(extracted, tmp_path):
    """The Gram and 1 vs. 2 tasks read a --store-format parquet extraction like the default Arrow IPC one."""
    images, out, _ = extracted
    layer = pq.read_table(out / "layers.parquet")["layer"][0].as_py()
    as_parquet = tmp_path / "parquet"
    run_extract(config(images, as_parquet, layers=layer, store_format="parquet"), log=lambda m: None)
    folder = layer_folder("efficientnet_lite0", layer)
    assert {p.suffix for p in as_parquet.joinpath(*folder).iterdir()} == {".parquet"}
    read = []
    for root in (out, as_parquet):
        where, views = layer_views(Output(str(root)), folder, str(tmp_path))
        read.append({image_id: views[v][row].copy() for image_id, (v, row) in where.items()})
    arrow, parquet = read
    assert sorted(arrow) == sorted(parquet) and len(arrow) == 8
    for image_id, values in arrow.items():
        np.testing.assert_array_equal(parquet[image_id], values)


def test_sets_are_drawn_per_concept(tmp_path):
    images = make_folder(tmp_path / "images")
    plan = plan_extraction(config(images, tmp_path / "out", sets=2, seed=7))
    m = plan.manifest
    assert m.num_rows == 10  # 5 concepts x 2 sets
    per_set = {s: sorted(m.filter(pads.field("set_index") == s)["concept_id"].to_pylist()) for s in (0, 1)}
    assert per_set[0] == per_set[1] == sorted(plan.concepts.concept_ids)
    assert plan.dropped_for_sets == {}
    assert plan_extraction(config(images, tmp_path / "out", sets=2, seed=7)).manifest.equals(m)
    assert plan_extraction(config(images, tmp_path / "out", sets=3)).dropped_for_sets == {
        "n02815834": 2,
        "n07745940": 2,
        "n04417672": 2,
        "n12768682": 2,
    }
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet5000"], "unknown model 'resnet5000': choose one of efficientnet_lite0"),
        (["--layers", "activations,blocks.9"], "unknown layer 'blocks.9'"),
        (["--words", "glov"], "unknown word model 'glov': choose one of glove-50d, word2vec:PATH"),
        (["--images", "/no/such/dir"], "image source not found: /no/such/dir"),
        (["--dtype", "int8"], "unknown dtype 'int8': choose one of float16, float32"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["extract", "--images", "sample:imagenet", "--out", str(out), *args])
    err = cli_stderr(capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not out.exists()
