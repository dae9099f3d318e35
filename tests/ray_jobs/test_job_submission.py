"""`ray job submit` against a real Ray head on loopback, started here (`ray start --head`), through the Jobs API."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BASE, free_ports, tables
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.ray  # a Ray cluster of its own

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster as `ray up` makes one, on loopback, in its own temp dir (not the tests' Ray)."""
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",  # nothing to report from a test's throwaway head
            "--num-cpus=2",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # as on a node where semprobe is installed: its console script on PATH (the venv, activated)
        env={
            **os.environ,
            "RAY_ADDRESS": "",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            # stopped at once: by default SIGTERM first drains the node for up to 30 s (for Ray Serve's proxies)
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        },
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while True:
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not come up") from None
            time.sleep(0.25)
    yield client, gcs
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    proc.wait(60)
    shutil.rmtree(temp, ignore_errors=True)


def _wait(client: JobSubmissionClient, job: str, timeout: float = 600) -> JobStatus:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job} still {status} after {timeout} s"
        time.sleep(0.25)  # a status call is cheap; the job's end is seen within a quarter second
    return status


def test_submitted_run_matches_a_local_run(head, single_node, tmp_path):
    """The README's command: the checkout as working dir, runtime-env.yaml, `semprobe run --config FILE`; the small
    main job of the cluster tests (one CNN, three layers), whose local run they share."""
    head, gcs_port = head
    runtime_env = {**yaml.safe_load((ROOT / "runtime-env.yaml").read_text()), "working_dir": str(ROOT)}
    config = tmp_path / "job.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**BASE, "out": str(tmp_path / "out")}.items()))
    job = head.submit_job(entrypoint=f"semprobe run --config {config}", runtime_env=runtime_env)
    status = _wait(head, job)
    logs = head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    # the driver joined the head it was submitted to (RAY_ADDRESS), which has 2 CPUs and no GPU
    assert re.search(rf"ray: running on the cluster at [\d.]+:{gcs_port}: 1 node\(s\), 2 CPU, 0 GPU", logs), logs[:3000]
    assert f"report: {tmp_path / 'out' / 'report.html'}" in logs
    # its working dir was this checkout, uploaded without the virtualenv and the runs
    info = head.get_job_info(job)
    assert info.runtime_env["working_dir"].startswith("gcs://") and info.runtime_env["excludes"][0] == ".venv/"
    reference, got = tables(single_node), tables(tmp_path / "out")  # every table, byte for byte
    assert "scores.parquet" in reference and "concept_scores.parquet" in reference
    assert got.keys() == reference.keys() and [k for k in reference if got[k] != reference[k]] == []
    assert pq.read_table(tmp_path / "out" / "scores.parquet").num_rows > 0
