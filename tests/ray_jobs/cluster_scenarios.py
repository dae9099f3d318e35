"""The main job on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``), under faults.

Run by tests/test_cluster.py in a process of its own (the tests' own Ray instance lives in the pytest
process): ``python tests/cluster_scenarios.py CONFIG.json OUT_ROOT``, which writes OUT_ROOT/result.json.
A head that runs no work and three worker nodes, each declaring one ``accelerator`` (the stand-in for a GPU:
the two model actors ask for it, so they start on two different workers and the third is free). One run, into
OUT_ROOT/faults: once the first shard is stored and both extraction actors are up, one actor's process is killed
(SIGKILL) and the node holding the other is removed (``cluster.remove_node``), at the same moment. Both actors
must restart (the killed one on its own node or the free one, the removed node's on a node that stayed) and the
job carry on; the analysis then runs on the two workers left. One run shows both faults and how the work spreads:
each run costs two actor start-ups, and a fault two more restarts' worth of them, whatever the faults share.

The result: the nodes, and for the run each extraction actor's node when the faults struck and at the end, its
restarts, the nodes of the analysis tasks, and what was done to which actor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's helpers

import ray  # noqa: E402
import ray.data  # noqa: E402
from conftest import TASK_EVENTS_ENV, free_ports, settled  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors, list_tasks  # noqa: E402

from semprobe.ray_jobs.config import RunConfig  # noqa: E402
from semprobe.ray_jobs.run import run  # noqa: E402

WORKER = {"num_cpus": 2, "resources": {"accelerator": 1}}
# A removed node is declared dead after a second or so rather than Ray's default 15 s (5 failed health checks 3 s
# apart): a raylet that is gone refuses the check at once, while one that is slow but alive still has the default
# 10 s to answer each of the 3 checks.
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
EXTRACTOR = "ExtractShards"
T0 = time.monotonic()
# The State API of this cluster's dashboard (unnamed, the State API would ask the latest Ray started on this machine,
# which may be another's)
STATE_API = {}


def log(message: str) -> None:
    """The scenarios' progress on stderr (which the test shows when it fails), with seconds since the start."""
    print(f"[{time.monotonic() - T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def _extraction_actors(state: str | None = "ALIVE") -> list:
    actors = list_actors(
        **STATE_API,
        filters=[("state", "=", state)] if state else None,
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    return [a for a in actors if EXTRACTOR in (a.class_name or "")]


def _when_first_shard_lands(out: str, act) -> threading.Thread:
    """Wait (in the background) for the first stored shard record, then act."""

    def watch():
        shards = Path(out, "extract", "efficientnet_lite0", "shards")
        while not (shards.is_dir() and any(shards.rglob("*.json"))):
            time.sleep(0.05)
        act()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


ANALYSIS_TASKS = ("gram_task", "stacked_task")


def _analysis_tasks() -> list:
    tasks = list_tasks(
        **STATE_API, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000, raise_on_missing_output=False
    )
    return [t for t in tasks if t.name in ANALYSIS_TASKS]


def _faulty_run(cfg: RunConfig, fault) -> dict:
    done = {}
    watcher = _when_first_shard_lands(cfg.out, lambda: done.update(at=time.monotonic(), **fault()))
    summary = run(cfg, log=log)
    ended = time.monotonic()
    log("job done")
    watcher.join()  # removing a node can outlast the rest of the job
    assert done and done.pop("at") < ended, "the faults were not injected mid-job"
    # where the work ran, from the State API (the dashboard keeps finished tasks and dead actors)
    tasks = settled(_analysis_tasks)
    actors = _extraction_actors(None)
    log("state API queried")
    return {
        "actors": {a.actor_id: {"node": a.node_id, "restarts": a.num_restarts or 0} for a in actors},
        "task_nodes": {
            name: sorted({t.node_id for t in tasks if t.name == name and t.node_id}) for name in ANALYSIS_TASKS
        },
        "tests_computed": summary["tests_computed"],
        "fault": done,
    }


def _both_actors_up(out: str) -> list:
    """The two extraction actors, once both are alive (the first shard may land before the second has loaded)."""
    ended = Path(out, "extract", "efficientnet_lite0", "summary.json")  # written when the extraction ends
    while len(actors := _extraction_actors()) < 2:
        if ended.exists():
            raise RuntimeError("the extraction ended before both actors were up")  # no fault: the run says so
        time.sleep(0.2)
    return actors


def main(config: str, root: str) -> None:
    base = json.loads(Path(config).read_text())
    os.environ.update(TASK_EVENTS_ENV)  # the nodes' processes, which the cluster starts, inherit it
    (dashboard,) = free_ports(1)
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard, "_system_config": HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [cluster.add_node(**WORKER) for _ in range(3)]
        cluster.wait_for_nodes()
        log("cluster up")
        context = ray.init(address=cluster.address)
        STATE_API["address"] = f"http://{context.dashboard_url}"
        log("driver connected")
        result = {"worker_nodes": sorted(n.node_id for n in workers), "head_node": cluster.head_node.node_id}

        cfg = RunConfig(**{**base, "out": os.path.join(root, "faults")}).validate()
        # The pool's actors start together but not in step (on two busy cores, one can take half a minute more): the
        # pipeline waits for both before its first shard, so that the faults find both up (the default starts with
        # the first ready, which may then compute every shard alone).
        ray.data.DataContext.get_current().wait_for_min_actors_s = 600

        def kill_one_remove_the_others_node() -> dict:
            killed, removed = _both_actors_up(cfg.out)
            placed = {a.actor_id: a.node_id for a in (killed, removed)}
            os.kill(killed.pid, signal.SIGKILL)
            (node,) = [n for n in cluster.worker_nodes if n.node_id == removed.node_id]
            cluster.remove_node(node, allow_graceful=False)
            log(f"killed actor pid {killed.pid}, removed node {node.node_id}")
            return {
                "placed": placed,
                "killed_actor": killed.actor_id,
                "killed_actor_pid": killed.pid,
                "removed_actor": removed.actor_id,
                "removed_node": node.node_id,
            }

        result["faults"] = _faulty_run(cfg, kill_one_remove_the_others_node)
        Path(root, "result.json").write_text(json.dumps(result))  # not stdout: Ray forwards workers' output there
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
