"""Chaos under load (issue 17 §3): ``semprobe run`` on a 3-node loopback cluster of real processes (``ray start``
--head and two ``ray start --address``), once undisturbed and once under a seeded schedule of kills, with figures.

Run by tests/ray_jobs/test_chaos.py in a process of its own; a person runs it the same way to get the figures::

    python tests/ray_jobs/chaos_scenario.py ROOT [SEED]

which writes ROOT/result.json (and prints it). The workload: a synthetic activation store of 49 layers x 3 image
sets x 20 concepts, written through the extraction's own writers (:class:`SyntheticShards` is an
:class:`~semprobe.ray_jobs.extraction.ExtractShards` whose network is a seeded generator), so that the job finds
every shard complete, skips extraction and runs its Gram tasks (one per layer and set), its stacked 2 vs. 2 and
permutation tasks (200 permutations in shards of 20, a few layers per group) and the reducer.

The drivers are the CLI as a person types it, ``python -m semprobe.ray_jobs.cli run --config ...``, joined to the
cluster by ``RAY_ADDRESS``. The schedule (``random.Random(seed)``) places each kill at a fraction of the job's
progress (the Gram matrices and tests stored under --out, which survive a driver):

- ``worker``: SIGKILL a Ray worker process of this cluster that is running a Gram or 2 vs. 2 task (its title is
  ``ray::gram_task`` / ``ray::stacked_task``); Ray retries the task;
- ``raylet``: SIGKILL the raylet of one worker node (never the head's: the drivers attach there): the node dies,
  its tasks and the objects it held are recomputed on the two nodes left;
- ``driver``: SIGKILL the driver, then start the same command again: it takes the dead driver's lease over and
  resumes from what is stored.

Each kill waits at most :data:`PATIENCE` seconds for its moment (a busy worker, a live node) and is otherwise
recorded as skipped; the disturbed run as a whole has :data:`DEADLINE` seconds. The result: every table of both
runs compared byte for byte, the kills survived by type, the tasks retried (attempts after the first, from Ray's
State API, and the drivers' own "analysis:" lines), the work redone as a fraction of the work needed, and both
wall times.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the cluster helpers of the storage test and conftest's free_ports
os.environ["RAY_AUTH_MODE"] = "token"  # before Ray reads it: this process joins the cluster, which has token auth

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from conftest import TASK_EVENTS_ENV, free_ports, settled, tables  # noqa: E402
from test_shared_storage import RAY, Nodes, _node_args  # noqa: E402

from semprobe.ray_jobs.config import RunConfig  # noqa: E402
from semprobe.ray_jobs.extraction import ExtractShards, finish, plan_extraction, write_plan  # noqa: E402
from semprobe.ray_jobs.storage import TEMPORARY, Output, model_key  # noqa: E402

MODEL = "efficientnet_lite0?input_size=32"  # real weights ship; 49 layers at "activations,blocks", 137,504 features
LABELS = range(0, 1000, 31)  # ImageNet classes; the 20 whose lemma GloVe knows become the concepts
WORKLOAD = {
    "models": [MODEL],
    "layers": "activations,blocks",
    "sets": 3,
    "permutations": 200,
    "permutation_shard": 20,  # 10 permutation tasks and one observe task per group of layers
    "stack_memory_mb": 1,  # 8 layers (x 3 sets) per group: 7 groups
    "store": "activations",
    "shard_size": 20,
    "batch_size": 20,
    "seed": 17,
}
KILLS = {"worker": 4, "raylet": 1, "driver": 1}  # how many of each the schedule places
PATIENCE = 20.0  # seconds a kill waits for its moment before it is skipped
DEADLINE = 400.0  # seconds the disturbed run may take, restarts included
ANALYSIS_TASKS = ("gram_task", "stacked_task")
PLANNED = re.compile(
    r"analysis: (\d+) Gram task\(s\), (\d+) of (\d+) tests to run in (\d+) group\(s\) of layers \((\d+) tasks"
)


# --- the workload -----------------------------------------------------------------------------------


def write_inputs(root: Path) -> Path:
    """A manifest of three images per class (never decoded: the store is synthetic) and the job's config file."""
    rows = [(f"c{label:03d}-{k}", f"images/{label:03d}-{k}.jpg", label) for label in LABELS for k in range(3)]
    manifest = root / "manifest.parquet"
    columns = {"image_id": [r[0] for r in rows], "uri": [r[1] for r in rows], "label": [r[2] for r in rows]}
    pq.write_table(pa.table(columns, schema=pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                                                      ("label", pa.int32())])), manifest)  # fmt: skip
    config = root / "config.json"
    config.write_text(json.dumps({**WORKLOAD, "images": str(manifest)}))
    return config


