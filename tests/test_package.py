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
