"""``semprobe dynamics`` and ``semprobe train --words`` on a tiny FractalNet and a CIFAR-format dataset written here."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_cifar import write_cifar100
from test_run import by_hand_bhy, digest, naive_passes, stored_matrices

from semprobe.actors.trainer import to_input
from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError
from semprobe.datasets import schema
from semprobe.datasets.cifar import load_split, parse
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.checkpoints import checkpoints
from semprobe.ray_jobs.config import DynamicsConfig, TrainConfig
from semprobe.ray_jobs.dynamics import run_dynamics
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.train import run_train

TINY = {"model": "fractalnet_tiny", "batch_size": 50, "lr": 0.05}
# the default, 'deepest': the deepest column's first unit, its ends of blocks 2 and 4, and the classifier
LAYERS = ["blocks.0.columns.2.0.relu", "blocks.1.columns.2.3.relu", "blocks.3.columns.2.3.relu", "fc"]


# the analysis that `semprobe train --words` runs beside the trainer: the last layer, one set, 10 permutations
WITH_WORDS = {"words": "glove-50d", "sets": 1, "layers": "fc", "permutations": 10}


@pytest.fixture(scope="module")
def training(ray_session, tmp_path_factory):
    """A tiny FractalNet trained 1 epoch (checkpoints at 0 and 1: the initial and a trained model) on 4 training and
    2 test images per class, with --words: its checkpoints analysed as they come. Each checkpoint costs every test
    here an extraction per split, so two, not more; and every training costs a Ray Train start, so this one run is
    both the normal run of every test and the run of the training-with-words test. Returns (root, summary, logs)."""
    root = tmp_path_factory.mktemp("dynamics")
    write_cifar100(root / "data", n_train=400, n_test=200)
    logs = []
    cfg = TrainConfig(
        data=f"cifar100:{root / 'data'}", epochs=1, every=1, out=str(root / "run"), **WITH_WORDS, **TINY
    ).validate()
    summary = run_train(cfg, log=logs.append)
    return root, summary, logs


@pytest.fixture(scope="module")
def trained(training):
    return training[0]


@pytest.fixture(scope="module")
def analysed(trained):
    cfg = DynamicsConfig(
        runs=[str(trained / "run")],
        words=["glove-50d"],
        sets=2,
        permutations=30,
        permutation_shard=12,
        seed=5,
        dtype="float32",
        out=str(trained / "analysis"),  # RUN/dynamics holds the analysis beside training
    ).validate()
    summary = run_dynamics(cfg, log=lambda m: None)
    return cfg, trained / "analysis", summary


def test_every_checkpoint_and_split_is_scored_against_a_reference(analysed, trained):
    cfg, out, summary = analysed
    assert summary["checkpoints"] == 2 and summary["n_tests"] == 2 * 2 * len(LAYERS)
    table = pq.read_table(out / "dynamics.parquet")
    assert table.schema.remove_metadata() == schema.DYNAMICS
    by_set = pq.read_table(out / "dynamics_by_set.parquet")
    assert by_set.schema.remove_metadata() == schema.DYNAMICS_BY_SET
    means = table.to_pylist()
    rows = means + by_set.to_pylist()
    assert sorted((r["epoch"], r["split"], r["layer"]) for r in means) == sorted(
        (e, s, layer) for e in (0, 1) for s in ("train", "test") for layer in LAYERS
    )
    assert len(rows) == 3 * len(means)  # the mean and each of the 2 sets
    history = {h["epoch"]: h for h in pq.read_table(trained / "run" / "training.parquet").to_pylist()}
    assert all(
        (r["train_error"], r["test_error"]) == (history[r["epoch"]]["train_error"], history[r["epoch"]]["test_error"])
        for r in rows
    )
    # the last checkpoint's classifier on the test images, by hand
    last = checkpoints(Output(str(trained / "run")), "normal")[-1]
    model = load_model(f"fractalnet_tiny:checkpoint={last['path']}/model.pt")
    key = "normal/test/epoch-0001"
    manifest = pq.read_table(out / "extract" / key / "manifest.parquet").to_pylist()
    split = load_split(*parse(f"cifar100:{trained / 'data'}?split=test"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.preprocess.mean, model.preprocess.std))
    concepts = pq.read_table(out / "extract" / key / "concepts.parquet").to_pylist()
    word_of = {c["concept_id"]: c["word"] for c in concepts}
    ids = sorted(word_of)
    assert len(ids) == 100  # the nine two-word classes by the packaged concept-words table (maple_tree -> maple, ...)
    assert {c["word"] for c in concepts if c["concept_id"] == "maple_tree"} == {"maple"}
    word = np.corrcoef(load_word_model("glove-50d").vectors([word_of[c] for c in ids]).astype(np.float64))
    np.testing.assert_allclose(
        stored_matrices(out, "similarity", key, "words", "glove-50d.parquet")[0], word, atol=1e-6
    )
    for s in (0, 1):
        rows_of_set = sorted((m for m in manifest if m["set_index"] == s), key=lambda m: m["concept_id"])
        assert [m["concept_id"] for m in rows_of_set] == ids
        pixels = split.images[[int(m["uri"].rpartition("#")[2]) for m in rows_of_set]]
        unit = dict(model.module.named_modules())["blocks.1.columns.2.3"]  # the deepest column's end of block 2
        hooked = []
        handle = unit.register_forward_hook(lambda m, i, o, hooked=hooked: hooked.append(o.flatten(1).double().numpy()))
        with torch.no_grad():
            logits = model.module(to_input(torch.from_numpy(pixels), mean, std)).double().numpy()
        handle.remove()
        (c_img,) = stored_matrices(out, "similarity", key, "fc", f"set-{s:03d}.parquet")[:1]
        np.testing.assert_allclose(c_img, np.corrcoef(logits), atol=1e-5)
        (c_unit,) = stored_matrices(out, "similarity", key, "blocks.1.columns.2.3.relu", f"set-{s:03d}.parquet")[:1]
        np.testing.assert_allclose(c_unit, np.corrcoef(hooked[0]), atol=1e-5)
        (row,) = [r for r in rows if (r["epoch"], r["split"], r["layer"], r.get("set_index")) == (1, "test", "fc", s)]
        assert (
            row["accuracy"]
            == naive_passes(c_img, stored_matrices(out, "similarity", key, "words", "glove-50d.parquet")[0])[
                np.triu_indices(100, 1)
            ].mean()
        )
        assert (row["n_concepts"], row["n_pairs"], row["n_perm"]) == (100, 4950, 30)
    # one run, so one family (--family model: the run's epochs x splits x layers x word models); 16 tests of 30
    # permutations: even 16 p-values of 1/31 stay above 0.05 / c(16) = 0.0148, and the summary says so
    assert summary["family"] == "model"
    assert summary["families"] == [{"key": [str(trained / "run")], "m": 2 * 2 * len(LAYERS), "needed_at_min_p": None}]
    np.testing.assert_allclose([r["p_bhy"] for r in means], by_hand_bhy([r["p_value"] for r in means]))
    assert [r["significant"] for r in means] == [p <= 0.05 for p in by_hand_bhy([r["p_value"] for r in means])]
    assert (out / "figures" / "dynamics-glove-50d.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_what_is_missing_and_ends_identical(analysed):
    cfg, out, _ = analysed
    before = digest(out)
    again = run_dynamics(cfg, log=lambda m: None)
    assert (again["tests_computed"], again["gram_tasks"]) == (0, 0) and digest(out) == before
    # interrupted: one checkpoint's test and one of its matrices gone, and the reducer never ran
    for part in (
        ("tests", "normal", "train", "epoch-0001", "glove-50d", "fc.parquet"),
        ("similarity", "normal", "train", "epoch-0001", "fc", "set-001.parquet"),
        ("dynamics.parquet",),
    ):
        out.joinpath(*part).unlink()
    resumed = run_dynamics(DynamicsConfig(**{**cfg.to_dict(), "permutation_shard": 7}).validate(), log=lambda m: None)
    assert (resumed["tests_computed"], resumed["gram_tasks"]) == (1, 1)
    assert {k: v for k, v in digest(out).items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }


def test_training_with_words_analyses_its_checkpoints_as_they_come(training):
    trained, summary, logs = training
    assert summary["dynamics"]["checkpoints"] == 2 and summary["dynamics"]["n_tests"] == 2 * 2
    rows = pq.read_table(trained / "run" / "dynamics" / "dynamics.parquet").to_pylist()
    assert sorted({(r["epoch"], r["split"]) for r in rows}) == [(0, "test"), (0, "train"), (1, "test"), (1, "train")]
    assert any(m.startswith("dynamics: ") for m in logs)


def test_bad_dynamics_input_is_a_clear_error(trained, tmp_path):
    with pytest.raises(InputError, match="is not a semprobe train output folder"):
        run_dynamics(DynamicsConfig(runs=[str(tmp_path)]).validate(), log=lambda m: None)
    with pytest.raises(InputError, match="unknown split 'validation': choose train, test or train,test"):
        DynamicsConfig(runs=[str(tmp_path)], splits="validation").validate()
    with pytest.raises(InputError, match="--runs needs at least one name"):
        DynamicsConfig().validate()
    assert list(tmp_path.iterdir()) == []


def test_normal_and_permuted_runs_a_family_each(ray_session, trained, tmp_path):
    """Fig. 4's pair: the permuted-label control beside the normal run, one figure row and one BHY family each
    (--family model: a training run), so the control's tests do not dilute the normal run's."""
    permuted = TrainConfig(
        data=f"cifar100:{trained / 'data'}",
        epochs=1,
        every=1,
        permute_labels=True,
        out=str(trained / "permuted"),
        **TINY,
    ).validate()
    run_train(permuted, log=lambda m: None)
    cfg = DynamicsConfig(
        runs=[str(trained / "run"), permuted.out],
        splits="test",
        sets=1,
        layers="fc",
        permutations=10,
        out=str(tmp_path / "fig4"),
    ).validate()
    summary = run_dynamics(cfg, log=lambda m: None)
    means = pq.read_table(tmp_path / "fig4" / "dynamics.parquet").to_pylist()
    assert sorted((r["run_name"], r["epoch"]) for r in means) == [
        ("normal", 0),
        ("normal", 1),
        ("permuted", 0),
        ("permuted", 1),
    ]
    assert summary["checkpoints"] == 4 and {r["run"] for r in means} == {str(trained / "run"), permuted.out}
    for run in (str(trained / "run"), permuted.out):
        mine = [r for r in means if r["run"] == run]
        np.testing.assert_allclose([r["p_bhy"] for r in mine], by_hand_bhy([r["p_value"] for r in mine]))
    assert [(f["key"], f["m"]) for f in summary["families"]] == [([str(trained / "run")], 2), ([permuted.out], 2)]
    assert (tmp_path / "fig4" / "figures" / "dynamics-glove-50d.png").read_bytes()[:4] == b"\x89PNG"


def test_similarity_store_gives_the_same_dynamics_without_activations(analysed, tmp_path):
    """The matrices agree to float tolerance. The decisions agree wherever no 2 vs. 2 margin lies within that
    tolerance; this tiny network's deep layers are nearly constant across concepts (r = 0.993 +- 0.0014 between
    images at epoch 0), so a pair or two of 4,950 may tip: the forward pass runs over other batches (a set's images,
    not a shard's), and the CPU kernels round per batch shape at ~1e-6 in r. p-values and BHY do not move."""
    cfg, out, _ = analysed
    log = []
    fused = DynamicsConfig(**{**cfg.to_dict(), "out": str(tmp_path / "sim"), "store": "similarity"}).validate()
    summary = run_dynamics(fused, log=log.append)
    assert "store: similarity (--store similarity)" in log and summary["checkpoints"] == 2
    for epoch in (0, 1):
        for split in ("train", "test"):
            for layer in LAYERS:
                key = f"normal/{split}/epoch-{epoch:04d}"
                np.testing.assert_allclose(
                    stored_matrices(tmp_path / "sim", "similarity", key, layer),
                    stored_matrices(out, "similarity", key, layer),
                    atol=1e-5,
                )
    for name in ("dynamics.parquet", "dynamics_by_set.parquet"):
        fused_rows, rows = (pq.read_table(o / name).to_pylist() for o in (tmp_path / "sim", out))
        assert len(fused_rows) == len(rows)
        keys = ("run", "epoch", "split", "layer", "set_index", "p_value", "p_bhy", "significant")
        same = [k for k in keys if k in rows[0]]
        for f, r in zip(fused_rows, rows):
            assert {k: f[k] for k in same} == {k: r[k] for k in same}
            assert abs(f["accuracy"] - r["accuracy"]) <= 2 / r["n_pairs"]
    assert not [p for p in (tmp_path / "sim").rglob("*") if p.name == "activations"]
