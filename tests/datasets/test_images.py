import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchvision.transforms as T
from PIL import Image

from semprobe.analysis.errors import InputError
from semprobe.datasets.decode import ImageError, decode_image, read_bytes
from semprobe.datasets.images import image_identity, resolve_images, shared_images


def _jpeg(mode="RGB", size=(40, 30), color=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


def test_sample_imagenet_and_cifar100():
    src = resolve_images("sample:imagenet")
    assert src.class_space == "imagenet"
    assert src.images.num_rows == 20
    first = src.images.slice(0, 1).to_pylist()[0]
    assert first["image_id"] == "imagenet_00_243.jpg"
    assert (first["class_index"], first["concept_id"]) == (243, "n02108422")  # bull mastiff
    assert len(src.classes) == 19  # class 609 appears twice
    cifar = resolve_images("sample:cifar100")
    assert cifar.class_space == "cifar100"
    assert cifar.images.num_rows == 20
    row = cifar.images.to_pylist()[0]
    assert (row["image_id"], row["class_index"], row["concept_id"]) == ("cifar100_00_49.png", 49, "mountain")


@pytest.mark.parametrize("kind", ["imagenet", "cifar100"])
def test_sample_range_takes_the_numbered_images(kind):
    everything = resolve_images(f"sample:{kind}").images.to_pylist()
    for start, stop in ((0, 10), (10, 20), (3, 4), (0, 20)):
        part = resolve_images(f"sample:{kind}?range={start}:{stop}")
        rows = part.images.to_pylist()
        # the NN of <kind>_NN_<class>: file names sort by it, so it is the row of the whole sample
        assert [int(r["image_id"].split("_")[1]) for r in rows] == list(range(start, stop))
        assert rows == everything[start:stop]
        assert {c.concept_id for c in part.classes} == {r["concept_id"] for r in rows}  # only the range's classes
    for bad in ("range=5:5", "range=3:21", "range=-1:4", "range=4", "first=3", "range=a:b"):
        with pytest.raises(InputError) as err:
            resolve_images(f"sample:{kind}?{bad}")
        assert str(err.value) == (
            f"unknown sample subset in 'sample:{kind}?{bad}': write sample:{kind}?range=START:STOP "
            "with 0 <= START < STOP <= 20"
        )


def test_shared_images_are_the_same_file_however_named(tmp_path, monkeypatch):
    (tmp_path / "a" / "n01440764").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        (tmp_path / "a" / "n01440764" / name).write_bytes(_jpeg())
    (tmp_path / "b" / "n01440764").mkdir(parents=True)
    (tmp_path / "b" / "n01440764" / "x.jpg").write_bytes(_jpeg())  # a copy, with the same image_id: another file
    (tmp_path / "link").symlink_to(tmp_path / "a")
    pq.write_table(
        pa.table({"image_id": ["p", "q"], "uri": ["a/n01440764/z.jpg", "b/n01440764/x.jpg"], "label": [0, 0]}),
        tmp_path / "m.parquet",
    )
    monkeypatch.chdir(tmp_path)
    a = resolve_images("a").images  # relative
    b = resolve_images(str(tmp_path / "b")).images
    link = resolve_images(str(tmp_path / "link")).images
    manifest = resolve_images(str(tmp_path / "m.parquet")).images
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()[:1] + ["n01440764/y.jpg", "n01440764/z.jpg"]
    assert shared_images(a, b) == []  # same image_id, different files
    assert shared_images(a, link) == a["uri"].to_pylist()  # a symlinked folder: the same files
    assert shared_images(manifest, a) == [f"{tmp_path}/a/n01440764/z.jpg"]
    assert shared_images(a, manifest) == ["a/n01440764/z.jpg"]  # in a's order, as a names them
    assert shared_images(b, manifest) == [f"{tmp_path}/b/n01440764/x.jpg"]
    assert image_identity(f"file://{tmp_path}/link/n01440764/y.jpg") == image_identity("a/n01440764/y.jpg")
    (tmp_path / "b" / "n01440764" / "hard.jpg").hardlink_to(tmp_path / "a" / "n01440764" / "y.jpg")
    (tmp_path / "b" / "n01440764" / "soft.jpg").symlink_to(tmp_path / "a" / "n01440764" / "z.jpg")
    b = resolve_images(str(tmp_path / "b")).images
    assert shared_images(b, a) == [f"{tmp_path}/b/n01440764/{f}" for f in ("hard.jpg", "soft.jpg")]
    assert image_identity("s3://bucket/val/x.jpg") == ("uri", "s3://bucket/val/x.jpg")
    assert image_identity("gone/x.jpg") == image_identity(f"{tmp_path}/gone/x.jpg") != image_identity("gone/y.jpg")
    assert image_identity("cifar100:/data/c?split=test#3") != image_identity("cifar100:/data/c?split=train#3")
    halves = [resolve_images(f"sample:imagenet?range={r}").images for r in ("0:10", "10:20")]
    assert shared_images(*halves) == []
    assert len(shared_images(resolve_images("sample:imagenet").images, halves[1])) == 10


def test_folder_of_wnids_and_of_names(tmp_path):
    for cls in ("n01440764", "n02108089"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        (tmp_path / "in" / cls / "a.JPEG").write_bytes(_jpeg())
    (tmp_path / "in" / "README.txt").write_text("not an image")
    src = resolve_images(str(tmp_path / "in"))
    assert src.class_space == "imagenet"
    assert src.images["image_id"].to_pylist() == ["n01440764/a.JPEG", "n02108089/a.JPEG"]
    assert src.images["class_index"].to_pylist() == [0, 242]  # tench, boxer
    assert src.classes[0].lemmas == ("tench", "Tinca tinca")
    for cls in ("zebra", "teapot"):
        (tmp_path / "named" / cls).mkdir(parents=True)
        (tmp_path / "named" / cls / "x.png").write_bytes(_jpeg("RGBA"))
    named = resolve_images(str(tmp_path / "named"))
    assert named.class_space == "folder"
    assert [c.concept_id for c in named.classes] == ["teapot", "zebra"]


def test_manifest_with_int_and_str_labels(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg())
    pq.write_table(pa.table({"image_id": ["a"], "uri": ["img/a.jpg"], "label": [243]}), tmp_path / "m.parquet")
    src = resolve_images(str(tmp_path / "m.parquet"))
    assert src.images.to_pylist() == [
        {"image_id": "a", "uri": f"{tmp_path}/img/a.jpg", "concept_id": "n02108422", "class_index": 243}
    ]
    pq.write_table(pa.table({"image_id": ["a"], "uri": ["img/a.jpg"], "label": ["otter"]}), tmp_path / "c.parquet")
    assert resolve_images(str(tmp_path / "c.parquet")).class_space == "cifar100"
    pq.write_table(pa.table({"image_id": ["a"], "path": ["img/a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="lacks column"):
        resolve_images(str(tmp_path / "bad.parquet"))


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(InputError, match=r"image source not found: /nonexistent/x \(choose"):
        resolve_images("/nonexistent/x")
    with pytest.raises(InputError, match=r"unknown sample set 'sample:mnist'.*sample:imagenet, sample:cifar100"):
        resolve_images("sample:mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        resolve_images(str(tmp_path / "empty"))


def test_decode_matches_torchvision_resize_and_crop():
    uri = resolve_images("sample:imagenet").images["uri"][0].as_py()
    data = read_bytes(uri)
    ours = decode_image(data, 224, 256, "bicubic")
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    expected = np.asarray(ref(Image.open(io.BytesIO(data)).convert("RGB")))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)
    wide = decode_image(_jpeg(size=(80, 20)), 16, 16)
    assert wide.shape == (16, 16, 3)


def test_decode_converts_grayscale_cmyk_palette_to_rgb():
    gray = decode_image(_jpeg("L", (20, 20), 200), 8, 8)
    assert gray.shape == (8, 8, 3)
    assert np.all(np.abs(gray.astype(int) - 200) <= 1) and np.all(gray[..., 0] == gray[..., 1])
    cmyk = decode_image(_jpeg("CMYK", (20, 20), (0, 255, 255, 0)), 8, 8)  # pure red in CMYK
    assert np.all(cmyk[..., 0] > 200) and np.all(cmyk[..., 1:] < 60)
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 8, 8)[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", _jpeg(size=(64, 64))[:200]], ids=["zero-byte", "garbage", "truncated"]
)
def test_undecodable_images_raise_image_error(data):
    with pytest.raises(ImageError) as err:
        decode_image(data, 8, 8)
    assert err.value.stage == "decode"


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(ImageError) as err:
        read_bytes(str(tmp_path / "gone.jpg"))
    assert err.value.stage == "read"


def test_a_precropped_image_is_taken_as_it_is():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), 8, 10, precropped=True), pixels)
    assert not np.array_equal(decode_image(buf.getvalue(), 8, 10), pixels)  # resized to 10, cropped back to 8
    with pytest.raises(ImageError, match="a pre-cropped image must be 6x6, got 8x8"):
        decode_image(buf.getvalue(), 6, 6, precropped=True)
