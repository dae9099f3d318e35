"""``semprobe affine``: are the penultimate features of different CNNs affine transforms of one another?

Training pass: a pool of Ray actors, each holding every CNN, takes shards of the
training images, runs all CNNs on each image once and folds the features into
its own joint Gram matrix ``[x_A, x_B, ..., 1]^T [x_A, x_B, ..., 1]``
(float64). Each actor checkpoints its Gram (with the shards in it) every
``checkpoint_every`` shards, so memory and traffic do not grow with the number
of images and an interrupted pass resumes. The reducer sums the checkpoints and
solves every ordered pair's map from sub-blocks (``analysis.affine``).

Validation pass: the same actors score each validation shard under every map
(affine least squares, logit compatibility, naive), each composed with the
target's classifier, and return only counts. The validation images must not be
training images (the same file, :func:`semprobe.datasets.images.image_identity`)
unless ``allow_overlap``: a map scored on images it was fitted on flatters it.

Layout under OUT::

    config.json, summary.json, errors.parquet
    gram/<actor run>.npz                   partial Grams and the shards they hold
    affine_maps/<method>/<source>__<target>.npy   (d_A + 1, d_B): weight rows, then the bias
    affine_maps/manifest.parquet           datasets.schema.AFFINE_MAPS, one row per map
    affine_scores.parquet                  datasets.schema.AFFINE_SCORES
    figures/affine_<method>.png            the N x N table as a heatmap
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util import ActorPool

from semprobe.actors.encoder import FeatureEncoder
from semprobe.analysis.affine import (
    AffineMap,
    JointGram,
    classifier_head,
    correct_count,
    fit_affine,
    logit_map,
    naive_map,
)
from semprobe.analysis.errors import InputError
from semprobe.datasets import schema
from semprobe.datasets.decode import ImageError, decode_image, read_bytes
from semprobe.datasets.images import resolve_images, shared_images
from semprobe.ray_jobs.config import AffineConfig
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.startup import connect, model_actors, open_output, write_resolved
from semprobe.ray_jobs.storage import Output, model_key

METHODS = ("affine", "logit", "naive")

# (method, source index, target index) -> the target's classifier composed with the map: (classes, d_A), (classes,)
Heads = dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class ValidationCounts:
    """Top-1 counts on validation images: of every head, and of each CNN alone; a shard's, or the sum of shards'."""

    correct: dict[tuple[str, int, int], int]  # per head (the keys of Heads): images put in their class
    own: list[int]  # per CNN: images its own classifier puts in their class
    n: int = 0  # images scored
    errors: list[dict[str, Any]] = field(default_factory=list)  # images skipped: rows of datasets.schema.ERRORS

    @classmethod
    def zero(cls, heads: Heads, n_models: int) -> ValidationCounts:
        return cls({key: 0 for key in heads}, [0] * n_models)

    def add(self, other: ValidationCounts) -> ValidationCounts:
        for key, count in other.correct.items():
            self.correct[key] += count
        self.own = [a + b for a, b in zip(self.own, other.own)]
        self.n += other.n
        self.errors += other.errors
        return self


def _decode(encoder: FeatureEncoder, rows: list[list[Any]]) -> tuple[list[np.ndarray], list[int], list[dict]]:
    """Each image decoded once per distinct model input; failures become error records."""
    kinds = {tuple(p.decode_args().items()) for p in encoder.preprocesses}
    decoded: dict[tuple, list[np.ndarray]] = {k: [] for k in kinds}
    labels, errors = [], []
    for image_id, uri, label in rows:
        try:
            data = read_bytes(uri)
            pixels = {k: decode_image(data, **dict(k)) for k in kinds}
        except ImageError as err:
            errors.append({"image_id": image_id, "uri": uri, "stage": err.stage, "message": str(err)})
            continue
        for k, x in pixels.items():
            decoded[k].append(x)
        labels.append(label)
    batch = [np.stack(decoded[tuple(p.decode_args().items())]) if labels else None for p in encoder.preprocesses]
    return batch, labels, errors


@ray.remote
class AffineWorker:
    """Every CNN on one device: training shards into a joint Gram, validation shards into counts."""

    def __init__(self, models: list[str], out: str, batch_size: int, checkpoint_every: int, threads: int | None):
        if threads is None and not ray.get_gpu_ids():
            threads = len(os.sched_getaffinity(0))  # a CPU-only forward pass wants the node
        self.encoder = FeatureEncoder(models, threads=threads)
        self.output, self.batch_size, self.every = Output(out), batch_size, checkpoint_every
        self.name = uuid.uuid4().hex[:12]
        self.gram, self.shards, self.errors = JointGram(self.encoder.names, self.encoder.widths), [], []

    def train_shard(self, shard: int, rows: list[list[Any]]) -> int:
        for lo in range(0, len(rows), self.batch_size):
            pixels, _, errors = _decode(self.encoder, rows[lo : lo + self.batch_size])
            self.errors += errors
            if pixels[0] is not None:
                self.gram.add(self.encoder(pixels)[0])
        self.shards.append(shard)
        if len(self.shards) % self.every == 0:
            self.checkpoint()
        return len(rows)

    def checkpoint(self) -> None:
        """Publish this actor's Gram so far, with the shards it holds (atomically replacing the last one)."""
        if not self.shards:
            return
        buf = io.BytesIO()
        np.savez(buf, gram=self.gram.gram, shards=np.array(self.shards), errors=np.array(json.dumps(self.errors)))
        self.output.write_bytes(buf.getvalue(), "gram", f"{self.name}.npz")

    def val_shard(self, rows: list[list[Any]], heads: Heads) -> ValidationCounts:
        """Correct counts of every (method, source, target) head on one validation shard, and each CNN alone."""
        counts = ValidationCounts.zero(heads, len(self.encoder.names))
        for lo in range(0, len(rows), self.batch_size):
            pixels, labels, bad = _decode(self.encoder, rows[lo : lo + self.batch_size])
            counts.errors += bad
            if pixels[0] is None:
                continue
            features, top1 = self.encoder(pixels)
            y = np.array(labels)
            counts.n += len(y)
            for i, t in enumerate(top1):
                counts.own[i] += int(np.count_nonzero(t == y))
            for (method, source, target), (weight, bias) in heads.items():
                counts.correct[(method, source, target)] += correct_count(features[source], y, None, weight, bias)
        return counts


