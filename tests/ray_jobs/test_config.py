"""The config classes: options declared once, on their fields; validation generated from them; ids unchanged."""

import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest
import tomllib

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs import config
from semprobe.ray_jobs.cli import JOBS
from semprobe.ray_jobs.config import (
    BHY_FAMILIES,
    INPUT_SPACES,
    ONE_VS_TWO_NULLS,
    PACKAGED_CONFIGS,
    TARGET_SIMILARITIES,
    AdversarialConfig,
    AffineConfig,
    DynamicsConfig,
    ExtractConfig,
    MisclassifiedConfig,
    ModelActors,
    Resources,
    RunConfig,
    TrainConfig,
    load_config,
    packaged_configs,
)

JOB_CONFIGS = [
    ExtractConfig,
    RunConfig,
    DynamicsConfig,
    AffineConfig,
    MisclassifiedConfig,
    AdversarialConfig,
    TrainConfig,
]

# The IDENTITY tuples the config classes declared before the options moved onto their fields.
IDENTITY = {
    ExtractConfig: (
        "images", "model", "layers", "words", "sets", "seed", "batch_size", "shard_size", "dtype", "store_format",
        "compression", "precropped", "concept_words",
    ),
    RunConfig: (
        "images", "models", "words", "sets", "layers", "permutations", "seed", "batch_size", "shard_size", "dtype",
        "family", "concept_words",
    ),
    DynamicsConfig: (
        "runs", "images", "splits", "words", "sets", "layers", "permutations", "seed", "batch_size", "shard_size",
        "dtype", "family", "concept_words",
    ),
    AffineConfig: ("models", "train", "val", "max_train", "seed", "shard_size"),
    MisclassifiedConfig: (
        "images", "model", "words", "layers", "references", "permutations", "seed", "batch_size", "shard_size",
        "dtype", "null", "concept_words", "sets",
    ),
    AdversarialConfig: (
        "images", "model", "words", "layers", "references", "permutations", "seed", "batch_size", "shard_size",
        "dtype", "sources", "targets_per_source", "pairs", "eps", "step", "steps", "momentum", "space",
        "attack_shard", "null", "target_similarity", "concept_words", "sets",
    ),
    TrainConfig: (
        "data", "model", "epochs", "lr", "momentum", "weight_decay", "batch_size", "permute_labels",
        "until_train_accuracy", "seed",
    ),
}  # fmt: skip

# Experiment ids: the same options must name the same experiment, or a rerun would refuse (or silently fail to
# resume) an existing output folder. Issue 15 changed them on purpose: the new identity options --family (BHY per
# CNN by default, was over every test), --null (the authors' row null, was the column null), --target-similarity
# (Pearson, was cosine), --concept-words (and one class per word), misclassified/adversarial --sets, the dynamics
# default layers (deepest, was blocks,logits) and affine's disjoint default images. Empty model_layers leaves the
# identity as it was.
EXPERIMENT_IDS = {
    "ExtractConfig()": "c06d0e15622b",
    "RunConfig()": "a557961e8045",
    "DynamicsConfig()": "5a86ccf3e12a",
    "AffineConfig()": "c3a38ab6020e",
    "MisclassifiedConfig()": "056ace9acb77",
    "AdversarialConfig()": "428ec550f614",
    "TrainConfig()": "2575fe8714d8",
    "ExtractConfig().validate()": "c06d0e15622b",
    "RunConfig().validate()": "a557961e8045",
    "AffineConfig().validate()": "c3a38ab6020e",
    "MisclassifiedConfig().validate()": "056ace9acb77",
    "AdversarialConfig().validate()": "428ec550f614",
    "DynamicsConfig(runs=['/data/run']).validate()": "c69e7144d352",
    "TrainConfig(data='cifar100:/data/cifar').validate()": "69c640ff930f",
    "packaged efficientnet-lite": "de7b546c62b4",
    "packaged naacl2018-imagenet": "874bea1d3768",
    "packaged naacl2018-misclassified": "880073f28e1c",
    "packaged nn2021-adversarial": "16b5d8cae80b",
    "packaged nn2021-fractalnet": "aad89140496c",
    "packaged nn2021-imagenet": "7f0a8395a0d1",
    "packaged thesis-affine": "e2e3aef88d0d",
    "AdversarialConfig(eps=1, step=0.5, space='0,1').validate()": "d19d6e129a81",
    "RunConfig(words='glove-50d, word2vec:/w.bin', models='a,b', sets=3).validate()": "e8c43e4a8e1a",
}


