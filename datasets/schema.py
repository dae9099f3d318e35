"""The schema of every table semprobe writes. Readers and writers import it from here.

Every table carries the experiment id and the schema version in its Arrow
metadata, so a file found on its own still says what made it.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# One row per (concept, word model): the word that stands for the concept.
CONCEPTS = pa.schema(
    [
        ("concept_id", pa.string()),  # wnid for ImageNet, the class name for CIFAR-100
        ("class_index", pa.int32()),
        ("wnid", pa.string()),  # null outside ImageNet
        ("source", pa.string()),  # class space: imagenet | cifar100 | folder
        ("word_model", pa.string()),
        ("lemma", pa.string()),  # the lemma of the class that matched
        ("word", pa.string()),  # the lemma as spelled in the word model
    ]
)

# One row per image taken into a job.
MANIFEST = pa.schema(
    [
        ("image_id", pa.string()),
        ("concept_id", pa.string()),
        ("class_index", pa.int32()),  # null when the class space has no indices
        ("set_index", pa.int32()),  # null when no image sets were drawn
        ("uri", pa.string()),
        ("shard", pa.int32()),  # unit of work, retry, resume and output file
    ]
)

# Images or items skipped by a job, and why.
ERRORS = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),  # read | decode | forward
        ("message", pa.string()),
    ]
)

# What the model said about each extracted image (top-1 class, for accuracy and
# the failure analyses that need correctly classified images).
PREDICTIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("concept_id", pa.string()),
        ("set_index", pa.int32()),
        ("model", pa.string()),
        ("predicted_index", pa.int32()),
        ("predicted_prob", pa.float32()),
    ]
)

ACTIVATION_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def activations(dim: int, dtype: str) -> pa.Schema:
    """Schema of one layer's activation table: one row per image.

    ``values`` is the flattened layer output z-scored over its features (mean 0,
    L2 norm 1) as an Arrow fixed-shape tensor of ``dim`` elements; ``shape`` is
    the layer output's shape for one image before flattening.
    """
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("concept_id", pa.string()),
            ("set_index", pa.int32()),
            ("model", pa.string()),
            ("layer", pa.string()),
            ("layer_index", pa.int32()),
            ("shape", pa.list_(pa.int32())),
            ("values", pa.fixed_shape_tensor(ACTIVATION_DTYPES[dtype], [dim])),
        ]
    )


def stamp(table: pa.Table, experiment_id: str) -> pa.Table:
    """Attach the experiment id and schema version to a table's metadata."""
    meta = dict(table.schema.metadata or {})
    meta.update({b"semprobe.schema_version": SCHEMA_VERSION.encode(), b"semprobe.experiment_id": experiment_id.encode()})
    return table.replace_schema_metadata(meta)
