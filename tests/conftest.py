import os
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
