"""The packaged paper configs measure what the papers measured: every field against the papers' setups,
written out here from the papers (issue 15), and the layers each CNN gets counted on the real architectures."""

import pytest

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import untrained
from semprobe.analysis.errors import InputError
from semprobe.ray_jobs import config
from semprobe.ray_jobs.cli import JOBS
from semprobe.ray_jobs.config import load_config, packaged_configs

V1 = "?weights=IMAGENET1K_V1"
RESNET50, INCEPTION, VGG16 = (f"torchvision:{m}{V1}" for m in ("resnet50", "inception_v3", "vgg16"))
SKIPGRAM = "word2vec:/data/words/GoogleNews-vectors-negative300.bin"
GLOVE300 = "glove:/data/words/glove.6B.300d.txt"

# config -> (command, the fields the paper fixes)
PAPERS = {
    "nn2021-imagenet": (
        "run",
        {
            "models": [RESNET50, INCEPTION],
            "words": [
                SKIPGRAM,
                GLOVE300,
                "table:/data/words/elmo-average.parquet",
                "fasttext:/data/words/lexvec.commoncrawl.300d.W.pos.vectors",
                "fasttext:/data/words/wiki-news-300d-1M.vec",
                "nondist:/data/words/binary-vectors.txt.gz",
            ],
            "layers": "pixels,activations,mixed",
            "model_layers": {},
            "sets": 5,
            "permutations": 1000,
            "family": "model",
            "alpha": 0.05,
        },
    ),
    "naacl2018-imagenet": (
        "run",
        {
            "models": [VGG16, RESNET50, INCEPTION],
            "words": [
                SKIPGRAM,
                "glove:/data/words/rnnlm-640d.txt",
                GLOVE300,
                "glove:/data/words/cca-de-en-512d.txt",
            ],
            "layers": "pixels,activations",
            "model_layers": {VGG16: "pixels,activations,softmax", INCEPTION: "pixels,mixed"},
            "sets": 5,
            "permutations": 1000,
            "family": "model",
        },
    ),
    "naacl2018-misclassified": (
        "misclassified",
        {"model": VGG16, "words": SKIPGRAM, "layers": "pixels,activations,softmax", "sets": 1, "null": "rows"},
    ),
    "nn2021-adversarial": (
        "adversarial",
        {
            "model": INCEPTION,
            "sources": 100,
            "targets_per_source": 6,
            "target_similarity": "pearson",
            "eps": 0.3,
            "step": 0.06,
            "momentum": 1.0,
            "steps": 20,
            "space": "[-1,1]",
            "null": "rows",
        },
    ),
    "nn2021-fractalnet": (
        "train",
        {
            "model": "fractalnet",
            "epochs": 400,
            "every": 5,
            "lr": 0.02,
            "momentum": 0.9,
            "batch_size": 100,
            "permute_labels": False,
            "words": [GLOVE300],
            "sets": 5,
            "layers": "deepest",
            "permutations": 1000,
        },
    ),
    "thesis-affine": (
        "affine",
        {
            "models": [
                f"torchvision:googlenet{V1}&input_size=331",
                "timm:inception_v3.tf_in1k?input_size=331",
                "timm:inception_v4.tf_in1k?input_size=331",
                "timm:inception_resnet_v2.tf_in1k?input_size=331",
                "timm:mobilenetv2_140.ra_in1k?input_size=224",
                "timm:resnet152.tv_in1k?input_size=331",
                "timm:resnetv2_152x2_bit.goog_in21k_ft_in1k?input_size=331",
                "timm:nasnetalarge.tf_in1k?input_size=331",
                "timm:pnasnet5large.tf_in1k?input_size=331",
            ],
            "train": "/data/imagenet/train",
            "val": "/data/imagenet/val",
            "allow_overlap": False,
        },
    ),
}


def paper_config(name: str):
    command, _ = PAPERS[name]
    return load_config(getattr(config, JOBS[command][2]), name, {})


def test_every_paper_is_packaged():
    assert set(PAPERS) | {"efficientnet-lite"} == set(packaged_configs())


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_packaged_paper_config_has_the_papers_values(name):
    cfg = paper_config(name)
    _, expected = PAPERS[name]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.seed == 0


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_another_command_refuses_a_paper_config_naming_the_right_one(name):
    command, _ = PAPERS[name]
    other = "run" if command != "run" else "affine"
    with pytest.raises(InputError, match=f"is for semprobe {command}, not semprobe {other}"):
        load_config(getattr(config, JOBS[other][2]), name, {})


def _layers(model: str, spec: str) -> dict[str, int]:
    loaded = untrained(model)
    catalog = LayerCatalog(loaded.module, loaded.preprocess.size)
    kinds: dict[str, int] = {}
    for layer in catalog.select(spec):
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    return kinds


@pytest.mark.parametrize(
    ("name", "model", "counts"),
    [
        # NN2021: ResNet-50's 49 activations and Inception-v3's 94 activations and 11 mixed, each with pixels.
        ("nn2021-imagenet", RESNET50, {"pixels": 1, "activations": 49}),
        ("nn2021-imagenet", INCEPTION, {"pixels": 1, "activations": 94, "mixed": 11}),
        # NAACL: VGG-16's 13 conv and 2 dense layers and the softmax; Inception-v3 at the mixed layers only.
        ("naacl2018-imagenet", VGG16, {"pixels": 1, "activations": 15, "softmax": 1}),
        ("naacl2018-imagenet", RESNET50, {"pixels": 1, "activations": 49}),
        ("naacl2018-imagenet", INCEPTION, {"pixels": 1, "mixed": 11}),
    ],
)
def test_each_cnn_gets_the_papers_layers(name, model, counts):
    cfg = paper_config(name)
    assert _layers(model, cfg.model_layers.get(model, cfg.layers)) == counts