def experiment_ids() -> dict[str, str]:
    ids = {f"{cls.__name__}()": cls().experiment_id() for cls in JOB_CONFIGS}
    for cls in (ExtractConfig, RunConfig, AffineConfig, MisclassifiedConfig, AdversarialConfig):
        ids[f"{cls.__name__}().validate()"] = cls().validate().experiment_id()
    ids["DynamicsConfig(runs=['/data/run']).validate()"] = DynamicsConfig(runs=["/data/run"]).validate().experiment_id()
    ids["TrainConfig(data='cifar100:/data/cifar').validate()"] = (
        TrainConfig(data="cifar100:/data/cifar").validate().experiment_id()
    )
    for name in packaged_configs():
        command = tomllib.loads((resources.files(PACKAGED_CONFIGS) / f"{name}.toml").read_text()).get("command", "run")
        ids[f"packaged {name}"] = load_config(getattr(config, JOBS[command][2]), name, {}).experiment_id()
    ids["AdversarialConfig(eps=1, step=0.5, space='0,1').validate()"] = (
        AdversarialConfig(eps=1, step=0.5, space="0,1").validate().experiment_id()
    )
    ids["RunConfig(words='glove-50d, word2vec:/w.bin', models='a,b', sets=3).validate()"] = (
        RunConfig(words="glove-50d, word2vec:/w.bin", models="a,b", sets=3).validate().experiment_id()
    )
    return ids


def test_experiment_ids_are_those_of_the_code_before():
    assert experiment_ids() == EXPERIMENT_IDS


@pytest.mark.parametrize("cls", JOB_CONFIGS, ids=lambda c: c.__name__)
def test_identity_is_the_options_marked_on_their_fields_as_before(cls):
    assert sorted(cls().identity()) == sorted(IDENTITY[cls])


