import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Ray Train's controller polls its workers every 2 s: each of a run's phases (workers up, training done) waits up to a
# poll for the next. A tiny test training is a few seconds of steps, so the tests' runs poll 10 times as often (the
# drivers pass it on to their controllers; subprocess drivers inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Nor do they start Ray Train's preemption watcher, an actor process per run that polls for spot instances being
# reclaimed: a test machine has none.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Tests share their references across rooms (test_dynamics takes test_run's naive 2 vs. 2, test_adversarial
# test_attack's MIM): every test folder is importable, whichever tests a run selects.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name[0] not in "._"):
    sys.path.insert(0, str(_folder))

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-300"


def pytest_collection_modifyitems(items):
    """Every test on the session's Ray is marked ``ray`` (those that start a cluster of their own say so themselves):
    ``pytest -m "not ray"`` runs the math and table tests alone, in about a minute."""
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (starting one takes ~10 s)."""
    import ray

    # never a cluster another test started; idle workers are kept (the default keeps num_cpus), so a test's tasks
    # find workers that have imported torch already rather than each job paying ~10 s of imports again
    ray.init(address="local", num_cpus=2, include_dashboard=False, _system_config={"num_workers_soft_limit": 8})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def default_run(ray_session, tmp_path_factory) -> Path:
    """`semprobe run` with no arguments, as a new user types it; its output folder."""
    from semprobe.ray_jobs.cli import main

    cwd = tmp_path_factory.mktemp("default")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert main(["run"]) == 0
    (out,) = (cwd / "runs").iterdir()
    return out


# A small main job: 13 images in 7 shards of 2, three layers, 60 permutations in shards of 20.
BASE = {
    "images": "sample:imagenet",
    "layers": "blocks.1.0.bn3,blocks.3.1.add,blocks.5.1.add",
    "permutations": 60,
    "permutation_shard": 20,
    "batch_size": 2,
    "shard_size": 2,
}


def tables(out: Path) -> dict[str, bytes]:
    """Every table (Parquet, Arrow) under an output folder, by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".parquet", ".arrow")
    }


@pytest.fixture(scope="session")
def single_node(ray_session, tmp_path_factory) -> Path:
    """BASE run on one node (the tests' Ray): the reference the cluster, fault and storage tests must match
    byte for byte."""
    from semprobe.ray_jobs.config import RunConfig
    from semprobe.ray_jobs.run import run

    out = tmp_path_factory.mktemp("single") / "out"
    run(RunConfig(**BASE, out=str(out), actors=1).validate(), log=lambda m: None)
    return out


@pytest.fixture
def shared_sample() -> Path:
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"development images not present at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


# A line a Ray worker or actor printed, forwarded to the driver (e.g. Ray Train's placement-group
# cleaner, which warns while no dashboard serves the State API); it may land in any later test's capture.
# The raylet's own warnings (e.g. that many worker processes have started, with the session's idle workers kept)
# come the same way, on stdout, as "(raylet) ...".
_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((raylet|\w+ pid=\d+)(, ip=[\d.]+)?\)")


def own_lines(text: str) -> str:
    """``text`` without the lines Ray forwarded from its workers and raylets."""
    return "".join(line for line in text.splitlines(keepends=True) if not _FORWARDED.match(line))


def cli_stderr(capsys) -> str:
    """What the command itself wrote to stderr since the last read, without lines forwarded from Ray workers."""
    return own_lines(capsys.readouterr().err)


def until_cpus_free(ray_session, deadline: float, why: str) -> None:
    """Wait until every CPU of the session's Ray is free again (e.g. once Ray has ended a killed driver's actors and
    tasks, so that nothing of it writes any more); ``why`` is the failure's message past ``deadline``."""
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def free_ports(n: int) -> list[int]:
    """n TCP ports free on the loopback now, for the Ray processes a test starts itself."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# How often a Ray worker sends its task events (state changes, the node it ran on) to the GCS, which the State API
# reads: Ray's default is every second. The scenario clusters send them ten times as often, so that once a job has
# ended its events settle within a fraction of a second (:func:`settled`).
TASK_EVENTS_ENV = {"RAY_task_events_report_interval_ms": "100"}


def settled(query, quiet: float = 1.0, limit: float = 30.0) -> list:
    """``query()`` (a State API listing of tasks) once its answer has not changed for ``quiet`` seconds, at most
    ``limit`` seconds from now: the task events of a finished job reach the State API in batches."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + limit
    while True:
        found = query()
        key = sorted((t.task_id, t.attempt_number, t.state, t.node_id) for t in found)
        now = time.monotonic()
        if key != last:
            last, since = key, now
        elif now - since >= quiet or now > deadline:
            return found
        time.sleep(0.2)
