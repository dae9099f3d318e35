"""The main job on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``), with faults.

Run by tests/test_cluster.py in a process of its own (the tests' own Ray instance lives in the pytest
process): ``python tests/cluster_scenarios.py CONFIG.json OUT_ROOT``, which writes OUT_ROOT/result.json.
A head that runs no work and two worker nodes, each declaring one ``accelerator`` (the stand-in for a GPU:
the model actors ask for it); then, one after another, into OUT_ROOT/<scenario>:

- ``kill-actor``: an extraction actor's process is killed (SIGKILL) once the first shard is stored. It also
  shows how the job spreads: the killed actor can restart only on its own node (the other worker's accelerator
  is held by the other actor until the extraction ends), and the analysis runs after the extraction on the same
  two nodes as it would undisturbed; so no undisturbed run is needed (each run costs two actor start-ups).
- ``remove-node``: a third worker joins, and the node holding an extraction actor is removed once the
  first shard is stored.

The result: per scenario, the nodes of the extraction actors and of the analysis tasks, the actors'
restarts, and what was done to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.run import run

WORKER = {"num_cpus": 2, "resources": {"accelerator": 1}}
# A removed node is declared dead after a second or so rather than Ray's default 15 s (5 failed health checks 3 s
# apart): a raylet that is gone refuses the check at once, while one that is slow but alive still has the default
# 10 s to answer each of the 3 checks.
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
EXTRACTOR = "ExtractShards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extraction_actors(state: str | None = "ALIVE") -> list:
    actors = list_actors(
        filters=[("state", "=", state)] if state else None, detail=True, limit=10_000, raise_on_missing_output=False
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
    tasks = list_tasks(filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000, raise_on_missing_output=False)
    return [t for t in tasks if t.name in ANALYSIS_TASKS]


def _scenario(cfg: RunConfig, fault=None) -> dict:
    before_actors = {a.actor_id for a in _extraction_actors(None)}
    before_tasks = {t.task_id for t in _analysis_tasks()}
    done = {}
    watcher = _when_first_shard_lands(cfg.out, lambda: done.update(at=time.monotonic(), **fault())) if fault else None
    summary = run(cfg, log=lambda m: print(m, file=sys.stderr))
    ended = time.monotonic()
    if watcher:
        watcher.join()  # removing a node can outlast the rest of the job
        assert done and done.pop("at") < ended, "the fault was not injected mid-job"
    # where the work ran, from the State API (the dashboard keeps finished tasks and dead actors)
    time.sleep(2)  # task events reach the dashboard in batches
    actors = [a for a in _extraction_actors(None) if a.actor_id not in before_actors]
    tasks = [t for t in _analysis_tasks() if t.task_id not in before_tasks]
    return {
        "actor_nodes": sorted(a.node_id for a in actors if a.node_id),
        "actor_states": sorted(a.state for a in actors),
        "actor_restarts": sum(a.num_restarts or 0 for a in actors),
        "task_nodes": {
            name: sorted({t.node_id for t in tasks if t.name == name and t.node_id}) for name in ANALYSIS_TASKS
        },
        "tests_computed": summary["tests_computed"],
        "fault": done,
    }


def main(config: str, root: str) -> None:
    base = json.loads(Path(config).read_text())
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_port": _free_port(), "_system_config": HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [cluster.add_node(**WORKER) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        result = {"worker_nodes": sorted(n.node_id for n in workers), "head_node": cluster.head_node.node_id}

        def cfg(name: str) -> RunConfig:
            return RunConfig(**{**base, "out": os.path.join(root, name)}).validate()

        def kill_actor() -> dict:
            (victim, *_) = _extraction_actors()
            os.kill(victim.pid, signal.SIGKILL)
            return {"killed_actor_pid": victim.pid, "on_node": victim.node_id}

        result["kill-actor"] = _scenario(cfg("kill-actor"), kill_actor)

        third = cluster.add_node(**WORKER)
        cluster.wait_for_nodes()
        result["worker_nodes"].append(third.node_id)

        def remove_node() -> dict:
            (victim, *_) = _extraction_actors()
            (node,) = [n for n in cluster.worker_nodes if n.node_id == victim.node_id]
            cluster.remove_node(node, allow_graceful=False)
            return {"removed_node": node.node_id}

        result["remove-node"] = _scenario(cfg("remove-node"), remove_node)
        Path(root, "result.json").write_text(json.dumps(result))  # not stdout: Ray forwards workers' output there
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