@pytest.mark.parametrize("cls", JOB_CONFIGS, ids=lambda c: c.__name__)
def test_every_option_has_help_that_does_not_restate_its_default(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata["help"]
        assert isinstance(text, str) and len(text) >= 8, f"{cls.__name__}.{f.name} has no help"
        assert "default" not in text.lower(), f"{cls.__name__}.{f.name}: the help appends the default itself"
        if f.default is None:
            assert f.metadata["none"], f"{cls.__name__}.{f.name}: say what None means"


def test_resources_are_declared_once():
    model_actors = {"actors", "gpus_per_actor", "cpus_per_actor", "torch_threads"}
    assert {f.name for f in dataclasses.fields(ModelActors)} == model_actors
    assert {f.name for f in dataclasses.fields(Resources)} == model_actors | {"decode_cpus", "actor_resources"}
    for cls in (ExtractConfig, RunConfig, DynamicsConfig, MisclassifiedConfig, AdversarialConfig):
        assert issubclass(cls, Resources)
    assert issubclass(AffineConfig, ModelActors) and not issubclass(AffineConfig, Resources)
    # no class below them declares a resource again (TrainConfig's workers are its own)
    for cls in JOB_CONFIGS[:-1]:
        for klass in cls.__mro__:
            if klass not in (ModelActors, Resources):
                again = set(vars(klass).get("__annotations__", {})) & (
                    model_actors | {"decode_cpus", "actor_resources"}
                )
                assert not again, f"{klass.__name__} declares {again} again"
    config_only = {f.name for cls in JOB_CONFIGS for f in dataclasses.fields(cls) if not f.metadata["flag"]}
    assert config_only == {"actor_resources", "model_layers"}


def test_statistics_options_default_to_the_papers_and_take_their_choices():
    assert (RunConfig().family, DynamicsConfig().family) == ("model", "model")
    assert (MisclassifiedConfig().null, AdversarialConfig().null, AdversarialConfig().target_similarity) == (
        "rows",
        "rows",
        "pearson",
    )
    assert RunConfig(family="model, word_model").validate().family == "model,word_model"
    other = RunConfig(family="all").validate()
    assert other.experiment_id() != RunConfig().validate().experiment_id()  # p_bhy differs: another experiment
    assert AdversarialConfig(null="columns", target_similarity="cosine").validate().identity()["null"] == "columns"


def test_statistics_choices_are_the_analysis():
    """The config imports no torch, so it names the choices itself: they must be the analysis's."""
    from semprobe.analysis.onevtwo import NULLS
    from semprobe.analysis.scores import FAMILIES
    from semprobe.analysis.similarity import PAIRED_SIMILARITY

    assert BHY_FAMILIES == tuple(FAMILIES)
    assert ONE_VS_TWO_NULLS == NULLS and TARGET_SIMILARITIES == tuple(PAIRED_SIMILARITY)


def test_input_spaces_are_the_attacks():
    from semprobe.actors.attack import SPACES

    assert INPUT_SPACES == tuple(SPACES)


def test_x_axes_are_the_figures():
    from semprobe.analysis.figures import X_AXES as DRAWN

    assert config.X_AXES == DRAWN
    assert RunConfig(x="depth").validate().experiment_id() == RunConfig().validate().experiment_id()  # figures only
    with pytest.raises(InputError, match="unknown x axis 'deep': choose one of names, depth"):
        RunConfig(x="deep").validate()


@pytest.mark.parametrize(
    "cfg, message",
    [
        (RunConfig(sets=2.9), "--sets must be an integer, got 2.9"),
        (RunConfig(sets="abc"), "--sets must be an integer, got 'abc'"),
        (RunConfig(permutations=True), "--permutations must be an integer, got true"),
        (RunConfig(alpha="x"), "--alpha must be a number, got 'x'"),
        (RunConfig(models=["a", 3]), """--models must be a list of names or a comma-separated string, got ["a", 3]"""),
        (ExtractConfig(precropped=1), "--precropped must be true or false, got 1"),
        (ExtractConfig(model=None), "--model must be a string, got null"),
        (ExtractConfig(actor_resources=[1]), "actor_resources must be a table of names to numbers, got [1]"),
        (TrainConfig(data="cifar100:/d", use_gpu="yes"), "--use-gpu must be true or false, got 'yes'"),
    ],
)
def test_wrong_types_are_refused_naming_the_option(cfg, message):
    with pytest.raises(InputError) as err:
        cfg.validate()
    assert str(err.value) == message


def test_ints_are_numbers_and_lists_may_be_comma_separated():
    cfg = AdversarialConfig(eps=1, step=0.5, space="0, 1", cpus_per_actor=2).validate()
    assert (cfg.eps, type(cfg.eps), cfg.space, cfg.cpus_per_actor) == (1, int, "[0,1]", 2)
    cfg = RunConfig(words="glove-50d, word2vec:/w.bin", models=("a", "b")).validate()
    assert (cfg.words, cfg.models) == (["glove-50d", "word2vec:/w.bin"], ["a", "b"])
    assert TrainConfig(data="cifar100:/d", until_train_accuracy=1).validate().until_train_accuracy == 1


@pytest.mark.parametrize(
    "cfg, message",
    [
        (RunConfig(sets=0), "--sets must be at least 1, got 0"),
        (RunConfig(permutations=-1), "--permutations must be at least 0, got -1"),
        (RunConfig(actors=0), "--actors must be at least 1, got 0"),
        (RunConfig(gpus_per_actor=-0.5), "--gpus-per-actor must be at least 0, got -0.5"),
        (RunConfig(words=""), "--words needs at least one name"),
        (RunConfig(words="a,b,a"), "--words must not repeat a name: a"),
        (DynamicsConfig(), "--runs needs at least one name"),
        (MisclassifiedConfig(references=4), "--references must be at least 5, got 4"),
        (AffineConfig(ridge=-1), "--ridge must be at least 0, got -1"),
        (AffineConfig(max_train=0), "--max-train must be at least 1, got 0"),
        (TrainConfig(data="cifar100:/d", max_failures=-2), "--max-failures must be at least -1, got -2"),
        (ExtractConfig(dtype="int8"), "unknown dtype 'int8': choose one of float16, float32"),
        (ExtractConfig(store_format="csv"), "unknown store format 'csv': choose one of arrow, parquet"),
        (RunConfig(gram_compute="float16"), "unknown gram_compute 'float16': choose one of float32, float64"),
        (AdversarialConfig(space="0,255"), "unknown input space '[0,255]': choose one of [0,1], [-1,1]"),
        (RunConfig(family="layer"), "unknown BHY family 'layer': choose one of all, model, model,word_model"),
        (
            DynamicsConfig(runs=["/r"], family="run"),
            "unknown BHY family 'run': choose one of all, model, model,word_model",
        ),
        (MisclassifiedConfig(null="images"), "unknown 1 vs. 2 null 'images': choose one of rows, columns"),
        (AdversarialConfig(target_similarity="l2"), "unknown target similarity 'l2': choose one of pearson, cosine"),
    ],
)
def test_minimums_and_choices_are_refused_naming_the_option(cfg, message):
    with pytest.raises(InputError) as err:
        cfg.validate()
    assert str(err.value) == message


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ExtractConfig(shard_size=48, batch_size=32), "--shard-size 48 must be a multiple of --batch-size 32"),
        (RunConfig(shard_size=10, batch_size=4), "--shard-size 10 must be a multiple of --batch-size 4"),
        (
            ExtractConfig(compression="snappy"),
            "compression 'snappy' is not available for arrow: choose one of none, lz4, zstd",
        ),
        (RunConfig(alpha=1), "--alpha must lie between 0 and 1, got 1"),
        (
            AdversarialConfig(step=2.5),
            "--step 2.5 lies outside the range of the input space [-1,1]: choose 0 < step <= 2",
        ),
        (
            AffineConfig(models="efficientnet_lite0"),
            "--models needs at least two different CNNs, got efficientnet_lite0",
        ),
        (DynamicsConfig(runs="/r", splits="train,val"), "unknown split 'val': choose train, test or train,test"),
        (DynamicsConfig(runs="/r", poll_seconds=0), "--poll-seconds must be positive, got 0"),
        (
            TrainConfig(data="cifar100:/d", batch_size=10, workers=3),
            "--batch-size 10 must be a multiple of --workers 3",
        ),
        (
            TrainConfig(data="cifar100:/d", until_train_accuracy=1.5),
            "--until-train-accuracy must lie in (0, 1], got 1.5",
        ),
        (
            RunConfig(actor_resources={"GPU": 1}),
            "actor_resources names GPU: use cpus_per_actor / gpus_per_actor for those",
        ),
    ],
)
def test_rules_between_options_keep_their_messages(cfg, message):
    with pytest.raises(InputError) as err:
        cfg.validate()
    assert str(err.value) == message


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("job.yaml", "sets: 2.9\n", "sets in {path} must be an integer, got 2.9"),
        ("job.toml", 'sets = "abc"\n', "sets in {path} must be an integer, got 'abc'"),
        ("job.yaml", "permutations: true\n", "permutations in {path} must be an integer, got true"),
        ("job.yaml", 'alpha: "x"\n', "alpha in {path} must be a number, got 'x'"),
        ("job.json", '{"words": ["glove-50d", 5]}', 'words in {path} must be a list of names or a comma-separated '
         'string, got ["glove-50d", 5]'),
        ("job.toml", "actor_resources = 2\n", "actor_resources in {path} must be a table of names to numbers, got 2"),
        ("job.toml", "permutation = 5\n", "unknown config option 'permutation' in {path}: choose from "),
    ],
)  # fmt: skip
def test_a_config_file_with_a_wrong_type_is_refused_naming_option_and_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(RunConfig, str(path), {})
    assert str(err.value).startswith(message.format(path=path))


