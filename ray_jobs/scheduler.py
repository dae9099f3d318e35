"""The 2 vs. 2 machinery of ``semprobe run`` and ``semprobe dynamics``: Gram, 2 vs. 2 and permutation
tasks on Ray, their scheduling and the reducer.

For each model extraction (a :class:`ModelPlan`): one Gram task per (layer, image set) computes
its w x w concept correlations from the memory-mapped activation store in bounded feature
chunks (with ``--store similarity`` a matrix task takes them from the extraction's own matrices:
:mod:`semprobe.ray_jobs.fused`); the 2 vs. 2 then runs stacked
(:func:`semprobe.analysis.kernels.stacked_two_vs_two`): the layers are grouped so that a group's (layer,
image set) matrices fit ``--stack-memory-mb``, and per group one observe task and
``permutations / permutation_shard`` permutation tasks each compute every matrix of the group against every
word model in one stacked product per permutation block, on the task's device (``--task-gpus``: a fraction
of a GPU each, packed by the scheduler) in ``--precision``; each test is written as its group's tasks
finish. The formulas are :mod:`semprobe.analysis.scores`' and :mod:`semprobe.analysis.kernels`'; this
module only places them on the cluster and reads and writes their files::

    similarity/<key>/<layer>/set-NNN.parquet       the CNN matrix of each image set
    similarity/<key>/words/<word model>.parquet    the word matrices over the same concepts
    tests/<key>/<word model>/<layer>.parquet       observed and null 2 vs. 2, as pair counts

Every file is a unit of resume: what exists is not recomputed.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.kernels import stack_matrices, stacked_two_vs_two
from semprobe.analysis.scores import (
    Family,
    LayerTest,
    adjust_family,
    chunk_features,
    concept_matrix,
    concept_pass_rates,
    score,
    word_matrix,
)
from semprobe.datasets import schema
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.startup import analysis_options, task_device
from semprobe.ray_jobs.storage import Output, model_key
from semprobe.ray_jobs.store import (
    layer_folder,
    layer_views,
    matrix_source,
    similarity_file,
    similarity_table,
    word_similarity_file,
)
from semprobe.ray_jobs.store import matrices as _matrices

if TYPE_CHECKING:  # a worker running this module's tasks imports neither the model code nor Ray Data
    from semprobe.ray_jobs.extraction import ExtractionPlan

# --- Ray tasks ------------------------------------------------------------------------------------


@ray.remote
def gram_task(
    out: str,
    folder: tuple[str, ...],
    model: str,
    layer: str,
    layer_index: int,
    set_index: int,
    images: list[str],
    concept_ids: list[str],
    memory_mb: int,
    compute: str,
    key: str | None = None,
) -> np.ndarray:
    """The (w, w) concept correlation matrix of one image set of one layer, written under ``key`` (default:
    the model's) and returned (float32).

    ``folder`` is the layer's activation store under ``out``; ``images`` lists the
    set's image per concept, in ``concept_ids`` order. The Gram is summed over
    chunks of features so that at most ``memory_mb`` of float32 is converted at a
    time, however wide the layer.
    """
    output = Output(out)
    w = len(concept_ids)
    with tempfile.TemporaryDirectory(prefix="semprobe-gram-") as scratch:
        where, views = layer_views(output, folder, scratch)
        located = np.array([where[i] for i in images])
        dim = views[0].shape[1]
        step = chunk_features(w, dim, memory_mb)
        buf = np.empty((w, step), np.float32)

        def chunks():
            for lo in range(0, dim, step):
                hi = min(dim, lo + step)
                for v in np.unique(located[:, 0]):
                    pos = np.flatnonzero(located[:, 0] == v)
                    buf[pos, : hi - lo] = views[v][located[pos, 1], lo:hi]
                yield buf[:, : hi - lo]

        try:
            matrix = concept_matrix(chunks(), w, compute)
        except ZeroVarianceError as err:
            raise zero_variance(model, layer, set_index, images, concept_ids, err.rows) from None
        finally:
            views.clear()  # release the memory maps before the scratch folder goes
    table = similarity_table(
        matrix, concept_ids, "cnn", model=model, layer=layer, layer_index=layer_index, set_index=set_index
    )
    output.write_table(table, *similarity_file(key or model_key(model), layer, set_index))
    return matrix


def zero_variance(
    model: str, layer: str, set_index: int, images: list[str], concept_ids: list[str], rows: list[int]
) -> InputError:
    culprits = ", ".join(f"{images[r]} ({concept_ids[r]})" for r in rows[:3])
    return InputError(
        f"zero-variance activations in {model} layer {layer}, set {set_index}: image {culprits}; "
        "its correlations are undefined (a constant input image or a dead layer)"
    )


@ray.remote
def matrix_task(
    out: str,
    source: tuple[str, ...],
    model: str,
    layer: str,
    layer_index: int,
    set_index: int,
    images: list[str],
    concept_ids: list[str],
    key: str,
) -> np.ndarray:
    """``--store similarity``'s counterpart of :func:`gram_task`: the (w, w) matrix over ``concept_ids`` of one image
    set of one layer, taken from the extraction's matrix over all the set's decoded images (``source`` under
    ``out``), written under ``key`` and returned (float32).

    The Pearson r of two rows does not depend on the other rows, so the sub-matrix over the kept concepts (those
    with an image in every set) is the matrix of the kept rows, as a Gram task computes it; a kept image whose
    row is constant (NaN in the extraction's matrix) is the same error as there.
    """
    output = Output(out)
    table = output.read_table(*source)
    position = {c: i for i, c in enumerate(table["concept_ids"][0].as_py())}
    kept = np.array([position[c] for c in concept_ids])
    matrix = _matrices(table)[0][np.ix_(kept, kept)]
    constant = np.flatnonzero(np.isnan(np.diagonal(matrix))).tolist()
    if constant:
        raise zero_variance(model, layer, set_index, images, concept_ids, constant)
    table = similarity_table(
        matrix, concept_ids, "cnn", model=model, layer=layer, layer_index=layer_index, set_index=set_index
    )
    output.write_table(table, *similarity_file(key, layer, set_index))
    return matrix


def test_file(key: str, word_model: str, layer: str) -> tuple[str, ...]:
    return "tests", key, model_key(word_model), f"{model_key(layer)}.parquet"


@ray.remote
def stacked_task(n_words: int, n_perm: int | None, seed: int, start: int, precision: str, *matrices) -> dict:
    """The 2 vs. 2 of the image matrices against the word matrices (``matrices``: the ``n_words`` word
    matrices, then every (layer, image set) matrix), observed (``n_perm`` None) or under permutations
    ``start`` .. ``start + n_perm - 1`` of the seed's sequence, on the task's device: the counts of
    :class:`semprobe.analysis.twovtwo.StackedTests` as a dict."""
    stacked = stacked_two_vs_two(
        matrices[n_words:], matrices[:n_words], n_perm, seed, start, device=task_device(), precision=precision
    )
    return vars(stacked)


# --- the scheduler ---------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """What the analysis of one model's extraction needs."""

    model: str
    key: str  # where its matrices and tests go: similarity/<key>/..., tests/<key>/...
    extract_key: str  # the extraction's folder: OUT/extract/<extract_key>
    layers: list[tuple[str, int]]  # (layer, layer_index)
    concept_ids: list[str]  # sorted, each with an extracted image in every set
    words: dict[str, list[str]]  # word model -> the word of each concept
    set_indices: list[int]
    images: list[list[str]]  # per set, the image of each concept
    left_out: list[str]  # concepts without an extracted image in some set (their image failed to decode)
    store: str = "activations"  # the extraction's --store mode: where the matrices come from


def plan_model(
    output: Output, extract_key: str, plan: ExtractionPlan, log, key: str | None = None, store: str = "activations"
) -> ModelPlan:
    """Concepts with an image in every set (after decode errors), their words, the layers; results under
    ``key`` (default: the model's); ``store``, the extraction's mode."""
    ext = Output(posixpath.join(output.uri, "extract", extract_key))
    manifest, errors = ext.read_table("manifest.parquet"), ext.read_table("errors.parquet")
    ok = manifest.filter(pc.invert(pc.is_in(manifest["image_id"], errors["image_id"])))
    sets = sorted(set(manifest["set_index"].to_pylist()))
    by_set = {k: {} for k in sets}
    for image_id, concept_id, k in zip(*(ok[c].to_pylist() for c in ("image_id", "concept_id", "set_index"))):
        by_set[k][concept_id] = image_id
    all_concepts = sorted(set(manifest["concept_id"].to_pylist()))
    kept = [c for c in all_concepts if all(c in by_set[k] for k in sets)]
    if len(kept) < len(all_concepts):
        log(
            f"  {plan.model}: {len(all_concepts) - len(kept)} concept(s) lack an extracted image in some set "
            f"and are left out"
        )
    if len(kept) < 4:
        raise InputError(
            f"{plan.model}: only {len(kept)} concept(s) have an image in every set; the 2 vs. 2 needs at least 4"
        )
    concepts = ext.read_table("concepts.parquet")
    words = {}
    for word_model in plan.config.words:
        rows = concepts.filter(pc.equal(concepts["word_model"], word_model))
        lookup = dict(zip(rows["concept_id"].to_pylist(), rows["word"].to_pylist()))
        words[word_model] = [lookup[c] for c in kept]
    return ModelPlan(
        model=plan.model,
        key=key or plan.model_key,
        extract_key=extract_key,
        layers=[(layer.name, layer.layer_index) for layer in plan.layers],
        concept_ids=kept,
        words=words,
        set_indices=sets,
        images=[[by_set[k][c] for c in kept] for k in sets],
        left_out=[c for c in all_concepts if c not in kept],
        store=store,
    )


def stored_word_matrix(output: Output, model_plan: ModelPlan, word_model: str, cache: str | None = None) -> np.ndarray:
    """The word model's w x w matrix over the model's concepts, as stored (float32); ``cache``: the job's word
    cache (the planning's reader, already loaded)."""
    parts = word_similarity_file(model_plan.key, word_model)
    if not output.exists(*parts):
        vectors = load_word_model(word_model, cache=cache).vectors(model_plan.words[word_model])
        output.write_table(similarity_table(word_matrix(vectors), model_plan.concept_ids, word_model), *parts)
    return _matrices(output.read_table(*parts))[0]


@dataclass
class PendingTest:
    """One (model, word model, layer) test, computed: observed passes (K,), concept passes (K, w), the null
    (n_perm, K)."""

    model_plan: ModelPlan
    word_model: str
    layer: str
    layer_index: int
    passes: np.ndarray
    concept_passes: np.ndarray
    null: np.ndarray


@dataclass
class PendingGroup:
    """The tests of a group of one model's layers against some word models in flight: one observe task and the
    permutation tasks, each over every (layer, image set) matrix of the group and every word model."""

    model_plan: ModelPlan
    layers: list[tuple[str, int]]
    word_models: list[str]
    refs: list[ray.ObjectRef]
    done: int = 0


@dataclass
class TwoVsTwoScheduler:
    """Submits the tasks of each model as its extraction finishes; writes each test as its tasks finish."""

    cfg: Any  # RunConfig or DynamicsConfig: words, permutations, seed, the shard, Gram and task options
    output: Output
    log: Any = print
    pending: list[PendingGroup] = field(default_factory=list)
    grams: list[ray.ObjectRef] = field(default_factory=list)
    matrix_tasks: list[ray.ObjectRef] = field(default_factory=list)  # --store similarity's, in place of Grams
    n_tests: int = 0
    n_todo: int = 0
    n_tasks: int = 0
    computed: int = 0
    rechecked: int = 0
    decided: int = 0

    def submit(self, model_plan: ModelPlan) -> None:
        cfg, out = self.cfg, self.output
        # SPREAD: the statistics are compute- and memory-bound; over every node they run side by side.
        options = analysis_options(cfg, self.log if not self.n_tests else None) | {"scheduling_strategy": "SPREAD"}
        matrix_options = {"num_cpus": cfg.task_cpus, "scheduling_strategy": "SPREAD"}  # numpy: no GPU share
        cache = cfg.word_cache_dir()
        words = {name: ray.put(stored_word_matrix(out, model_plan, name, cache)) for name in cfg.words}
        todo = {}
        for layer, layer_index in model_plan.layers:
            missing = [name for name in cfg.words if not out.exists(*test_file(model_plan.key, name, layer))]
            self.n_tests += len(cfg.words)
            if missing:
                todo[(layer, layer_index)] = missing
        k, w = len(model_plan.set_indices), len(model_plan.concept_ids)
        per_group = max(1, stack_matrices(w, cfg.precision, cfg.stack_memory_mb) // k)
        layers = list(todo)
        for lo in range(0, len(layers), per_group):
            group = layers[lo : lo + per_group]
            names = [name for name in cfg.words if any(name in todo[layer] for layer in group)]
            sets = [ref for layer, idx in group for ref in self.set_matrices(model_plan, layer, idx, matrix_options)]
            args = [words[name] for name in names] + sets
            starts = range(0, cfg.permutations, cfg.permutation_shard)
            refs = [stacked_task.options(**options).remote(len(names), None, cfg.seed, 0, cfg.precision, *args)] + [
                stacked_task.options(**options).remote(
                    len(names), min(cfg.permutation_shard, cfg.permutations - s), cfg.seed, s, cfg.precision, *args
                )
                for s in starts
            ]
            self.pending.append(PendingGroup(model_plan, group, names, refs))
            self.n_todo += sum(len(todo[layer]) for layer in group)
            self.n_tasks += len(refs)

    def set_matrices(self, model_plan: ModelPlan, layer: str, layer_index: int, options: dict) -> list:
        """One matrix (ref) per image set of ``layer``: stored, else a Gram task's over the activation store, or
        with ``--store similarity`` a matrix task's, the sub-matrix of the extraction's over the kept concepts."""
        cfg, out, refs = self.cfg, self.output, []
        for set_index, images in zip(model_plan.set_indices, model_plan.images):
            parts = similarity_file(model_plan.key, layer, set_index)
            if out.exists(*parts):
                refs.append(ray.put(_matrices(out.read_table(*parts))[0]))
            elif model_plan.store == "similarity":
                source = ("extract", model_plan.extract_key, *matrix_source(model_plan.model, layer, set_index))
                refs.append(
                    matrix_task.options(**options).remote(
                        out.uri, source, model_plan.model, layer, layer_index, set_index, images,
                        model_plan.concept_ids, model_plan.key,
                    )
                )  # fmt: skip
                self.matrix_tasks.append(refs[-1])
            else:
                folder = ("extract", model_plan.extract_key, *layer_folder(model_plan.model, layer))
                refs.append(
                    gram_task.options(**options).remote(
                        out.uri, folder, model_plan.model, layer, layer_index, set_index, images,
                        model_plan.concept_ids, cfg.gram_memory_mb, cfg.gram_compute, model_plan.key,
                    )
                )  # fmt: skip
                self.grams.append(refs[-1])
        return refs

    def wait(self) -> None:
        """Gather finished tasks into test files, with progress, until none is pending."""
        progress = Progress(self.n_tasks, "tasks", "2 vs. 2 and permutations")
        owner = {ref: group for group in self.pending for ref in group.refs}
        remaining = list(owner)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=1.0)
            for ref in ready:
                group = owner[ref]
                group.done += 1
                if group.done == len(group.refs):
                    self._write_group(group)
            if ready:
                progress.update(len(ready))
        progress.close()
        if self.decided and self.cfg.precision != "fp64":
            self.log(
                f"{self.cfg.precision}: {self.rechecked} of {self.decided} pair decisions "
                f"({self.rechecked / self.decided:.3%}) lay within the error bound and were recomputed in fp64"
            )

    def _write_group(self, group: PendingGroup) -> None:
        observed, *shards = get(group.refs)
        for part in (observed, *shards):
            self.rechecked, self.decided = self.rechecked + part["rechecked"], self.decided + part["decided"]
        k = len(group.model_plan.set_indices)
        for m, name in enumerate(group.word_models):
            for g, (layer, layer_index) in enumerate(group.layers):
                if self.output.exists(*test_file(group.model_plan.key, name, layer)):
                    continue
                cols = slice(g * k, (g + 1) * k)
                null = np.concatenate([s["passes"][:, m, cols] for s in shards]) if shards else np.zeros((0, k))
                test = PendingTest(group.model_plan, name, layer, layer_index, observed["passes"][0, m, cols],
                                   observed["concept_passes"][m, cols], null)  # fmt: skip
                self._write_test(test)

    def _write_test(self, test: PendingTest) -> None:
        plan = test.model_plan
        k, w, null = len(plan.set_indices), len(plan.concept_ids), test.null
        table = pa.table(
            [
                [plan.model] * k,
                [test.layer] * k,
                pa.array([test.layer_index] * k, pa.int32()),
                [test.word_model] * k,
                pa.array(plan.set_indices, pa.int32()),
                pa.array([w] * k, pa.int32()),
                pa.array([w * (w - 1) // 2] * k, pa.int64()),
                pa.array(test.passes, pa.int64()),
                [plan.concept_ids] * k,
                pa.array(list(test.concept_passes), pa.list_(pa.int32())),
                pa.array([null[:, s].astype(np.int32) for s in range(k)], pa.list_(pa.int32())),
            ],
            schema=schema.TESTS,
        )
        self.output.write_table(table, *test_file(plan.key, test.word_model, test.layer))
        self.computed += 1


def get(refs):
    """ray.get, with bad input raised in a task surfacing as the one-line InputError it is."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):
            raise InputError(str(err.cause)) from None
        raise


# --- the reducer -----------------------------------------------------------------------------------


@dataclass
class Scores:
    """The reduced tests as rows: ``scores`` (one per model x layer x word model, BHY within each family),
    ``scores_by_set``, ``concept_scores`` (over sets) and ``concept_scores_by_set``; ``families``, the BHY
    families of ``scores``."""

    scores: list[dict[str, Any]]
    by_set: list[dict[str, Any]]
    concepts: list[dict[str, Any]]
    concepts_by_set: list[dict[str, Any]]
    families: list[Family] = field(default_factory=list)

    def tables(self) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
        return (
            pa.Table.from_pylist(self.scores, schema=schema.SCORES),
            pa.Table.from_pylist(self.by_set, schema=schema.SCORES_BY_SET),
            pa.Table.from_pylist(self.concepts, schema=schema.CONCEPT_SCORES),
            pa.Table.from_pylist(self.concepts_by_set, schema=schema.CONCEPT_SCORES_BY_SET),
        )


def layer_test(table: pa.Table) -> LayerTest:
    """A stored test (one row per image set) as counts."""
    k = table.num_rows
    return LayerTest(
        passes=np.asarray(table["passes"].to_numpy(), np.int64),
        null_passes=np.array(table["null_passes"].to_pylist(), np.int64).reshape(k, -1).T,
        concept_passes=np.array(table["concept_passes"].to_pylist(), np.int32),
        n_concepts=table["n_concepts"][0].as_py(),
    )


def reduce_scores(
    tests: list[pa.Table],
    alpha: float,
    extra: dict[str, Any] | None = None,
    adjust: bool = True,
    family: tuple[str, ...] = (),
) -> Scores:
    """The scores of the stored tests (one table per model x layer x word model); ``extra`` columns on every
    row; BHY within each family of rows sharing their values of the columns ``family`` (none: one family of
    all), unless ``adjust`` is off (the caller adjusts over rows it gathers)."""
    reduced = Scores([], [], [], [])
    for table in tests:
        test = layer_test(table)
        head = table.slice(0, 1).to_pylist()[0]
        base = {c: head[c] for c in ("model", "layer", "layer_index", "word_model")} | (extra or {})
        over_sets, by_set = score(test)
        reduced.scores.append({**base, **over_sets})
        set_indices = table["set_index"].to_pylist()
        reduced.by_set += [{**base, "set_index": k, **row} for k, row in zip(set_indices, by_set)]
        mean_rates, set_rates = concept_pass_rates(test)
        concept_ids = head["concept_ids"]
        reduced.concepts += [
            {**base, "concept_id": c, "word": None, "pass_rate": float(v)} for c, v in zip(concept_ids, mean_rates)
        ]
        reduced.concepts_by_set += [
            {**base, "set_index": k, "concept_id": c, "word": None, "pass_rate": float(v)}
            for k, rates in zip(set_indices, set_rates)
            for c, v in zip(concept_ids, rates)
        ]
    if adjust:
        reduced.families = adjust_family(reduced.scores, alpha, family)
    return reduced
