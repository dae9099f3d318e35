"""The Ray cluster a job runs on: never hard-coded, always found.

``ray.init()`` with no address joins the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it for the
job's driver), else a cluster ``ray start`` made on this machine, else starts a local instance; resources
are then read off the cluster (``ray.cluster_resources()``), never assumed.
"""

from __future__ import annotations

import ray


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
