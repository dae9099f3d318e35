"""Several extractions through one pipeline (``extraction.stream_all``): rows routed to their extraction's stage,
models kept per actor, each extraction finished once. The end-to-end runs are test_dynamics' (a batch of checkpoints
x splits shares one pipeline); these check the routing itself, without Ray."""

import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from semprobe.ray_jobs import extraction
from semprobe.ray_jobs.decode_stage import decode_shard, decode_units
from semprobe.ray_jobs.extraction import ExtractPlans, PendingExtraction, stream_all
from semprobe.ray_jobs.progress import Progress


class Stage:
    """A stand-in actor stage: its output names the extraction (``tag``) and counts what it saw."""

    built: list[str] = []

    def __init__(self, tag: str, scale: int):
        Stage.built.append(tag)
        self.tag, self.scale = tag, scale

    def __call__(self, batch):
        return {
            "shard": batch["shard"].astype(np.int64),
            "n_images": np.array([len(json.loads(str(i))) for i in batch["images"]], np.int64),
            "n_errors": batch["pixels"].reshape(len(batch["shard"]), -1).sum(1).astype(np.int64) * self.scale,
        }


def batch_of(plans, shards):
    n = len(plans)
    return {
        "plan": np.array(plans, np.int32),
        "shard": np.array(shards, np.int32),
        "images": np.array([json.dumps([[f"i{k}", "c", 0]] * (k + 1)) for k in range(n)]),
        "errors": np.array(["[]"] * n),
        "pixels": np.arange(n * 4, dtype=np.uint8).reshape(n, 1, 2, 2),
    }


def test_rows_reach_their_extractions_stage_and_models_are_kept_lru(monkeypatch):
    monkeypatch.setattr(Stage, "built", [])
    actor = ExtractPlans({0: (Stage, {"tag": "a", "scale": 1}), 1: (Stage, {"tag": "b", "scale": 10}),
                          2: (Stage, {"tag": "c", "scale": 100})})  # fmt: skip
    batch = batch_of([1, 0, 1], [7, 3, 8])
    out = actor(batch)
    # by hand: rows grouped by extraction in order of first appearance (1, then 0), each stage's own numbers
    pixel_sums = batch["pixels"].reshape(3, -1).sum(1)
    order = [0, 2, 1]
    assert out["plan"].tolist() == [1, 1, 0]
    assert out["shard"].tolist() == [7, 8, 3]
    assert out["n_images"].tolist() == [k + 1 for k in order]
    assert out["n_errors"].tolist() == [pixel_sums[0] * 10, pixel_sums[2] * 10, pixel_sums[1] * 1]
    assert Stage.built == ["b", "a"]  # each built once
    actor(batch_of([0], [4]))  # a kept one: not built again
    assert Stage.built == ["b", "a"]
    actor(batch_of([2], [0]))  # a third: the least recently used (b) goes
    assert Stage.built == ["b", "a", "c"] and list(actor.built) == [0, 2]
    actor(batch_of([1], [9]))
    assert Stage.built == ["b", "a", "c", "b"] and len(actor.built) == extraction.MODELS_KEPT


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_takes_the_options_of_the_rows_extraction(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((200, 10, 10)))
    images = [json.dumps([["a", str(tmp_path / "a.png"), "c", 0]])]
    unit = pa.table({"shard": pa.array([3], pa.int32()), "images": images, "n": pa.array([1], pa.int32())})
    options = {
        0: {"size": 4, "resize_size": 4, "interpolation": "bilinear", "precropped": False},
        1: {"size": 2, "resize_size": 3, "interpolation": "bicubic", "precropped": False},
    }
    for plan, kwargs in options.items():
        got = decode_units(unit.append_column("plan", pa.array([plan], pa.int32())), options)
        alone = decode_shard(unit, **kwargs)
        assert got["plan"].tolist() == [plan]
        assert got.keys() - {"plan"} == alone.keys()
        for k in alone:
            np.testing.assert_array_equal(got[k], alone[k])
        assert got["pixels"].shape == (1, 1, kwargs["size"], kwargs["size"], 3)


def test_an_extraction_with_nothing_to_compute_finishes_at_once_in_order():
    """A resumed batch: no pipeline starts (no Ray needed here), each extraction finishes once, in order."""
    calls = []
    empty = pa.table({"shard": pa.array([], pa.int32()), "images": pa.array([], pa.string()),
                      "n": pa.array([], pa.int32())})  # fmt: skip
    jobs = [
        PendingExtraction(None, {"actors": 1}, empty, Stage, {}, Progress(0, "images", f"x{k}", io.StringIO()),
                          lambda done, elapsed, k=k: (calls.append(("finish", k, done)), f"summary {k}")[1])
        for k in range(3)
    ]  # fmt: skip
    got = stream_all(jobs, lambda i, s: calls.append(("finished", i, s)))
    assert got == ["summary 0", "summary 1", "summary 2"]
    assert calls == [x for k in range(3) for x in (("finish", k, []), ("finished", k, f"summary {k}"))]
