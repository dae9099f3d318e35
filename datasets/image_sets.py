"""Image sets: K disjoint sets with exactly one image of every concept each.

The papers average the 2 vs. 2 test over such sets. The draw is seeded per
concept (seed, concept id), so a concept's images do not depend on which other
concepts are present.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class ImageSets:
    """The chosen images with their ``set_index`` and the concepts dropped for too few images."""

    images: pa.Table  # the input columns plus set_index (int32), sorted by image_id
    dropped: dict[str, int]  # concept_id -> number of images it had


def draw_image_sets(images: pa.Table, k: int, seed: int) -> ImageSets:
    """Draw ``k`` disjoint sets, one image per concept each.

    Parameters
    ----------
    images : Table with at least image_id and concept_id
    k : number of sets (>= 1)
    seed : the draw is a function of (seed, concept_id, that concept's image ids)
    """
    by_concept: dict[str, list[int]] = {}
    for row, cid in enumerate(images["concept_id"].to_pylist()):
        by_concept.setdefault(cid, []).append(row)
    ids = images["image_id"].to_pylist()
    take, set_index, dropped = [], [], {}
    for cid, rows in by_concept.items():
        if len(rows) < k:
            dropped[cid] = len(rows)
            continue
        rows = sorted(rows, key=ids.__getitem__)
        rng = np.random.default_rng([seed, zlib.crc32(cid.encode())])
        chosen = rng.choice(len(rows), size=k, replace=False)
        take.extend(rows[i] for i in chosen)
        set_index.extend(range(k))
    table = images.take(pa.array(take, pa.int64())).append_column("set_index", pa.array(set_index, pa.int32()))
    order = pc.sort_indices(table, [("image_id", "ascending")])
    return ImageSets(table.take(order), dropped)