def test_a_config_file_sets_config_only_options_and_json_floats(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"alpha": 1e-05, "actor_resources": {"accelerator": 1}, "sets": 2}))
    cfg = load_config(RunConfig, str(path), {"sets": 3})
    assert (cfg.alpha, cfg.actor_resources, cfg.sets) == (1e-05, {"accelerator": 1}, 3)
    assert cfg.out == str(Path.cwd() / "runs" / cfg.experiment_id())


def test_a_job_extracts_with_its_own_extraction_options():
    job = RunConfig(
        layers="pool", seed=3, batch_size=4, shard_size=8, dtype="float32", actors=2, actor_resources={"acc": 1}
    ).validate()
    ecfg = job.extract_config("efficientnet_lite1", "/out/extract", ["glove-50d"], 2)
    assert ecfg.to_dict() == {
        **ExtractConfig().to_dict(),
        "images": "sample:imagenet",
        "model": "efficientnet_lite1",
        "out": "/out/extract",
        "layers": "pool",
        "words": ["glove-50d"],
        "sets": 2,
        "seed": 3,
        "batch_size": 4,
        "shard_size": 8,
        "dtype": "float32",
        "actors": 2,
        "actor_resources": {"acc": 1},
        "word_cache": str(Path(job.out).parent / ".semprobe-words"),  # the job's, beside its --out
    }


