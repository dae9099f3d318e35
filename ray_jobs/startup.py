"""What every job does before its first task: open its output, refuse to mix experiments, join the
cluster, resolve resources, and write the resolved config beside the outputs.

``ray.init()`` with no address joins the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it for the
job's driver), else a cluster ``ray start`` made on this machine, else starts a local instance; resources
are then read off the cluster (``ray.cluster_resources()``), never assumed.
"""

from __future__ import annotations

from typing import Any

import ray

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.shared_storage import check as check_shared_storage
from semprobe.ray_jobs.storage import Output


def open_output(cfg) -> Output:
    """The job's output root, refused when it holds another experiment."""
    output = Output(cfg.out)
    check_same_experiment(output, cfg)
    return output


def connect(log=print) -> None:
    """Join (or start) the Ray cluster once per process, and say which it is and what it holds."""
    if ray.is_initialized():
        return
    context = ray.init()
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    log(
        f"ray: running on the cluster at {context.address_info['gcs_address']}: {nodes} node(s), "
        f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    )


def check_same_experiment(output: Output, cfg) -> None:
    """Refuse to mix two experiments in one output folder."""
    if not output.exists("config.json"):
        return
    before = output.read_json("config.json").get("identity", {})
    differ = [k for k, v in cfg.identity().items() if before.get(k) != v]
    if differ:
        raise InputError(
            f"{output.uri} holds another experiment (it differs in {', '.join(differ)}): use a new --out or the "
            f"same options"
        )


def model_actors(actors: int | None, gpus_per_actor: float | None) -> tuple[int, float]:
    """How many model actors and GPUs each: as configured, else one actor per GPU of the cluster (or 1 on CPUs)."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = gpus_per_actor if gpus_per_actor is not None else (1 if cluster_gpus >= 1 else 0)
    return actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1), gpus


def store_mode(store: str, gpus_per_actor: float | None, log=print) -> str:
    """``--store`` resolved and said in the log: as given, or for ``auto`` ``similarity`` when the model actors get
    GPUs (``--gpus-per-actor``, else the cluster's: :func:`model_actors`), ``activations`` on CPU-only clusters."""
    if store != "auto":
        log(f"store: {store} (--store {store})")
        return store
    _, gpus = model_actors(None, gpus_per_actor)
    mode = "similarity" if gpus else "activations"
    why = f"the model actors get {gpus:g} GPU each" if gpus else "the model actors run on CPUs"
    log(f"store: {mode} ({why}; --store activations|similarity chooses)")
    return mode


def analysis_options(cfg, log=None) -> dict[str, Any]:
    """Ray options of an analysis task (Gram, 2 vs. 2, permutations, 1 vs. 2): ``--task-cpus``, and ``--task-gpus``
    or, unset, a fraction of a GPU when the cluster has any (the scheduler packs such tasks several to a GPU)."""
    gpus = cfg.task_gpus
    if gpus is None:
        from semprobe.ray_jobs.config import AUTO_TASK_GPUS

        gpus = AUTO_TASK_GPUS if ray.cluster_resources().get("GPU", 0) else 0
        if gpus and log:
            log(f"analysis tasks: {gpus:g} GPU each (the cluster has GPUs; --task-gpus 0 keeps them on CPUs)")
    return {"num_cpus": cfg.task_cpus, "num_gpus": gpus}


def task_device() -> str:
    """The torch device of the Ray task or actor calling it: its GPU when Ray assigned one (``CUDA_VISIBLE_DEVICES``
    then names only those), else the CPU."""
    return "cuda" if ray.get_gpu_ids() else "cpu"


def write_resolved(output, cfg, check_storage: bool = True, **extra: Any) -> None:
    """OUT/config.json: the fully resolved config, its identity and experiment id; unwritable output is bad input.
    The job's first write: before it, every node of a cluster must see the job's storage as the driver does
    (``check_storage``; False for a command whose driver alone reads and writes, such as ``compare``)."""
    from semprobe.datasets.schema import SCHEMA_VERSION

    if check_storage:
        check_shared_storage(cfg)

    resolved = {
        "identity": cfg.identity(),
        "config": cfg.to_dict(),
        "experiment_id": cfg.experiment_id(),
        "schema_version": SCHEMA_VERSION,
        **extra,
    }
    try:
        output.write_json(resolved, "config.json")
    except OSError as err:
        raise InputError(f"cannot write to {cfg.out}: {err}") from None
