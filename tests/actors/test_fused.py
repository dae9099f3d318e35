"""``--store similarity`` on the actor: a whole image set through the network, each layer's w x w Pearson r
computed on the device from its resident rows, checked against the rows the plain extractor returns."""

import numpy as np
import pytest

from semprobe.actors.extractor import ActivationExtractor, memory_budget
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images

LAYERS = "pixels,blocks.1.0.bn3,blocks.3.1.add,blocks.5.1.add,logits"


@pytest.fixture(scope="module")
def extractor():
    return ActivationExtractor("efficientnet_lite0", LAYERS, dtype="float16", device="cpu")


@pytest.fixture(scope="module")
def pixels(extractor):
    pre = extractor.preprocess
    uris = resolve_images("sample:imagenet").images["uri"].to_pylist()[:11]
    return np.stack([decode_image(read_bytes(u), pre.size, pre.resize_size, pre.interpolation) for u in uris])


def reference(extractor, pixels, batch):
    """Each layer's rows as the activation store gets them (the extractor's batches), and numpy's Pearson r of them;
    the predictions."""
    outs = [extractor({"pixels": pixels[lo : lo + batch]}) for lo in range(0, len(pixels), batch)]
    rows = {layer.name: np.concatenate([o[layer.name] for o in outs]) for layer in extractor.layers}
    return (
        {name: np.corrcoef(r.astype(np.float64)) for name, r in rows.items()},
        np.concatenate([o["predicted_index"] for o in outs]),
        np.concatenate([o["predicted_prob"] for o in outs]),
    )


def test_set_correlations_equal_pearson_of_the_stored_rows(extractor, pixels):
    expected, index, prob = reference(extractor, pixels, 4)
    matrices, got_index, got_prob = extractor.correlations(pixels, extractor.layers, batch_size=4)
    assert sorted(matrices) == sorted(expected)
    for name, m in matrices.items():
        assert m.dtype == np.float32 and m.shape == (11, 11)
        np.testing.assert_allclose(m, expected[name], atol=1e-5)
    np.testing.assert_array_equal(got_index, index)
    np.testing.assert_allclose(got_prob, prob, rtol=1e-6)


@pytest.mark.parametrize("compute, atol", [("float64", 1e-12), ("float32", 2e-5)])
def test_chunks_of_layers_and_of_features_give_the_same_matrices(extractor, pixels, compute, atol):
    # float32: one product over the 150,528 pixel features rounds at ~1e-5, feature chunks of 1000 less
    whole, index, _ = extractor.correlations(pixels, extractor.layers, batch_size=5, compute=compute)
    for layer in extractor.layers:  # one chunk per layer: a forward pass capturing that layer alone
        m, got_index, _ = extractor.correlations(pixels, [layer], 5, compute=compute, block_values=11 * 1000)
        assert list(m) == [layer.name]
        np.testing.assert_allclose(m[layer.name], whole[layer.name], atol=atol)
        np.testing.assert_array_equal(got_index, index)
    assert len(extractor._nets) == 1 + len(extractor.layers)  # one capturing module per chunk, built once


def test_a_constant_image_gets_a_nan_row_and_the_others_are_unchanged(extractor, pixels):
    flat = pixels.copy()
    flat[2] = 128  # a uniform grey image: its pixels have no variance
    (pixels_layer,) = [layer for layer in extractor.layers if layer.name == "pixels"]
    matrices, _, _ = extractor.correlations(flat, [pixels_layer], batch_size=4)
    m = matrices["pixels"]
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all()
    keep = [i for i in range(11) if i != 2]
    rows = flat[keep].astype(np.float64)  # the model input is an affine map of the pixels: the same Pearson r
    np.testing.assert_allclose(m[np.ix_(keep, keep)], np.corrcoef(rows.reshape(10, -1)), atol=1e-4)


def test_memory_budget_is_a_share_of_the_available_ram_on_cpu():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    budget = memory_budget("cpu", share=0.5)
    assert 0 < budget and abs(budget - available * 0.125) < 0.02 * available  # the RAM moves a little meanwhile


def test_reference_correlations_equal_pearson_of_the_stored_rows(extractor, pixels):
    """misclassified --store similarity: the 4 references first (resident), then 7 images in batches of 3, each
    image's r with each reference, against numpy's Pearson r of the rows the activation store would hold."""
    expected_rows = {}
    for lo in range(0, 11, 4):
        out = extractor({"pixels": pixels[lo : lo + 4]})
        for layer in extractor.layers:
            expected_rows.setdefault(layer.name, []).append(out[layer.name].astype(np.float64))
    blocks = extractor.reference_correlations(pixels, 4, extractor.layers, batch_size=3)
    assert list(blocks) == [layer.name for layer in extractor.layers]
    for name, block in blocks.items():
        rows = np.concatenate(expected_rows[name])
        expected = [[np.corrcoef(rows[4 + i], rows[j])[0, 1] for j in range(4)] for i in range(7)]
        assert block.dtype == np.float64 and block.shape == (7, 4)
        np.testing.assert_allclose(block, expected, atol=1e-5)  # the batches differ: CPU kernels round by shape
    (pixels_layer,) = [layer for layer in extractor.layers if layer.name == "pixels"]
    flat = pixels.copy()
    flat[[1, 6]] = 128  # a constant reference (column 1) and a constant image (row 2)
    (block,) = extractor.reference_correlations(flat, 4, [pixels_layer], batch_size=5).values()
    assert np.isnan(block[:, 1]).all() and np.isnan(block[2]).all() and np.isnan(block).sum() == 7 + 4 - 1
    assert extractor.reference_correlations(pixels[:4], 4, [pixels_layer], 3)["pixels"].shape == (0, 4)


def test_predict_is_the_extractors_top1(extractor, pixels):
    index, prob = extractor.predict(pixels, batch_size=4)
    outs = [extractor({"pixels": pixels[lo : lo + 4]}) for lo in range(0, 11, 4)]
    np.testing.assert_array_equal(index, np.concatenate([o["predicted_index"] for o in outs]))
    np.testing.assert_array_equal(prob, np.concatenate([o["predicted_prob"] for o in outs]))
