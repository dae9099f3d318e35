import itertools
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from semprobe.actors.extractor import ActivationExtractor
from semprobe.actors.fractalnet import ConvUnit, FractalBlock, FractalNet
from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError

PAPER_CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with another job, two OpenMP threads
    spin at every barrier while one waits for a core (measured: an epoch of the learning
    test took 35 s with two threads against 0.7 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fractalnet(one_thread):
    return load_model("fractalnet")


def unit(u: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """A conv unit written out: conv3x3 (no bias) -> batch norm -> ReLU (dropout 0)."""
    bn = u.bn
    mean, var = (None, None) if training else (bn.running_mean, bn.running_var)
    return F.relu(
        F.batch_norm(F.conv2d(x, u.conv.weight, padding=1), mean, var, bn.weight, bn.bias, training, 0.0, bn.eps)
    )


def randomised_block(in_channels=3, out_channels=4) -> FractalBlock:
    """A 3-column block whose batch norms are not the identity, so a wrong join shows."""
    torch.manual_seed(1)
    block = FractalBlock(in_channels, out_channels, 3, 0.0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return block


def test_paper_model_loads_with_cifar100_input(fractalnet):
    assert fractalnet.name == "fractalnet"
    assert fractalnet.num_classes == 100
    pre = fractalnet.preprocess
    assert (pre.size, pre.resize_size) == (32, 32)
    assert pre.mean == (0.5071, 0.4865, 0.4409)
    assert pre.std == (0.2673, 0.2564, 0.2762)
    assert not fractalnet.module.training
    with torch.no_grad():
        assert fractalnet.module(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # 7 bias-free 3x3 convs and 7 batch norms per block, then a 512 -> 100 linear layer
    widths = (3, *PAPER_CHANNELS)
    expected = (
        sum(3 * 9 * cin * cout + 4 * 9 * cout * cout + 7 * 2 * cout for cin, cout in itertools.pairwise(widths))
        + 512 * 100
        + 100
    )
    assert sum(p.numel() for p in fractalnet.module.parameters()) == expected == 33_770_788


def test_seeded_initialisation_leaves_the_callers_rng_alone(fractalnet):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    again = load_model("fractalnet")
    assert torch.equal(torch.rand(3), expected)
    for (name, a), b in zip(fractalnet.module.state_dict().items(), again.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_conv_unit_is_conv_dropout_batchnorm_relu():
    """Larsson's and the authors' order: batch norm sees the dropped-out convolution."""
    torch.manual_seed(3)
    u = ConvUnit(3, 4, 0.3)
    assert [(name, type(m)) for name, m in u.named_children()] == [
        ("conv", nn.Conv2d),
        ("drop", nn.Dropout),
        ("bn", nn.BatchNorm2d),
        ("relu", nn.ReLU),
    ]
    nn.init.uniform_(u.bn.weight, 0.5, 1.5)
    nn.init.uniform_(u.bn.bias, -0.2, 0.2)
    x = torch.randn(4, 3, 8, 8)
    w, b, eps = u.bn.weight, u.bn.bias, u.bn.eps
    with torch.no_grad():
        torch.manual_seed(7)
        out = u.train()(x)
        # the same seed draws the same dropout mask for a tensor of the same shape
        torch.manual_seed(7)
        dropped = F.dropout(F.conv2d(x, u.conv.weight, padding=1), 0.3, training=True)
        reference = F.relu(F.batch_norm(dropped, None, None, w, b, True, 0.0, eps))
        torch.manual_seed(7)
        conv = F.conv2d(x, u.conv.weight, padding=1)
        dropout_last = F.dropout(F.relu(F.batch_norm(conv, None, None, w, b, True, 0.0, eps)), 0.3, training=True)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert (out - dropout_last).abs().max() > 0.1
    # eval: dropout is the identity, batch norm uses its running statistics
    with torch.no_grad():
        evaluated = u.eval()(x)
        expected = F.relu(F.batch_norm(conv, u.bn.running_mean, u.bn.running_var, w, b, False, 0.0, eps))
    torch.testing.assert_close(evaluated, expected, rtol=1e-5, atol=1e-6)
    # no rate, no dropout module: the first block's graph has no no-op dropout
    assert isinstance(ConvUnit(3, 4, 0.0).drop, nn.Identity)


def test_block_columns_hold_1_2_4_conv_units():
    block = FractalBlock(3, 8, 3, 0.0)
    assert [len(column) for column in block.columns] == [1, 2, 4]
    assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 7
    assert block.join_depths == (2, 4)
    assert block.join_inputs == ((1, 2), (0, 1, 2))
    net = FractalNet()
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 35
    assert [b.columns[c][0].conv.in_channels for b in net.blocks for c in range(3)] == [
        w for w in (3, 64, 128, 256, 512) for _ in range(3)
    ]
    # Larsson's expansion: C columns make a block 2**(C-1) units deep with 2**C - 1 units
    assert [sum(len(c) for c in FractalBlock(3, 4, n, 0.0).columns) for n in (1, 2, 3, 4)] == [1, 3, 7, 15]


def test_eval_block_is_the_mean_of_its_columns():
    block = randomised_block().eval()
    x = torch.randn(2, 3, 8, 8)
    u = [[lambda h, m=m: unit(m, h, training=False) for m in column] for column in block.columns]
    with torch.no_grad():
        inner = (u[1][0](x) + u[2][1](u[2][0](x))) / 2  # the join halfway down
        reference = (u[0][0](x) + u[1][1](inner) + u[2][3](u[2][2](inner))) / 3
        out = block(x)
        assert torch.equal(out, block(x))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    # a nested mean of pairs (the other reading of the expansion) is a different function
    nested = ((u[1][1](inner) + u[2][3](u[2][2](inner))) / 2 + u[0][0](x)) / 2
    assert (out - nested).abs().max() > 1e-2


def test_eval_is_deterministic_and_training_reproducible(fractalnet):
    model = fractalnet.module
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        net = FractalNet(channels=(8, 16, 32, 32, 32)).train()  # dropout and drop-path on
        outs = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_drop_path_draws_global_half_the_time_and_keeps_one_input_per_join():
    net = FractalNet(channels=(8, 8, 8, 8, 8))
    torch.manual_seed(0)
    draws = [net.sample_drop_path() for _ in range(4000)]
    torch.manual_seed(0)
    assert [net.sample_drop_path() for _ in range(50)] == draws[:50]

    glob = [d for d in draws if d.mode == "global"]
    local = [d for d in draws if d.mode == "local"]
    assert abs(len(glob) / len(draws) - 0.5) < 0.03  # binomial sd 0.008
    for column in range(3):
        assert abs(sum(d.column == column for d in glob) / len(glob) - 1 / 3) < 0.04
    # global: in every block, each join keeps the chosen column's input and nothing else
    for d in glob:
        for block in d.keep:
            assert block[0] == tuple(c == d.column for c in (1, 2))
            assert block[1] == tuple(c == d.column for c in (0, 1, 2))
    # local: never an empty join; each input dropped at 0.15, less the draws where all went
    # and one was put back uniformly: 0.15 - 0.15**n / n for an n-input join.
    assert all(any(join) for d in local for block in d.keep for join in block)
    assert all(d.column is None for d in local)
    for j, n in ((0, 2), (1, 3)):
        kept = np.array([block[j] for d in local for block in d.keep], dtype=float)
        assert kept.shape == (5 * len(local), n)
        assert abs(1 - kept.mean() - (0.15 - 0.15**n / n)) < 0.01
        assert (kept.sum(axis=1) == 0).sum() == 0


def test_training_forward_follows_the_draw_and_skips_dropped_units():
    x = torch.randn(4, 3, 8, 8)

    def u(block: FractalBlock) -> list[list]:
        return [[lambda h, m=m: unit(m, h, training=True) for m in column] for column in block.columns]

    with torch.no_grad():
        block = randomised_block().train()
        r = u(block)
        torch.testing.assert_close(block(x, ((False, False), (True, False, False))), r[0][0](x))
        torch.testing.assert_close(
            block(x, ((False, True), (False, False, True))), r[2][3](r[2][2](r[2][1](r[2][0](x))))
        )

        block = randomised_block().train()
        r = u(block)
        inner = (r[1][0](x) + r[2][1](r[2][0](x))) / 2
        torch.testing.assert_close(block(x, ((True, True), (True, True, False))), (r[0][0](x) + r[1][1](inner)) / 2)
    # dropped units do not run, so their batch-norm statistics stay where they were
    tracked = [[int(m.bn.num_batches_tracked) for m in column] for column in block.columns]
    assert tracked == [[1], [1, 1], [1, 1, 0, 0]]


def _catalog_summary(catalog: LayerCatalog, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(layer.name, layer.shape) for layer in catalog.select(kind)]


def test_layer_catalog_names_joins_logits_and_activations(fractalnet):
    catalog = LayerCatalog(fractalnet.module, 32)
    sides = (32, 16, 8, 4, 2)
    assert _catalog_summary(catalog, "blocks") == [
        (f"blocks.{i}.mean_1", (c, s, s)) for i, (c, s) in enumerate(zip(PAPER_CHANNELS, sides))
    ]
    assert _catalog_summary(catalog, "logits") == [("fc", (100,))]
    assert _catalog_summary(catalog, "pool") == [("avgpool", (512, 1, 1))]
    activations = catalog.select("activations")
    assert len(activations) == 35
    # the deepest column's first unit runs first
    assert (activations[0].name, activations[0].shape) == ("blocks.0.columns.2.0.relu", (64, 32, 32))


@pytest.mark.parametrize("name", ["fractalnet", "fractalnet_tiny"])
def test_deepest_kind_is_the_deepest_columns_first_unit_blocks_2_and_4_and_the_classifier(name):
    loaded = load_model(name)
    net = loaded.module
    channels = [block.columns[0][0].conv.out_channels for block in net.blocks]
    assert channels == (list(PAPER_CHANNELS) if name == "fractalnet" else [8, 16, 32, 32, 32])
    # the deepest column: 4 conv units, the whole depth of each block
    assert [len(block.columns[2]) for block in net.blocks] == [block.depth for block in net.blocks] == [4] * 5
    catalog = LayerCatalog(net, 32)
    layers = catalog.select("deepest")
    assert [(layer.name, layer.layer_index, layer.kind, layer.shape) for layer in layers] == [
        ("blocks.0.columns.2.0.relu", 0, "deepest", (channels[0], 32, 32)),
        ("blocks.1.columns.2.3.relu", 1, "deepest", (channels[1], 16, 16)),
        ("blocks.3.columns.2.3.relu", 2, "deepest", (channels[3], 4, 4)),
        ("fc", 3, "deepest", (100,)),
    ]
    # each node is its conv unit's output: the captured rows are a forward hook's on the unit, z-scored
    units = ["blocks.0.columns.2.0", "blocks.1.columns.2.3", "blocks.3.columns.2.3"]
    modules, hooked = dict(net.named_modules()), {}
    handles = [
        modules[u].register_forward_hook(lambda m, i, out, u=u: hooked.__setitem__(u, out.flatten(1).clone()))
        for u in units
    ]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, captured = catalog.capture_module(layers, torch.float32)(x)
        logits = net(x)  # last, so the hooks hold the plain model's unit outputs
    for h in handles:
        h.remove()
    for u, rows in zip(units + ["fc"], captured, strict=True):
        expected = logits if u == "fc" else hooked[u]
        centred = expected - expected.mean(1, keepdim=True)
        torch.testing.assert_close(rows, centred / centred.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)
    # with other kinds: a union in execution order, the deepest layers keep their kind
    both = catalog.select("blocks,deepest")
    assert [(layer.name, layer.kind) for layer in both][:3] == [
        ("blocks.0.columns.2.0.relu", "deepest"),
        ("blocks.0.mean_1", "blocks"),
        ("blocks.1.columns.2.3.relu", "deepest"),
    ]
    assert len(both) == 5 + 4


def test_extractor_captures_the_tiny_net():
    ex = ActivationExtractor("fractalnet_tiny", "blocks,logits", dtype="float32", device="cpu")
    assert [layer.name for layer in ex.layers] == [f"blocks.{i}.mean_1" for i in range(5)] + ["fc"]
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = ex({"pixels": pixels})
    with torch.no_grad():
        logits = load_model("fractalnet_tiny").module(ex.normalise(pixels))
    np.testing.assert_array_equal(out["predicted_index"], logits.argmax(1).numpy())
    assert out["blocks.4.mean_1"].shape == (3, 32 * 2 * 2)


def class_patterns(per_class: int = 50, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes*per_class, 3, 32, 32) images: a smooth colour pattern per class plus unit noise."""
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=32, mode="bilinear")
    labels = torch.arange(classes).repeat_interleave(per_class)
    return templates[labels] + torch.randn(len(labels), 3, 32, 32, generator=g), labels


def test_tiny_fractalnet_learns_with_drop_path():
    images, labels = class_patterns()
    model = load_model("fractalnet_tiny").module.train()
    assert (model.drop_path, model.global_drop_ratio) == (0.15, 0.5)
    epochs, batch = 12, 25
    steps = epochs * len(labels) // batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    torch.manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        correct = 0
        for idx in torch.randperm(len(labels)).split(batch):
            logits = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
    elapsed = time.perf_counter() - start
    # train accuracy of the last epoch, drop-path on: chance is 0.1
    assert correct / len(labels) > 0.8, (correct, elapsed)

    # Eval averages every column, as only some training batches did; batch norm's running
    # statistics come from drop-path batches, so re-estimate them on all-path batches.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for idx in torch.arange(len(labels)).split(100):
            model.forward_paths(images[idx], None)
        model.eval()
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.8


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path):
    model = load_model("fractalnet_tiny").module
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load_model(f"fractalnet_tiny:checkpoint={path}")
    assert loaded.name == f"fractalnet_tiny:checkpoint={path}"
    assert loaded.num_classes == 100 and not loaded.module.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model.eval()(x))
        assert not torch.allclose(load_model("fractalnet_tiny").module(x), model(x))


def test_wrong_architecture_checkpoint_names_the_mismatch(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(load_model("fractalnet_tiny").module.state_dict(), path)
    with pytest.raises(InputError, match=r"does not fit fractalnet:checkpoint=.*size mismatch for fc\.weight"):
        load_model(f"fractalnet:checkpoint={path}")
    torch.save(FractalNet(channels=(8, 16, 32, 32), dropout=(0.0,) * 4).state_dict(), path)  # one block short
    with pytest.raises(InputError, match=r"does not fit fractalnet_tiny:checkpoint=.*missing blocks\.4\."):
        load_model(f"fractalnet_tiny:checkpoint={path}")


def test_unknown_model_lists_fractalnet():
    with pytest.raises(InputError, match=r"choose one of .*fractalnet, fractalnet_tiny"):
        load_model("fractalnet_huge")
