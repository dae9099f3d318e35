"""`semprobe compare RUN...`: the runs' curves on relative depth, read from their tables (written here with the
product's own writers), the runs untouched; folders that are not finished runs refused with exit code 2."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semprobe.datasets import schema
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import CompareConfig, RunConfig
from semprobe.ray_jobs.startup import write_resolved
from semprobe.ray_jobs.storage import Output


def write_run(out: Path, curves: dict[tuple[str, str], list[tuple[str, float, bool]]], finished: bool = True):
    """A run's config.json, scores.parquet and summary.json, as `semprobe run` writes them: ``curves`` maps
    (model, word model) to its layers' (name, accuracy, significant)."""
    models = list(dict.fromkeys(m for m, _ in curves))
    words = list(dict.fromkeys(w for _, w in curves))
    cfg = RunConfig(models=models, words=words, out=str(out)).validate()
    output = Output(str(out))
    write_resolved(output, cfg, check_storage=False)
    rows = [
        {"model": m, "layer": name, "layer_index": i, "word_model": w, "accuracy": acc, "std": 0.0, "n_concepts": 20,
         "n_pairs": 190, "n_perm": 100, "null_mean": 0.5, "null_std": 0.03, "p_value": 0.01, "p_bhy": 0.02 if sig
         else 0.3, "significant": sig}
        for (m, w), layers in curves.items() for i, (name, acc, sig) in enumerate(layers)
    ]  # fmt: skip
    output.write_table(
        schema.stamp(pa.Table.from_pylist(rows, schema=schema.SCORES), cfg.experiment_id()), "scores.parquet"
    )
    if finished:
        output.write_json({"experiment_id": cfg.experiment_id()}, "summary.json")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def layers(n: int, seed: int) -> list[tuple[str, float, bool]]:
    rng = np.random.default_rng(seed)
    return [(f"block{i}", float(rng.uniform(0.45, 0.9)), bool(rng.random() < 0.5)) for i in range(n)]


@pytest.fixture
def two_runs(tmp_path):
    a = {("efficientnet_lite0", "glove-50d"): layers(16, 0), ("timm:resnet18", "glove-50d"): layers(8, 1)}
    b = {("efficientnet_lite0", "glove-50d"): layers(16, 2)}
    write_run(tmp_path / "run-a", a)
    write_run(tmp_path / "run-b", b)
    return tmp_path, a, b


def test_compare_two_runs_on_relative_depth_and_leaves_them_untouched(two_runs, capsys):
    root, a, b = two_runs
    before = {name: digest(root / name) for name in ("run-a", "run-b")}
    out = root / "cmp"
    assert main(["compare", str(root / "run-a"), str(root / "run-b"), "--out", str(out)]) == 0
    assert {name: digest(root / name) for name in ("run-a", "run-b")} == before  # read-only on the runs
    table = pq.read_table(out / "compare.parquet")
    assert table.schema.remove_metadata() == schema.COMPARE
    got = table.to_pylist()
    expected = []
    for run, curves in (("run-a", a), ("run-b", b)):
        for (model, _), line in curves.items():
            for i, (name, acc, sig) in enumerate(line):
                label = f"{run} · {model}"  # one word model: the labels name the run and the CNN
                expected.append((label, model, name, i / (len(line) - 1), acc, sig))
    assert [(r["label"], r["model"], r["layer"], r["depth"], r["accuracy"], r["significant"]) for r in got] == expected
    assert (out / "figures" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["identity"] == {"runs": [str(root / "run-a"), str(root / "run-b")], "words": None}
    assert (
        resolved["experiment_id"]
        == CompareConfig(runs=[str(root / "run-a"), str(root / "run-b")]).validate().experiment_id()
    )
    assert str(out / "figures" / "compare.png") in capsys.readouterr().err
    # the same command again: the same files
    again = digest(out)
    assert main(["compare", str(root / "run-a"), str(root / "run-b"), "--out", str(out)]) == 0
    assert digest(out) == again


def test_compare_one_run_names_its_cnns_and_filters_word_models(tmp_path):
    write_run(
        tmp_path / "r",
        {("m1", "glove-50d"): layers(5, 0), ("m1", "w2"): layers(5, 1), ("m2", "glove-50d"): layers(3, 2)},
    )
    cfg = CompareConfig(runs=[str(tmp_path / "r")], words=["glove-50d"], out=str(tmp_path / "o")).validate()
    from semprobe.ray_jobs.compare import run_compare

    summary = run_compare(cfg, log=lambda m: None)
    assert summary["curves"] == ["m1", "m2"]
    rows = pq.read_table(tmp_path / "o" / "compare.parquet").to_pylist()
    assert [r["depth"] for r in rows if r["model"] == "m2"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "setup, argv, culprit",
    [
        ("unfinished", ["RUN"], "is not a finished semprobe run (no summary.json)"),
        ("empty", ["RUN"], "is not a finished semprobe run (no config.json, scores.parquet, summary.json)"),
        ("finished", ["RUN", "--words", "fasttext"],
         "unknown word model 'fasttext' for these runs: choose from glove-50d"),
        ("finished", ["RUN", "--out", "RUN/cmp"], "lies inside the run"),
        ("finished", ["RUN", "RUN"], "runs must not repeat a name"),
        ("finished", ["RUN", "RUN/."], "names the run RUN twice: name each run once"),
        ("finished", [], "runs needs at least one name"),
    ],
)  # fmt: skip
def test_not_a_finished_run_is_exit_2_naming_it_and_writes_nothing(tmp_path, capsys, setup, argv, culprit):
    run = tmp_path / "run"
    run.mkdir()
    if setup != "empty":
        write_run(run, {("m", "glove-50d"): layers(4, 0)}, finished=setup == "finished")
    before = digest(tmp_path)
    argv = [a.replace("RUN", str(run)) for a in argv]
    out = tmp_path / "o"
    assert main(["compare", *argv, *([] if "--out" in argv else ["--out", str(out)])]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("semprobe: error: ") and culprit.replace("RUN", str(run)) in err and len(err.splitlines()) == 1
    )
    if setup != "finished":
        assert str(run) in err
    assert digest(tmp_path) == before and not out.exists()


def test_compare_print_config_loads_back(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "a"), "--words", "glove-50d", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["runs"] == [str(tmp_path / "a")] and resolved["words"] == ["glove-50d"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(resolved))
    assert main(["compare", "--config", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == resolved
