"""The main job on a simulated multi-node cluster (a head and worker nodes in ray.cluster_utils.Cluster), and under
faults: the work spreads over the nodes, and every table ends byte-identical to a single-node run's, also when an
extraction actor is killed and a worker node removed mid-job (tests/cluster_scenarios.py runs the cluster), when the
driver is killed and the command rerun, and after a full disk; a full or read-only disk is a clear error that
leaves no broken file behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BASE, cli_stderr, tables, until_cpus_free

from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.run import run

pytestmark = pytest.mark.ray  # a Ray cluster of its own

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("cluster")
    config = root / "config.json"
    # two model actors, each needing an `accelerator`, which only the worker nodes declare (the head has no CPUs)
    config.write_text(json.dumps({**BASE, "actors": 2, "actor_resources": {"accelerator": 1}}))
    proc = subprocess.run(
        [sys.executable, str(HERE / "cluster_scenarios.py"), str(config), str(root / "out")],
        capture_output=True,
        text=True,
        timeout=1800,
        # no Ray Data usage-stats actor: one process fewer to start on the cluster, which it does not use
        env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((root / "out" / "result.json").read_text()), root / "out"


def test_work_spreads_over_the_worker_nodes(cluster_run):
    result, _ = cluster_run
    run, workers = result["faults"], result["worker_nodes"]
    placed = run["fault"]["placed"]  # where the two extraction actors ran before the faults
    assert len(set(placed.values())) == 2 and set(placed.values()) <= set(workers), "one actor on each of two workers"
    for name, nodes in run["task_nodes"].items():
        assert result["head_node"] not in nodes, f"{name} ran on the head, which has no CPUs"
    used = set().union(*run["task_nodes"].values())
    assert used == set(workers) - {run["fault"]["removed_node"]}, "the analysis tasks ran on both workers left"
    assert run["tests_computed"] == 3


def test_every_table_is_byte_identical_to_a_single_node_run(cluster_run, single_node):
    _, root = cluster_run
    reference, got = tables(single_node), tables(root / "faults")
    assert len(reference) > 20 and "scores.parquet" in reference
    assert got.keys() == reference.keys()
    assert [k for k in reference if got[k] != reference[k]] == []


def test_a_killed_extraction_actor_is_restarted(cluster_run):
    result, _ = cluster_run
    run = result["faults"]
    fault, actors = run["fault"], run["actors"]
    assert fault["killed_actor_pid"] and actors[fault["killed_actor"]]["restarts"] >= 1
    # on its own node (its accelerator freed by its death) or on the free worker: never on the removed one
    assert actors[fault["killed_actor"]]["node"] in set(result["worker_nodes"]) - {fault["removed_node"]}
    assert run["tests_computed"] == 3


def test_a_removed_worker_node_moves_its_actor(cluster_run):
    result, _ = cluster_run
    run = result["faults"]
    fault, actors, workers = run["fault"], run["actors"], result["worker_nodes"]
    gone = fault["removed_node"]
    assert len(workers) == 3 and gone in workers and fault["placed"][fault["removed_actor"]] == gone
    # the lost actor was restarted on a node that stayed (which one is the scheduler's choice: the free worker, or
    # the killed actor's once that one's accelerator is free)
    moved = actors[fault["removed_actor"]]
    assert moved["restarts"] >= 1 and moved["node"] in set(workers) - {gone}
    assert len(actors) == 2, "no actor beyond the pool's two: the lost ones were restarted, not replaced"
    assert run["tests_computed"] == 3


def _job_toml(path: Path) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in BASE.items()))
    return path


def _shard_records(out: Path) -> int:
    return len(list((out / "extract" / "efficientnet_lite0" / "shards").rglob("*.json")))


def test_a_killed_driver_resumes_recomputing_only_what_was_missing(ray_session, single_node, tmp_path):
    out = tmp_path / "out"
    # `semprobe run` in a driver of its own that joins the tests' Ray (as a cluster user's driver joins a running
    # cluster), killed once the first shard is stored
    driver = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("semprobe")),
            "run",
            "--config",
            str(_job_toml(tmp_path / "job.toml")),
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
    )
    deadline = time.monotonic() + 600
    try:
        while not (out / "extract" / "efficientnet_lite0" / "shards").is_dir() or _shard_records(out) < 1:
            assert driver.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Ray ends the dead driver's job, its extraction actor and decode tasks with it: once their CPUs are back,
    # nothing writes to out any more
    until_cpus_free(ray_session, deadline, "the killed driver's actor and tasks did not end")
    stored = _shard_records(out)
    assert 0 < stored < 7 and not (out / "scores.parquet").exists(), "the driver was killed mid-extraction"
    # a shard record is written last: every recorded shard has all its layers' files, whole
    ext = out / "extract" / "efficientnet_lite0"
    for record in (ext / "shards").rglob("*.json"):
        shard = json.loads(record.read_text())["shard"]
        files = [
            ext / "activations" / "efficientnet_lite0" / layer / f"shard-{shard:05d}.arrow"
            for layer in BASE["layers"].split(",")
        ]
        assert [pa.ipc.open_file(f).read_all().num_rows for f in files] == [
            json.loads(record.read_text())["n_images"]
        ] * 3
    logs = []
    summary = run(RunConfig(**BASE, out=str(out), actors=1).validate(), log=logs.append)
    resumed = [m for m in logs if m.startswith("resuming:")]
    assert resumed == [f"resuming: {stored} of 7 shards already complete, {7 - stored} to go"]
    assert f"{7 - stored}/7 shards computed" in next(m for m in logs if m.startswith("extracted"))
    assert summary["tests_computed"] == 3  # the killed driver had not reached the analysis
    assert tables(out) == tables(single_node)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")


def _all_files_whole(out: Path) -> None:
    """Every table and JSON file under its final name reads back whole (a killed writer's temporaries are hidden)."""
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert files
    for p in files:
        if p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".arrow":
            pa.ipc.open_file(p).read_all()
        elif p.suffix == ".json":
            json.loads(p.read_text())


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "size=256k")
    yield mnt
    for _ in range(60):  # until the job's actors, killed with it, have let go of their files
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"cannot unmount {mnt}")


def test_a_full_disk_is_a_clear_error_with_no_broken_file_and_the_rerun_resumes(
    ray_session, single_node, small_disk, tmp_path, capsys
):
    out = small_disk / "out"
    argv = ["run", "--config", str(_job_toml(tmp_path / "job.toml")), "--out", str(out)]
    assert main(argv) == 2
    err = cli_stderr(capsys).strip().splitlines()[-1]
    assert (
        err.startswith(f"semprobe: error: cannot write to {out}: No space left on device;")
        and "run the same command again" in err
    )
    _all_files_whole(out)
    assert not (out / "scores.parquet").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert main(argv) == 0
    assert tables(out) == tables(single_node)
    assert [p for p in out.rglob(".*")] == [], "the rerun swept the temporaries"


def test_a_read_only_output_is_a_clear_error_and_writes_nothing(ray_session, tmp_path, capsys):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "ro,size=1m")
    try:
        assert main(["run", "--config", str(_job_toml(tmp_path / "job.toml")), "--out", str(mnt / "out")]) == 2
        err = cli_stderr(capsys).strip().splitlines()
        assert err[-1].startswith(f"semprobe: error: cannot write to {mnt / 'out'}: Read-only file system;")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
