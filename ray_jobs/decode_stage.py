"""The CPU stage of the extraction pipeline (:mod:`semprobe.ray_jobs.extraction`): read and decode a shard's images.

Ray Data runs these functions as tasks on the CPUs of every node, in worker processes of their own wherever the
stage is not fused with the model actors' (as it is not when the actors ask for a GPU or another resource): a
worker imports the module of the function it runs, so this one imports no model code: a decode worker starts
without torch, timm or torchvision (importing this module takes 0.14 s and 79 MB resident on our 2-core machines;
the extraction module, 1.8 s and 595 MB).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from semprobe.datasets.decode import ImageError, decode_image, read_bytes
from semprobe.ray_jobs.shared_storage import verify_node


def decode_shard(
    batch: pa.Table,
    size: int,
    resize_size: int,
    interpolation: str,
    precropped: bool,
    out: str | None = None,
    crop_mode: str = "center",
    fill: tuple[int, int, int] = (0, 0, 0),
) -> dict[str, np.ndarray]:
    """CPU stage: read and decode one shard's images; failures become error records. On a node that joined after
    the job's storage check, ``out``'s check runs first: images it cannot see must not become error records."""
    if out is not None:
        verify_node(out)
    (shard,), (images,) = batch["shard"].to_pylist(), batch["images"].to_pylist()
    kept, pixels, errors = [], [], []
    for image_id, uri, concept_id, set_index in json.loads(images):
        try:
            pixels.append(decode_image(read_bytes(uri), size, resize_size, interpolation, precropped, crop_mode, fill))
            kept.append([image_id, concept_id, set_index])
        except ImageError as err:
            errors.append({"image_id": image_id, "uri": uri, "stage": err.stage, "message": str(err)})
    stacked = np.stack(pixels) if pixels else np.zeros((1, size, size, 3), np.uint8)  # Ray tensors need a row
    return {
        "shard": np.array([shard], np.int32),
        "images": np.array([json.dumps(kept)]),
        "errors": np.array([json.dumps(errors)]),
        "pixels": stacked[None],
    }


def decode_units(batch: pa.Table, decode: dict[int, dict[str, Any]]) -> dict[str, np.ndarray]:
    """CPU stage of a shared pipeline: :func:`decode_shard` with the options of the row's extraction (``plan``)."""
    (plan,) = batch["plan"].to_pylist()
    return {**decode_shard(batch, **decode[plan]), "plan": np.array([plan], np.int32)}