class SyntheticExtractor:
    """The extractor's interface (``model_name``, ``layers``, a call on a batch) over a seeded generator: the
    batch's "pixels" are the images' rows in the manifest. A layer's vector of an image is its concept's pattern
    (the same in every set) plus noise whose weight grows with depth, z-scored as the extractor stores them."""

    def __init__(self, plan, seed: int):
        self.model_name, self.layers, self.seed = plan.model, plan.layers, seed
        concepts = sorted(set(plan.manifest["concept_id"].to_pylist()))
        self.concept = [concepts.index(c) for c in plan.manifest["concept_id"].to_pylist()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [int(r) for r in batch["pixels"]]
        out = {"predicted_index": np.zeros(len(rows), np.int32), "predicted_prob": np.full(len(rows), 0.5, np.float32)}
        for depth, layer in enumerate(self.layers):
            noise = 0.5 + 2.0 * depth / len(self.layers)
            values = np.stack(
                [
                    np.random.default_rng([self.seed, depth, self.concept[r]]).standard_normal(layer.dim)
                    + noise * np.random.default_rng([self.seed, depth, 10_000 + r]).standard_normal(layer.dim)
                    for r in rows
                ]
            )
            values -= values.mean(axis=1, keepdims=True)
            values /= np.linalg.norm(values, axis=1, keepdims=True)
            out[layer.name] = values.astype(np.float16)
        return out


class SyntheticShards(ExtractShards):
    """The extraction's actor stage with :class:`SyntheticExtractor` for its network: the same shard writer, the
    same predictions, the same completion records."""

    def __init__(self, out: str, plan, seed: int):  # noqa: D107 (no model to load: the rest is ExtractShards')
        cfg = plan.config
        self.extractor, self.output, self.key = SyntheticExtractor(plan, seed), Output(out), plan.model_key
        self.dtype, self.format, self.compression, self.batch_size = (
            cfg.dtype, cfg.store_format, cfg.compression, cfg.batch_size
        )  # fmt: skip


def write_store(cfg: RunConfig) -> int:
    """The complete extraction store ``semprobe run`` resumes from (every shard's record present); returns the
    number of layers."""
    model = cfg.models[0]
    extraction = cfg.extract_config(model, os.path.join(cfg.out, "extract", model_key(model)), cfg.words, cfg.sets)
    plan = plan_extraction(extraction)
    output = Output(extraction.out)
    write_plan(output, plan, {"synthetic": "tests/ray_jobs/chaos_scenario.py"})
    stage = SyntheticShards(extraction.out, plan, cfg.seed)
    row = {image_id: i for i, image_id in enumerate(plan.manifest["image_id"].to_pylist())}
    shards = plan.shards()
    for shard, images in zip(shards["shard"].to_pylist(), shards["images"].to_pylist()):
        images = json.loads(images)
        rows = [[image_id, concept_id, set_index] for image_id, _, concept_id, set_index in images]
        stage._extract(shard, rows, [], np.array([row[image_id] for image_id, *_ in images]))
    finish(output, plan, computed=shards.num_rows, elapsed=0.0)
    return len(plan.layers)


# --- the cluster and the drivers ------------------------------------------------------------------------


class Cluster(Nodes):
    """A head (which runs work too, and the dashboard for the State API) and two worker nodes, one CPU each."""

    def __init__(self, temp: str):
        super().__init__()
        # A dead raylet is noticed in ~3 s rather than Ray's default ~15 s: the test's minutes go to the job.
        self.env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3", **TASK_EVENTS_ENV}
        gcs, self.dashboard, client = free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        self.start(
            ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={client}", *_node_args(temp)]
        )  # fmt: skip
        self.temp, self.revived = temp, 0

    def revive(self) -> None:
        """Start again, on fresh ports, a worker node whose ``ray start`` gave up while the cluster came up (on a
        machine shared with other Ray clusters a port drawn free may be taken by the time the raylet binds it)."""
        for i, proc in enumerate(self.procs[1:], 1):
            if proc.poll() is not None and self.revived < 4:
                self.revived += 1
                self.cmds[i] = [RAY, "start", f"--address={self.address}", *_node_args(self.temp)]
                self.procs[i] = self._popen(self.cmds[i])

    @property
    def state(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def join(self, timeout: float = 300) -> None:
        """Join the head from this process, then start the two worker nodes one after the other, each once the
        nodes before it are alive: ``ray start``s racing in one temp dir can draw the same socket names
        (``raylet.1``), and one of them fails (a worker node that fails even so is started again)."""
        deadline = time.monotonic() + timeout
        while not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level="warning", log_to_driver=False)
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for nodes in (2, 3):
            self.start([f"--address={self.address}", *_node_args(self.temp)])
            while sum(n["Alive"] for n in ray.nodes()) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the 3-node cluster did not come up in {timeout:g} s")
                self.revive()
                time.sleep(0.2)

    def processes(self, node: int) -> list[int]:
        """Every process a node's ``ray start --block`` started (its raylet, the raylet's workers, ...), by pid."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            stat = _read(f"/proc/{entry}/stat") if entry.isdigit() else ""
            if stat:
                children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
        found, todo = [], [self.procs[node].pid]
        while todo:
            kids = children.get(todo.pop(), [])
            found += kids
            todo += kids
        return found

    def busy_workers(self, nodes: list[int]) -> list[tuple[int, int, str]]:
        """(pid, node, title) of the worker processes of ``nodes`` running an analysis task now, by pid."""
        busy = []
        for node in nodes:
            for pid in self.processes(node):
                title = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
                if any(title.startswith(f"ray::{name}") for name in ANALYSIS_TASKS):
                    busy.append((pid, node, title))
        return sorted(busy)

    def raylet(self, node: int) -> int | None:
        return next((pid for pid in self.processes(node) if _read(f"/proc/{pid}/comm").strip() == "raylet"), None)


def _read(path: str) -> str:
    """A /proc file's text; "" when the process is gone."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class Driver:
    """``semprobe run`` as a person types it, on the cluster (``RAY_ADDRESS``); each start logs to its own file."""

    def __init__(self, cluster: Cluster, config: Path, out: Path, logs: Path):
        self.cmd = [sys.executable, "-m", "semprobe.ray_jobs.cli", "run", "--config", str(config), "--out", str(out)]
        self.env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        self.out, self.logs, self.starts, self.pids, self.proc = out, logs, [], [], None

    def start(self) -> None:
        log = self.logs.with_name(f"{self.logs.name}-{len(self.starts)}.log")
        self.starts.append(log)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.pids.append(self.proc.pid)

    def planned(self) -> list[dict]:
        """Each start's own account of its work: its "analysis:" line (absent when killed before it)."""
        found = []
        for log in self.starts:
            m = PLANNED.search(log.read_text())
            names = ("grams", "tests_todo", "tests", "groups", "stacked_tasks")
            found.append(dict(zip(names, map(int, m.groups()))) if m else None)
        return found

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.starts)


