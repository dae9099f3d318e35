"""The activation store: where each layer's activations live under an extraction's output, how an
extraction actor writes them, and how the Gram and 1 vs. 2 tasks read them back; and the similarity
files, the w x w concept correlations that the Gram tasks (or ``--store similarity``'s actors) write.

Layout under an extraction's OUT::

    activations/<model key>/<layer>/shard-NNNNN.arrow     Arrow IPC (the default), or
    activations/<model key>/<layer>/shard-NNNNN.parquet   with --store-format parquet

Each row is one image's z-scored layer vector (``datasets.schema.activations``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from semprobe.datasets import schema
from semprobe.ray_jobs.storage import STORE_FORMATS, Output, TableFileWriter, model_key

if TYPE_CHECKING:  # the Gram and 1 vs. 2 tasks import this module: not the model code
    from semprobe.actors.layers import Layer


def layer_folder(model: str, layer: str) -> tuple[str, ...]:
    """One layer's folder of shard files, relative to an extraction's OUT."""
    return "activations", model_key(model), layer


def shard_file(shard: int, suffix: str = ".parquet") -> str:
    """A shard's file name: the activation store's, its predictions' and its completion record's."""
    return f"shard-{shard:05d}{suffix}"


class ShardWriter:
    """Streams one shard's layers into their files, one row group per model batch.

    Writing runs on a background thread so the next batch's forward pass overlaps
    it; nothing lands under its final name until :meth:`commit`.
    """

    def __init__(
        self,
        output: Output,
        model: str,
        layers: list[Layer],
        dtype: str,
        fmt: str,
        compression: str,
        shard: int,
    ):
        self.model, self.layers = model, layers
        self.schemas = [schema.activations(layer.dim, dtype) for layer in layers]
        self.writers = [
            TableFileWriter(
                output, (*layer_folder(model, layer.name), shard_file(shard, f".{fmt}")), s, fmt, compression
            )
            for layer, s in zip(layers, self.schemas)
        ]
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Any] = []

    def write(self, rows: list[list[Any]], captured: dict[str, np.ndarray]) -> None:
        ids, concepts, sets = (list(col) for col in zip(*rows))
        n = len(ids)
        for layer, s, writer in zip(self.layers, self.schemas, self.writers):
            values = pa.FixedShapeTensorArray.from_numpy_ndarray(captured[layer.name])
            table = pa.table(
                [
                    pa.array(ids, pa.string()),
                    pa.array(concepts, pa.string()),
                    pa.array(sets, pa.int32()),
                    pa.repeat(self.model, n),
                    pa.repeat(layer.name, n),
                    pa.repeat(pa.scalar(layer.layer_index, pa.int32()), n),
                    pa.array([list(layer.shape)] * n, pa.list_(pa.int32())),
                    values,
                ],
                schema=s,
            )
            self.pending.append(self.pool.submit(writer.write, table))

    def commit(self) -> None:
        try:
            for f in self.pending:
                f.result()
            for writer in self.writers:
                writer.commit()
        finally:
            self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for writer in self.writers:
            writer.abort()


def layer_views(
    output: Output, folder: tuple[str, ...], scratch: str
) -> tuple[dict[str, tuple[int, int]], list[np.ndarray]]:
    """Every activation row of one layer (``folder``, under ``output``) as (n, dim) views, one per record batch.

    IPC files are memory-mapped and viewed zero-copy, and files on object storage
    are first copied to local scratch disk, so a layer is never held in memory,
    wherever it lives; Parquet files (``--store-format parquet``) are decoded.
    Returns image_id -> (view, row) and the views.
    """
    where, views = {}, []
    names = [n for fmt in STORE_FORMATS for n in output.list(*folder, suffix=f".{fmt}")]
    for name in sorted(names):
        path = output.path(*folder, name)
        if not isinstance(output.fs, pafs.LocalFileSystem):
            local = os.path.join(scratch, name)
            pafs.copy_files(path, local, source_filesystem=output.fs, destination_filesystem=pafs.LocalFileSystem())
            path = local
        if name.endswith(".parquet"):
            table = pq.read_table(path, memory_map=True)
        else:
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        ids = table["image_id"].to_pylist()
        offset = 0
        for chunk in table["values"].chunks:
            dim = int(np.prod(chunk.type.shape))
            views.append(chunk.storage.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), dim))
            for row in range(len(chunk)):
                where[ids[offset + row]] = (len(views) - 1, row)
            offset += len(chunk)
    return where, views


def similarity_table(
    matrix: np.ndarray,
    concept_ids: list[str],
    space: str,
    model: str | None = None,
    layer: str | None = None,
    layer_index: int | None = None,
    set_index: int | None = None,
) -> pa.Table:
    """A (w, w) matrix over ``concept_ids`` as its one-row similarity table: ``space`` "cnn" (a layer's image
    set) or a word model's name."""
    return pa.table(
        [
            [model],
            [layer],
            pa.array([layer_index], pa.int32()),
            pa.array([set_index], pa.int32()),
            [space],
            [concept_ids],
            pa.FixedShapeTensorArray.from_numpy_ndarray(matrix[None].copy()),
        ],
        schema=schema.similarity(len(concept_ids)),
    )


def similarity_file(key: str, layer: str, set_index: int) -> tuple[str, ...]:
    return "similarity", key, model_key(layer), f"set-{set_index:03d}.parquet"


def matrix_source(model: str, layer: str, set_index: int) -> tuple[str, ...]:
    """Where a similarity-mode extraction (:mod:`semprobe.ray_jobs.fused`) keeps one layer's matrix of one set,
    relative to its OUT."""
    return similarity_file(model_key(model), layer, set_index)


def references_file(key: str, layer: str) -> tuple[str, ...]:
    """Where ``misclassified --store similarity``'s second pass keeps one layer's image-reference correlations,
    relative to the extraction's OUT."""
    return "reference_correlations", key, f"{model_key(layer)}.parquet"


def word_similarity_file(key: str, word_model: str) -> tuple[str, ...]:
    """Where a run keeps a word model's matrix over the concepts of the model stored under ``key``."""
    return "similarity", key, "words", f"{model_key(word_model)}.parquet"


def matrices(table: pa.Table) -> np.ndarray:
    """The (n, w, w) matrices of a similarity table."""
    return table["matrix"].combine_chunks().to_numpy_ndarray()
