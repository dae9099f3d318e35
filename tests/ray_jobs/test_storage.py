"""Outputs through pyarrow.fs: the same code writes to local disk, to any pyarrow filesystem (here a
SubTreeFileSystem, which behaves as object storage does: no rename), and to URIs (file://, s3://, gs://)."""

import hashlib
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from conftest import BASE, tables

from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.run import run
from semprobe.ray_jobs.storage import Output, model_key


@pytest.fixture(params=["local", "subtree"])
def output(request, tmp_path) -> Output:
    if request.param == "local":
        return Output(str(tmp_path / "out"))
    (tmp_path / "bucket").mkdir()
    return Output("runs/x", fs=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))


def test_writes_read_back_and_list(output):
    table = pa.table({"a": [1, 2, 3]})
    output.write_table(table, "tables", "t.parquet")
    output.write_json({"k": [1, 2]}, "meta", "m.json")
    output.write_bytes(b"\x89PNG", "figures", "f.png")
    assert output.read_table("tables", "t.parquet").equals(table)
    assert output.read_json("meta", "m.json") == {"k": [1, 2]}
    assert output.exists("figures", "f.png") and not output.exists("figures", "g.png")
    assert output.list("tables") == ["t.parquet"] and output.list("absent") == []


def test_an_aborted_file_leaves_nothing(output):
    with pytest.raises(RuntimeError):
        with output.open_atomic("tables", "t.parquet") as f:
            f.stream.write(b"half a table")
            raise RuntimeError("killed")
    assert output.list("tables") == [] and not output.exists("tables", "t.parquet")


def test_the_main_job_writes_to_a_uri(ray_session, single_node, tmp_path):
    """--out file:///... goes through pyarrow.fs.FileSystem.from_uri, as s3:// and gs:// do."""
    out = tmp_path / "out"
    run(RunConfig(**BASE, out=out.as_uri(), actors=1).validate(), log=lambda m: None)
    assert tables(out) == tables(single_node)
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("uri", ["s3://bucket/runs/x?region=us-east-1", "gs://bucket/runs/x"])
def test_object_store_uris_resolve_to_their_filesystems(uri):
    out = Output(uri)
    assert type(out.fs).__name__ == {"s3": "S3FileSystem", "gs": "GcsFileSystem"}[uri[:2]]
    assert out.path("scores.parquet") == "bucket/runs/x/scores.parquet"


def test_sweep_removes_only_a_killed_writers_temporaries(tmp_path):
    output = Output(str(tmp_path / "out"))
    left = output.open_atomic("tables", "t.parquet")  # a writer killed before commit or abort
    left.stream.write(b"half")
    output.write_bytes(b"kept", "tables", ".hidden-but-not-temporary")
    output.write_table(pa.table({"a": [1]}), "tables", "u.parquet")
    assert len(list((tmp_path / "out" / "tables").iterdir())) == 3
    assert output.sweep() == 1
    assert sorted(p.name for p in (tmp_path / "out" / "tables").iterdir()) == [".hidden-but-not-temporary", "u.parquet"]


def _old_model_key(name: str) -> str:
    """model_key as it was before model names took options: existing runs resume under these keys."""
    key = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")
    if len(key) <= 120:
        return key
    return f"{key[:40]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}-{key[-60:]}"


def test_model_keys_stay_for_old_names_and_are_distinct_and_safe_with_options(tmp_path):
    old = [
        "efficientnet_lite0",
        "torchvision:resnet50",
        "timm:resnet50.a1_in1k",
        "timm:resnet18:checkpoint=/ckpt/r18.pt",
        "resnet18:checkpoint=" + "/very/deep" * 30 + "/r18.pt",
    ]
    for name in old:
        assert model_key(name) == _old_model_key(name)
    assert model_key("torchvision:resnet50") == "torchvision_resnet50"
    with_options = [
        "torchvision:resnet50?weights=IMAGENET1K_V1",
        "torchvision:resnet50?weights=IMAGENET1K_V2",
        "torchvision:resnet50?weights=IMAGENET1K_V1&input_size=331",
        "torchvision:resnet50?weights=IMAGENET1K_V1_input_size=331",
        "torchvision:resnet50?weights=IMAGENET1K_V1?input_size=331",
        "torchvision_resnet50?weights=IMAGENET1K_V1",
        "resnet50?input_size=331:checkpoint=../../../etc/x",
        "..",
        ".",
        "",
        "../..?a=b",
        "/",
    ]
    keys = [model_key(name) for name in with_options + old]
    assert len(set(keys)) == len(keys)  # distinct
    assert keys == [model_key(name) for name in with_options + old]  # stable
    for name, key in zip(with_options, keys):
        assert re.fullmatch(r"[A-Za-z0-9._=-]+", key) and key.strip(".") and not key.startswith("."), name
        assert len(key) <= 255
        assert key.startswith(_old_model_key(name).lstrip(".")[:40])  # still readable
        # a key is one folder right under the root, whatever the name
        root = tmp_path / "out"
        assert (root / key).resolve().parent == root.resolve()