def progress(out: Path) -> int:
    """The Gram matrices and tests stored under ``out`` (they outlive a driver)."""
    n = 0
    for folder in ("similarity", "tests"):
        for _, _, files in os.walk(out / folder):
            n += sum(f.endswith(".parquet") for f in files)
    words = out / "similarity" / model_key(MODEL) / "words"
    return n - (len(list(words.glob("*.parquet"))) if words.is_dir() else 0)


# --- the schedule ------------------------------------------------------------------------------------


def schedule(seed: int) -> list[tuple[float, str]]:
    """Each kill at a fraction of the job's progress: the raylet early (the job then runs on two nodes), the driver
    in the middle, the workers anywhere before the end."""
    rng = random.Random(seed)
    events = [(rng.uniform(0.05, 0.85), "worker") for _ in range(KILLS["worker"])]
    events += [(rng.uniform(0.15, 0.4), "raylet")] * KILLS["raylet"] + [(rng.uniform(0.45, 0.7), "driver")] * KILLS[
        "driver"
    ]
    return sorted(events)


def run_undisturbed(driver: Driver) -> float:
    started = time.monotonic()
    driver.start()
    if driver.proc.wait(DEADLINE) != 0:
        raise RuntimeError(f"the undisturbed run failed:\n{driver.tail()}")
    return time.monotonic() - started


def run_disturbed(cluster: Cluster, driver: Driver, total: int, seed: int) -> tuple[float, list[dict]]:
    """The job under the schedule's kills; returns its wall time (restart included) and what each kill did."""
    rng, pending, done = random.Random(seed + 1), schedule(seed), []
    live = [1, 2]  # the worker nodes whose raylet runs
    started = time.monotonic()
    driver.start()
    waiting_since = None
    while True:
        code = driver.proc.poll()
        if code is not None:
            if code != 0:
                raise RuntimeError(f"the disturbed run failed (exit {code}):\n{driver.tail()}")
            break
        if time.monotonic() - started > DEADLINE:
            driver.proc.kill()
            raise RuntimeError(f"the disturbed run outlasted {DEADLINE:g} s:\n{driver.tail()}")
        fraction = progress(driver.out) / total
        if pending and fraction >= pending[0][0]:
            at, kind = pending[0]
            waiting_since = waiting_since or time.monotonic()
            event = {"kind": kind, "planned_at": round(at, 3), "progress": round(fraction, 3),
                     "t": round(time.monotonic() - started, 2)}  # fmt: skip
            if kind == "worker":
                victims = cluster.busy_workers([0, *live])
                if victims:
                    pid, node, title = rng.choice(victims)
                    os.kill(pid, signal.SIGKILL)
                    event |= {"pid": pid, "task": title, "node": node}
            elif kind == "raylet":
                node = rng.choice(live)
                raylet = cluster.raylet(node)
                if raylet is not None:
                    os.kill(raylet, signal.SIGKILL)
                    live.remove(node)
                    event |= {"pid": raylet, "node": node}
            elif kind == "driver":
                os.kill(driver.proc.pid, signal.SIGKILL)
                driver.proc.wait()
                event |= {"pid": driver.proc.pid}
                driver.start()  # the same command: it resumes
            if "pid" in event or time.monotonic() - waiting_since > PATIENCE:
                event["survived"] = "pid" in event  # a kill with nothing to kill within PATIENCE is skipped
                done.append(event)
                pending.pop(0)
                waiting_since = None
                continue
        time.sleep(0.1)
    for event in pending:
        done.append({"kind": event[1], "planned_at": round(event[0], 3), "survived": False, "why": "the job ended"})
    return time.monotonic() - started, done


