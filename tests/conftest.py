import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-300"


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (starting one takes ~10 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_sample() -> Path:
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"development images not present at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


# A line a Ray worker or actor printed, forwarded to the driver (e.g. Ray Train's placement-group
# cleaner, which warns while no dashboard serves the State API); it may land in any later test's capture.
_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+(, ip=[\d.]+)?\)")


def cli_stderr(capsys) -> str:
    """What the command itself wrote to stderr since the last read, without lines forwarded from Ray workers."""
    return "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if not _FORWARDED.match(line))
