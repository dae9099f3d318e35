"""The job commands' flags, generated from their config classes: help that agrees with the defaults, one-line
errors for wrong types and values, and --print-config. None of these start Ray."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from semprobe.ray_jobs import config
from semprobe.ray_jobs.cli import JOBS, main

CONFIG_HELP = "TOML, YAML or JSON file (or a packaged config's name); flags override it"


def option_help(command: str, capsys, monkeypatch) -> dict[str, str]:
    """flag -> its help, read off `semprobe COMMAND --help` printed wide enough for one line per help."""
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    helps, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        invocation = re.match(r"^  (--[\w-]+)(?: \S+)?(?:, --no-[\w-]+)?(?:\s{2,}(.*))?$", line)
        if invocation:
            flag, text = invocation.groups()
            helps[flag] = text or ""
        elif flag and line.startswith(" " * 20):
            helps[flag] += line.strip()
        else:
            flag = None
    return helps


def shown(f: dataclasses.Field) -> str:
    """The default as the help should show it (what None means; 'none' for an empty value)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return f.metadata["none"]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return ",".join(value) or "none"
    return str(value) or "none"


def job_class(command: str) -> type:
    return getattr(config, JOBS[command][2])


@pytest.mark.parametrize("command", list(JOBS))
def test_flags_are_the_fields_not_config_only_each_with_its_default_once(command, capsys, monkeypatch):
    cls = job_class(command)
    helps = option_help(command, capsys, monkeypatch)
    flags = {f"--{f.name.replace('_', '-')}": f for f in dataclasses.fields(cls) if f.metadata["flag"]}
    assert set(helps) == set(flags) | {"--config", "--print-config"}
    assert helps["--config"] == CONFIG_HELP
    for flag, f in flags.items():
        assert helps[flag].count("(default: ") == 1, helps[flag]
        assert helps[flag] == f"{f.metadata['help']} (default: {shown(f)})"


@pytest.mark.parametrize(
    "command, flag, text",
    [
        ("run", "--permutations", "permutations for the null (0: no p-values) (default: 1000)"),
        ("run", "--sets", "K disjoint image sets, one image per concept each (default: 1)"),
        ("run", "--actors", "model actors (default: one per GPU in the cluster, or 1 without GPUs)"),
        ("run", "--seed", "seeds the image sets and the permutations of the null (default: 0)"),
        ("run", "--batch-size", "images per forward pass of a model actor (default: 32)"),
        ("run", "--out", "output folder or s3:// / gs:// URI (default: runs/<experiment id>, so the same command "
         "resumes)"),
        ("dynamics", "--sets", "K disjoint image sets of each split, one image per class each (default: 5)"),
        ("dynamics", "--layers", "kinds (pixels, activations, concat, mixed, blocks, pool, logits, softmax; "
         "FractalNet: "
         "deepest) and/or node names, comma-separated (deepest: the paper's, the deepest column's first conv unit, its "
         "ends of blocks 2 and 4, and the classifier; blocks,logits: every block's join and the classifier) "
         "(default: deepest)"),
        ("train", "--layers", "with --words: the layers to analyse (default: as semprobe dynamics: deepest)"),
        ("dynamics", "--alpha", "Benjamini-Hochberg-Yekutieli false discovery rate within each --family "
         "(default: 0.05)"),
        ("dynamics", "--family", "BHY family: all (every run x epoch x split x layer x word model), model (one "
         "training run: its epochs x splits x layers x word models), model,word_model (one run against one word "
         "model) (default: model)"),
        ("misclassified", "--null", "1 vs. 2 null: rows (the authors': which image gets which word-correlation "
         "vector, shuffled apart on the true and predicted side) or columns (the reference words permuted) "
         "(default: rows)"),
        ("train", "--sets", "with --words: K image sets of each split (default: as semprobe dynamics: 5)"),
        ("extract", "--layers", "kinds (pixels, activations, concat, mixed, blocks, pool, logits, softmax; "
         "FractalNet: "
         "deepest) and/or node names, comma-separated (default: activations)"),
        ("extract", "--seed", "seeds the image sets (default: 0)"),
        ("extract", "--words", "word models, comma-separated: glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH, "
         "table:PATH, table:DIR, nondist:PATH; only classes one of them names are extracted (default: none)"),
        ("misclassified", "--concept-words", "a .csv or .parquet table of class (wnid, ImageNet index or CIFAR-100 "
         "name) -> word that overrides the lemma match for the classes it names; 'none': the lemma match alone "
         "(default: the packaged table of the class space: for CIFAR-100, its nine two-word classes; ImageNet "
         "none)"),
        ("affine", "--batch-size", "images per forward pass of a model actor (default: 32)"),
        ("adversarial", "--out", "output folder or s3:// / gs:// URI (default: runs/adversarial-<experiment id>)"),
    ],
)  # fmt: skip
def test_help_lines(command, flag, text, capsys, monkeypatch):
    assert option_help(command, capsys, monkeypatch)[flag] == text