def test_to_dict_rebuilds_the_same_config():
    cfg = AdversarialConfig(eps=0.5, space="0,1", actors=2).validate()
    again = AdversarialConfig(**cfg.to_dict()).validate()
    assert (again.to_dict(), again.experiment_id()) == (cfg.to_dict(), cfg.experiment_id())
    assert list(cfg.to_dict())[-8:] == [
        "actors",
        "gpus_per_actor",
        "cpus_per_actor",
        "torch_threads",
        "decode_cpus",
        "actor_resources",
        "task_cpus",
        "task_gpus",
    ]  # resources last


def test_model_layers_gives_each_model_its_own_layer_spec():
    """NAACL: VGG-16 at pixels,activations,softmax, Inception-v3 at pixels,mixed; a third model at --layers."""
    models = ["torchvision:vgg16", "torchvision:inception_v3", "efficientnet_lite0"]
    table = {"torchvision:vgg16": "pixels,activations,softmax", "torchvision:inception_v3": "pixels,mixed"}
    cfg = RunConfig(models=models, layers="blocks", model_layers=table).validate()
    got = {m: cfg.extract_config(m, f"/out/{m}", ["glove-50d"], 1).layers for m in models}
    assert got == {**table, "efficientnet_lite0": "blocks"}
    assert cfg.identity()["model_layers"] == table
    plain = RunConfig(models=models, layers="blocks").validate()
    assert "model_layers" not in plain.identity()  # empty: the ids of runs before the option stay
    assert plain.experiment_id() != cfg.experiment_id()
    assert RunConfig(models=models, layers="blocks", model_layers={}).validate().experiment_id() == (
        plain.experiment_id()
    )
    again = RunConfig(**cfg.to_dict()).validate()
    assert (again.model_layers, again.experiment_id()) == (table, cfg.experiment_id())


def test_model_layers_from_a_config_file(tmp_path):
    path = tmp_path / "naacl.toml"
    path.write_text(
        'models = ["torchvision:vgg16", "torchvision:inception_v3"]\n'
        '[model_layers]\n"torchvision:inception_v3" = "pixels,mixed"\n'
    )
    cfg = load_config(RunConfig, str(path), {})
    assert cfg.model_layers == {"torchvision:inception_v3": "pixels,mixed"}
    assert cfg.layers_of("torchvision:vgg16") == cfg.layers == "blocks"
    assert cfg.layers_of("torchvision:inception_v3") == "pixels,mixed"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model_layers": {"resnet50": "mixed"}},
         "model_layers names 'resnet50', which is not in --models: choose from efficientnet_lite0"),
        ({"model_layers": {"efficientnet_lite0": 3}},
         "model_layers must be a table of names to strings, got {\"efficientnet_lite0\": 3}"),
        ({"model_layers": ["pixels"]}, "model_layers must be a table of names to strings, got [\"pixels\"]"),
        ({"model_layers": {"efficientnet_lite0": " , "}}, "model_layers gives 'efficientnet_lite0' no layers"),
    ],
)  # fmt: skip
def test_model_layers_refuses_bad_tables_naming_the_culprit(values, message):
    with pytest.raises(InputError) as err:
        RunConfig(**values).validate()
    assert str(err.value).startswith(message)