# --- the figures ------------------------------------------------------------------------------------


def task_attempts(cluster: Cluster) -> dict[int, list]:
    """The analysis tasks' attempts, by the pid of the driver that submitted them (the State API keeps them)."""
    from ray.util.state import list_jobs, list_tasks

    tasks = settled(
        lambda: list_tasks(
            address=cluster.state, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000,
            raise_on_missing_output=False,
        )
    )  # fmt: skip
    pids = {job.job_id: (job.driver_info.pid if job.driver_info else None) for job in list_jobs(address=cluster.state)}
    by_driver: dict[int, list] = {}
    for task in tasks:
        if task.name in ANALYSIS_TASKS:
            by_driver.setdefault(int(pids.get(task.job_id) or -1), []).append(task)
    return by_driver


def main(root: str, seed: str = "17") -> dict:
    root_path, seed_value = Path(root), int(seed)
    root_path.mkdir(parents=True, exist_ok=True)
    config = write_inputs(root_path)
    base = json.loads(config.read_text())
    outs = {name: root_path / name for name in ("undisturbed", "chaos")}
    begun = time.monotonic()
    temp = tempfile.mkdtemp(prefix="raych-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(temp)
    try:
        cluster.join()
        cluster_seconds = time.monotonic() - begun
        n_layers = 0
        for out in outs.values():  # as an extraction writes them, after the storage check on the cluster
            n_layers = write_store(RunConfig(**base, out=str(out)).validate())
        store_seconds = time.monotonic() - begun - cluster_seconds
        quiet = Driver(cluster, config, outs["undisturbed"], root_path / "undisturbed")
        undisturbed = run_undisturbed(quiet)
        (plan,) = quiet.planned()
        total = plan["grams"] + plan["tests"]
        chaos = Driver(cluster, config, outs["chaos"], root_path / "chaos")
        disturbed, kills = run_disturbed(cluster, chaos, total, seed_value)
        attempts = task_attempts(cluster)
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)

    a, b = tables(outs["undisturbed"]), tables(outs["chaos"])
    needed = attempts.get(quiet.proc.pid, [])
    chaos_attempts = [t for pid, ts in attempts.items() if pid in chaos.pids for t in ts]
    retried = [t for t in chaos_attempts if t.attempt_number > 0]
    survived = {kind: sum(1 for e in kills if e["kind"] == kind and e["survived"]) for kind in KILLS}
    leftovers = [str(p.relative_to(root_path)) for p in root_path.rglob(".*") if TEMPORARY.match(p.name)]
    result = {
        "seed": seed_value,
        "workload": {"layers": n_layers, "sets": base["sets"], "permutations": base["permutations"], **plan},
        "kills": kills,
        "kills_survived": survived,
        "tasks_needed": len(needed),
        "task_attempts_disturbed": len(chaos_attempts),
        "tasks_retried": len(retried),
        "retried_by_task": {name: sum(t.name == name for t in retried) for name in ANALYSIS_TASKS},
        "failed_attempts": sum(t.state == "FAILED" for t in chaos_attempts),
        "work_redone_fraction": round((len(chaos_attempts) - len(needed)) / len(needed), 4) if needed else None,
        "driver_starts": chaos.planned(),
        "tables": len(a),
        "tables_identical": sorted(a) == sorted(b) and all(a[k] == b[k] for k in a),
        "tables_differing": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)),
        "scores_identical": a.get("scores.parquet") is not None and a.get("scores.parquet") == b.get("scores.parquet"),
        "temporary_files_left": leftovers,
        "seconds": {
            "store": round(store_seconds, 1),
            "cluster_start": round(cluster_seconds, 1),
            "undisturbed": round(undisturbed, 1),
            "disturbed": round(disturbed, 1),
            "ratio": round(disturbed / undisturbed, 2),
            "total": round(time.monotonic() - begun, 1),
        },
    }
    (root_path / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), indent=2))