def test_extract_says_its_store_is_arrow_ipc(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit):
        main(["--help"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("extract ")]
    assert line.split(None, 1)[1] == (
        "capture every chosen layer of a CNN into an activation store of Arrow IPC files (Parquet with "
        "--store-format parquet)"
    )


def printed(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out)


def test_words_are_comma_separated_in_extract(tmp_path, capsys):
    assert main(["extract", "--words", "glove-50d, word2vec:/w.bin", "--out", str(tmp_path), "--print-config"]) == 0
    assert printed(capsys)["words"] == ["glove-50d", "word2vec:/w.bin"]


# Required options of the commands that have some, so that their defaults validate.
REQUIRED = {"dynamics": {"runs": "/data/run"}, "train": {"data": "cifar100:/data/cifar"}}


@pytest.mark.parametrize("command", list(JOBS))
def test_print_config_loads_back_to_the_same_config_without_ray(command, tmp_path, capsys, monkeypatch):
    import ray

    from semprobe.ray_jobs import startup

    def refuse(*args, **kwargs):  # whatever Ray the test session already holds, --print-config must not reach it
        raise AssertionError("--print-config joined a Ray cluster")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(startup, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    cls, required = job_class(command), REQUIRED.get(command, {})
    flags = [arg for name, value in required.items() for arg in (f"--{name}", value)]
    assert main([command, *flags, "--seed", "7", "--print-config"]) == 0
    resolved = printed(capsys)
    expected = config.load_config(cls, None, {**required, "seed": 7})
    assert resolved == expected.to_dict()
    assert list(resolved) == [f.name for f in config.options(cls)]  # every option, config-only ones too
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(resolved))
    assert main([command, "--config", str(path), "--print-config"]) == 0
    assert printed(capsys) == resolved
    again = config.load_config(cls, str(path), {})
    assert (again.to_dict(), again.experiment_id()) == (expected.to_dict(), expected.experiment_id())
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.json"]  # nothing written


def test_print_config_resolves_defaults_then_file_then_flags(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text('sets = 3\nwords = "glove-50d"\nfollow = true\nactor_resources = {accelerator = 1}\n')
    argv = ["dynamics", "--config", str(path), "--runs", "/r1,/r2", "--sets", "4", "--no-follow", "--print-config"]
    assert main(argv) == 0
    resolved = printed(capsys)
    cfg = config.DynamicsConfig(
        runs=["/r1", "/r2"], sets=4, words=["glove-50d"], actor_resources={"accelerator": 1}
    ).validate()
    assert resolved == cfg.to_dict()
    assert (resolved["sets"], resolved["follow"], resolved["permutations"]) == (4, False, 1000)
    assert resolved["out"] == str(Path.cwd() / "runs" / f"dynamics-{cfg.experiment_id()}")


def cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("job.yaml", "sets: 2.9\n", "sets in {path} must be an integer, got 2.9"),
        ("job.toml", 'sets = "abc"\n', "sets in {path} must be an integer, got 'abc'"),
        ("job.yaml", "permutations: true\n", "permutations in {path} must be an integer, got true"),
        ("job.yaml", 'alpha: "x"\n', "alpha in {path} must be a number, got 'x'"),
    ],
)
def test_wrong_types_in_a_config_file_are_one_line_exit_2(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    argv = ["run", "--config", str(path), "--out", str(tmp_path / "out")]
    assert cli_error(argv, capsys) == f"semprobe: error: {message.format(path=path)}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--sets", "2.9"], "--sets must be an integer, got '2.9'"),
        (["run", "--sets", "abc"], "--sets must be an integer, got 'abc'"),
        (["run", "--alpha", "x"], "--alpha must be a number, got 'x'"),
        (["run", "--permutations", "true"], "--permutations must be an integer, got 'true'"),
        (["train", "--data", "cifar100:/d", "--lr", "fast"], "--lr must be a number, got 'fast'"),
        (["run", "--sets", "0"], "--sets must be at least 1, got 0"),
        (["run", "--actors", "0"], "--actors must be at least 1, got 0"),
        (["run", "--words", "glove-50d,glove-50d"], "--words must not repeat a name: glove-50d"),
        (["extract", "--dtype", "int8"], "unknown dtype 'int8': choose one of float16, float32"),
        (["extract", "--store-format", "csv"], "unknown store format 'csv': choose one of arrow, parquet"),
        (["run", "--gram-compute", "float16"], "unknown gram_compute 'float16': choose one of float32, float64"),
        (["adversarial", "--space", "0,255"], "unknown input space '[0,255]': choose one of [0,1], [-1,1]"),
        (["misclassified", "--references", "4"], "--references must be at least 5, got 4"),
        (["affine", "--max-train", "0"], "--max-train must be at least 1, got 0"),
    ],
)
def test_wrong_flags_are_one_line_exit_2(argv, message, capsys):
    assert cli_error([*argv, "--print-config"], capsys) == f"semprobe: error: {message}\n"
