"""The config classes: options declared once, on their fields; validation generated from them; ids unchanged."""

import dataclasses
import json
from pathlib import Path

import pytest

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.config import (
    INPUT_SPACES,
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
        "compression", "precropped",
    ),
    RunConfig: (
        "images", "models", "words", "sets", "layers", "permutations", "seed", "batch_size", "shard_size", "dtype",
    ),
    DynamicsConfig: (
        "runs", "images", "splits", "words", "sets", "layers", "permutations", "seed", "batch_size", "shard_size",
        "dtype",
    ),
    AffineConfig: ("models", "train", "val", "max_train", "seed", "shard_size"),
    MisclassifiedConfig: (
        "images", "model", "words", "layers", "references", "permutations", "seed", "batch_size", "shard_size",
        "dtype",
    ),
    AdversarialConfig: (
        "images", "model", "words", "layers", "references", "permutations", "seed", "batch_size", "shard_size",
        "dtype", "sources", "targets_per_source", "pairs", "eps", "step", "steps", "momentum", "space",
        "attack_shard",
    ),
    TrainConfig: (
        "data", "model", "epochs", "lr", "momentum", "weight_decay", "batch_size", "permute_labels",
        "until_train_accuracy", "seed",
    ),
}  # fmt: skip

# Experiment ids computed with the code before this change (commit 1a5570e): the same options must name the
# same experiment, or a rerun would refuse (or silently fail to resume) an existing output folder. Changed on
# purpose by issue 15's fidelity fixes: DynamicsConfig (layers default to the paper's 'deepest') and AffineConfig
# (train and val default to disjoint halves of the samples).
EXPERIMENT_IDS = {
    "ExtractConfig()": "a0fd76131979",
    "RunConfig()": "e2498b78f686",
    "DynamicsConfig()": "3f88cdfd2b7d",
    "AffineConfig()": "c3a38ab6020e",
    "MisclassifiedConfig()": "c120a699b693",
    "AdversarialConfig()": "6304929da3f8",
    "TrainConfig()": "2575fe8714d8",
    "ExtractConfig().validate()": "a0fd76131979",
    "RunConfig().validate()": "e2498b78f686",
    "DynamicsConfig(runs=['/data/run']).validate()": "903f26792669",
    "AffineConfig().validate()": "c3a38ab6020e",
    "MisclassifiedConfig().validate()": "c120a699b693",
    "AdversarialConfig().validate()": "6304929da3f8",
    "TrainConfig(data='cifar100:/data/cifar').validate()": "69c640ff930f",
    "packaged efficientnet-lite": "b20d10ee3436",
    "packaged naacl2018-imagenet": "8d827f84a89d",
    "packaged nn2021-imagenet": "62acb275d12d",
    "AdversarialConfig(eps=1, step=0.5, space='0,1').validate()": "fbc7fadd6dd0",
    "RunConfig(words='glove-50d, word2vec:/w.bin', models='a,b', sets=3).validate()": "119a089b6e06",
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
        ids[f"packaged {name}"] = load_config(RunConfig, name, {}).experiment_id()
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
    assert config_only == {"actor_resources"}


def test_input_spaces_are_the_attacks():
    from semprobe.actors.attack import SPACES

    assert INPUT_SPACES == tuple(SPACES)


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
    }


def test_to_dict_rebuilds_the_same_config():
    cfg = AdversarialConfig(eps=0.5, space="0,1", actors=2).validate()
    again = AdversarialConfig(**cfg.to_dict()).validate()
    assert (again.to_dict(), again.experiment_id()) == (cfg.to_dict(), cfg.experiment_id())
    assert list(cfg.to_dict())[-7:] == [
        "actors",
        "gpus_per_actor",
        "cpus_per_actor",
        "torch_threads",
        "decode_cpus",
        "actor_resources",
        "task_cpus",
    ]  # resources last