def _shards(table: pa.Table, size: int, label: str) -> list[tuple[int, list[list[Any]]]]:
    rows = [list(r) for r in zip(table["image_id"].to_pylist(), table["uri"].to_pylist(), table[label].to_pylist())]
    return [(i // size, rows[i : i + size]) for i in range(0, len(rows), size)]


@holding_lease
def run_affine(cfg: AffineConfig, log=print) -> dict[str, Any]:
    """Fit and score every ordered pair of maps; returns the summary it also writes."""
    # The figures (matplotlib) are the driver's: imported here, not by the workers that import this module for
    # its actor
    from semprobe.analysis.figures import affine_heatmap

    output = open_output(cfg)
    train, val = resolve_images(cfg.train).images, resolve_images(cfg.val).images
    if val["class_index"].null_count:
        raise InputError(f"validation images {cfg.val} carry no ImageNet class indices: scoring needs them")
    if cfg.max_train and train.num_rows > cfg.max_train:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(train.num_rows, cfg.max_train, replace=False))
        train = train.take(keep)
    shared = shared_images(val, train)
    if shared and not cfg.allow_overlap:
        raise InputError(
            f"--train and --val share {len(shared)} of the {val.num_rows} validation images (e.g. {shared[0]}): "
            "a map scored on images it was fitted on flatters it; choose disjoint images, or pass --allow-overlap"
        )
    if shared:
        log(f"affine: {len(shared)} validation images are also training images (--allow-overlap)")
    encoder = FeatureEncoder(cfg.models, device="cpu")  # names, widths and classifiers; checks the models
    names, widths = encoder.names, encoder.widths
    if cfg.ridge == 0 and train.num_rows <= max(widths):
        wide = names[int(np.argmax(widths))]
        raise InputError(
            f"underdetermined: {train.num_rows} training images for the {max(widths)} features (+ bias) of {wide}; "
            "use more images than features, or pass --ridge L > 0"
        )
    connect(log)
    exp = cfg.experiment_id()
    weights = {name: loaded.weights for name, loaded in zip(names, encoder.loaded)}
    write_resolved(output, cfg, models=names, widths=widths, weights=weights)
    actors, gpus = model_actors(cfg.actors, cfg.gpus_per_actor)
    workers = [
        AffineWorker.options(num_gpus=gpus, num_cpus=cfg.cpus_per_actor).remote(
            cfg.models, cfg.out, cfg.batch_size, cfg.checkpoint_every, cfg.torch_threads
        )
        for _ in range(actors)
    ]

    # training pass: resume from the checkpoints' shards
    parts = output.list("gram", suffix=".npz")
    done: set[int] = set()
    for name in parts:
        with output.fs.open_input_file(output.path("gram", name)) as f:
            done |= set(np.load(io.BytesIO(f.read()))["shards"].tolist())
    pending = [(s, rows) for s, rows in _shards(train, cfg.shard_size, "class_index") if s not in done]
    progress = Progress(train.num_rows, "images", "affine: training features")
    progress.done = train.num_rows - sum(len(rows) for _, rows in pending)
    for n in ActorPool(workers).map_unordered(lambda w, item: w.train_shard.remote(*item), pending):
        progress.update(n)
    ray.get([w.checkpoint.remote() for w in workers])
    progress.close()

    gram, errors = JointGram(names, widths), []
    for name in output.list("gram", suffix=".npz"):
        with output.fs.open_input_file(output.path("gram", name)) as f:
            part = np.load(io.BytesIO(f.read()))
            gram.merge(JointGram(names, widths, part["gram"]))
            errors += json.loads(str(part["errors"]))
    log(
        f"affine: {gram.n} training images in the Gram ({len(errors)} skipped); "
        f"solving {len(names) * (len(names) - 1)} maps"
    )

    heads, manifest = _solve(output, encoder, gram, cfg.ridge)
    for target in dict.fromkeys(m["target"] for m in manifest if m["method"] == "logit" and not m["full_row_rank"]):
        rank = next(m["rank"] for m in manifest if m["target"] == target and m["method"] == "logit")
        log(
            f"affine: the classifier of {target} has rank {rank}, below its number of classes (fewer features than "
            "classes): its logit maps lose information"
        )
    progress = Progress(val.num_rows, "images", "affine: validation")
    totals = ValidationCounts.zero(heads, len(names))
    heads_ref = ray.put(heads)
    for result in ActorPool(workers).map_unordered(
        lambda w, item: w.val_shard.remote(item[1], heads_ref), _shards(val, cfg.shard_size, "class_index")
    ):
        totals.add(result)
        progress.update(result.n + len(result.errors))
    progress.close()

    scores = _scores(names, totals, gram.n)
    output.write_table(schema.stamp(scores, exp), "affine_scores.parquet")
    maps = pa.Table.from_pylist(manifest, schema=schema.AFFINE_MAPS)
    output.write_table(schema.stamp(maps, exp), "affine_maps", "manifest.parquet")
    errors = sorted(errors + totals.errors, key=lambda e: e["image_id"])
    output.write_table(schema.stamp(pa.Table.from_pylist(errors, schema=schema.ERRORS), exp), "errors.parquet")
    for method in METHODS:
        save_figure(output, affine_heatmap(scores.to_pylist(), names, method), "figures", f"affine_{method}.png")
    summary = {
        "experiment_id": exp,
        "models": names,
        "n_train": gram.n,
        "n_val": totals.n,
        "n_errors": len(errors),
        "n_overlap": len(shared),
        "maps": len(manifest),
    }
    output.write_json(summary, "summary.json")
    summary["train_shards_computed"] = len(pending)
    log(f"affine: scores in {output.uri}/affine_scores.parquet, figures in {output.uri}/figures")
    return summary


def _solve(output: Output, encoder: FeatureEncoder, gram: JointGram, ridge: float) -> tuple[Heads, list[dict]]:
    """Every ordered pair's maps, written; returns their heads (each map composed with the target's classifier)
    and the rows of affine_maps/manifest.parquet."""
    names, widths = encoder.names, encoder.widths
    classifiers = [encoder.classifier(i) for i in range(len(names))]
    heads, manifest = {}, []
    for a, source in enumerate(names):
        others = [b for b in range(len(names)) if b != a]
        fitted = fit_affine(gram, source, [names[b] for b in others], ridge)
        for b, affine in zip(others, fitted):
            maps: dict[str, AffineMap] = {
                "affine": affine,
                "logit": logit_map(source, names[b], *classifiers[a], *classifiers[b]),
                "naive": naive_map(source, names[b], widths[a], widths[b]),
            }
            for method, m in maps.items():
                file = f"{model_key(source)}__{model_key(names[b])}.npy"
                buf = io.BytesIO()
                np.save(buf, np.vstack([m.weight, m.bias[None]]))
                output.write_bytes(buf.getvalue(), "affine_maps", method, file)
                heads[(method, a, b)] = classifier_head(m, *classifiers[b])
                manifest.append(
                    {
                        "source": source,
                        "target": names[b],
                        "method": method,
                        "file": f"{method}/{file}",
                        "rcond": m.rcond,
                        "train_r2": m.r2,
                        "rank": getattr(m, "rank", None),
                        "full_row_rank": getattr(m, "full_row_rank", None),
                    }
                )
    return heads, manifest


def _scores(names: list[str], totals: ValidationCounts, n_train: int) -> pa.Table:
    n = max(totals.n, 1)
    own = [c / n for c in totals.own]
    rows = [
        {
            "source": s,
            "target": s,
            "method": method,
            "accuracy": own[i],
            "source_accuracy": own[i],
            "target_accuracy": own[i],
            "pct_change_vs_source": 0.0,
            "n_train": n_train,
            "n_val": totals.n,
        }
        for method in METHODS
        for i, s in enumerate(names)
    ]
    for (method, a, b), correct in totals.correct.items():
        acc = correct / n
        rows.append(
            {
                "source": names[a],
                "target": names[b],
                "method": method,
                "accuracy": acc,
                "source_accuracy": own[a],
                "target_accuracy": own[b],
                "pct_change_vs_source": 100 * (acc - own[a]) / own[a] if own[a] else None,
                "n_train": n_train,
                "n_val": totals.n,
            }
        )
    rows.sort(key=lambda r: (METHODS.index(r["method"]), names.index(r["source"]), names.index(r["target"])))
    return pa.Table.from_pylist(rows, schema=schema.AFFINE_SCORES)
