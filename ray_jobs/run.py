"""``semprobe run``: the main job. Every layer of every CNN against every word model.

extraction per model (``ray_jobs.extract``) -> Gram tasks, one per (model, layer, set):
the w x w concept correlations of each image set, from the memory-mapped
activation store in bounded feature chunks -> 2 vs. 2 tasks, one per (model,
layer, word model), and permutation-shard tasks (``permutation_shard``
permutations each) over those small matrices -> reducer: mean and std over sets,
permutation p-values, BHY over the whole family -> tables, figure, report.

Layout under OUT (besides the extractions under ``extract/<model>/``)::

    config.json                                   the resolved config
    similarity/<model>/<layer>/set-NNN.parquet    the CNN matrix of each image set
    similarity/<model>/words/<word model>.parquet the word matrices over the same concepts
    tests/<model>/<word model>/<layer>.parquet    observed and null 2 vs. 2, as pair counts
    scores.parquet, concept_scores.parquet        the results (datasets.schema.SCORES, CONCEPT_SCORES)
    figures/<model>.png, report.html, summary.json

Every file is published atomically and is a unit of resume: a rerun recomputes
only what is missing, and every number downstream is computed from the files
as stored, so a resumed run ends with the same bytes.
"""

from __future__ import annotations

import io
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.figures import layer_curves
from semprobe.analysis.similarity import GramAccumulator, correlation_matrix
from semprobe.analysis.stats import bhy, permutation_p_value
from semprobe.analysis.twovtwo import permutation_null, two_vs_two
from semprobe.datasets import schema
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.config import DynamicsConfig, RunConfig
from semprobe.ray_jobs.extraction import ExtractionPlan, plan_extraction, run_extract
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.report import write_report
from semprobe.ray_jobs.startup import check_same_experiment, connect, write_resolved
from semprobe.ray_jobs.storage import Output, model_key
from semprobe.ray_jobs.store import layer_views

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
    """The (w, w) concept correlation matrix of one image set of one layer, written and returned (float32).

    ``images`` lists the set's image per concept, in ``concept_ids`` order; the
    matrix is written under the analysis key (default: the model's). The
    Gram is summed over chunks of features so that at most ``memory_mb`` of
    float32 is converted at a time, however wide the layer.
    """
    output = Output(out)
    w = len(concept_ids)
    with tempfile.TemporaryDirectory(prefix="semprobe-gram-") as scratch:
        where, views = layer_views(output, folder, scratch)
        dim = views[0].shape[1]
        chunk = max(1, min(dim, memory_mb * 2**20 // (4 * w)))
        buf = np.empty((w, chunk), np.float32)
        located = np.array([where[i] for i in images])
        acc = GramAccumulator(w, compute)
        for lo in range(0, dim, chunk):
            hi = min(dim, lo + chunk)
            for v in np.unique(located[:, 0]):
                pos = np.flatnonzero(located[:, 0] == v)
                buf[pos, : hi - lo] = views[v][located[pos, 1], lo:hi]
            acc.add(buf[:, : hi - lo])
        del views, where  # release the memory maps before the scratch folder goes
    try:
        matrix = acc.correlation().astype(np.float32)
    except ZeroVarianceError as err:
        culprits = ", ".join(f"{images[r]} ({concept_ids[r]})" for r in err.rows[:3])
        raise InputError(
            f"zero-variance activations in {model} layer {layer}, set {set_index}: image {culprits}; "
            "its correlations are undefined (a constant input image or a dead layer)"
        ) from None
    table = pa.table(
        [
            [model],
            [layer],
            pa.array([layer_index], pa.int32()),
            pa.array([set_index], pa.int32()),
            ["cnn"],
            [concept_ids],
            pa.FixedShapeTensorArray.from_numpy_ndarray(matrix[None].copy()),
        ],
        schema=schema.similarity(w),
    )
    output.write_table(table, *similarity_file(key or model_key(model), layer, set_index))
    return matrix


def similarity_file(key: str, layer: str, set_index: int) -> tuple[str, ...]:
    return "similarity", key, model_key(layer), f"set-{set_index:03d}.parquet"


@ray.remote
def observe_task(word: np.ndarray, *sets: np.ndarray) -> dict[str, np.ndarray]:
    """The observed 2 vs. 2 of every image set: pairs passed, in total and per concept."""
    results = [two_vs_two(a, word) for a in sets]
    return {
        "passes": np.array([int(r.passed.sum()) // 2 for r in results], np.int64),
        "concept_passes": np.stack([r.passed.sum(axis=1) for r in results]).astype(np.int32),
    }


@ray.remote
def permutation_task(word: np.ndarray, n_perm: int, seed: int, start: int, *sets: np.ndarray) -> np.ndarray:
    """(n_perm, K) pairs passed under permutations start .. start + n_perm - 1 of the seed's sequence."""
    return permutation_null(sets, word, n_perm, seed, start).passes


# --- the driver ------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """What the analysis of one model's extraction needs."""

    model: str
    key: str
    extract_key: str  # the extraction's folder: OUT/extract/<extract_key>
    layers: list[tuple[str, int]]  # (layer, layer_index)
    concept_ids: list[str]  # sorted, each with an extracted image in every set
    words: dict[str, list[str]]  # word model -> the word of each concept
    set_indices: list[int]
    images: list[list[str]]  # per set, the image of each concept
    left_out: list[str]  # concepts without an extracted image in some set (their image failed to decode)


def plan_model(output: Output, extract_key: str, plan: ExtractionPlan, log) -> ModelPlan:
    """Concepts with an image in every set (after decode errors), their words, the layers."""
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
    for wm in plan.config.words:
        rows = concepts.filter(pc.equal(concepts["word_model"], wm))
        lookup = dict(zip(rows["concept_id"].to_pylist(), rows["word"].to_pylist()))
        words[wm] = [lookup[c] for c in kept]
    return ModelPlan(
        plan.model,
        plan.model_key,
        extract_key,
        [(layer.name, layer.layer_index) for layer in plan.layers],
        kept,
        words,
        sets,
        [[by_set[k][c] for c in kept] for k in sets],
        [c for c in all_concepts if c not in kept],
    )


def word_matrix(output: Output, mp: ModelPlan, wm: str) -> np.ndarray:
    """The word model's w x w matrix over the model's concepts, as stored (float32)."""
    parts = ("similarity", mp.key, "words", f"{model_key(wm)}.parquet")
    if not output.exists(*parts):
        m = correlation_matrix(load_word_model(wm).vectors(mp.words[wm])).astype(np.float32)
        w = len(mp.concept_ids)
        table = pa.table(
            [
                [None],
                [None],
                pa.array([None], pa.int32()),
                pa.array([None], pa.int32()),
                [wm],
                [mp.concept_ids],
                pa.FixedShapeTensorArray.from_numpy_ndarray(m[None].copy()),
            ],
            schema=schema.similarity(w),
        )
        output.write_table(table, *parts)
    return _matrices(output.read_table(*parts))[0]


def _matrices(table: pa.Table) -> np.ndarray:
    return table["matrix"].combine_chunks().to_numpy_ndarray()


class Analysis:
    """Submits the tasks of each model as its extraction finishes; writes each test as its tasks finish."""

    def __init__(self, cfg: RunConfig | DynamicsConfig, output: Output):
        self.cfg, self.output = cfg, output
        self.pending: dict[tuple[str, str, str], dict[str, Any]] = {}  # (model key, word, layer) -> refs and metadata
        self.grams: list[ray.ObjectRef] = []
        self.n_tests = self.n_tasks = self.computed = 0

    def submit(self, mp: ModelPlan) -> None:
        cfg, out = self.cfg, self.output
        # SPREAD: the statistics are CPU- and memory-bound; over every node they run side by side.
        options = {"num_cpus": cfg.task_cpus, "scheduling_strategy": "SPREAD"}
        words = {wm: ray.put(word_matrix(out, mp, wm)) for wm in cfg.words}
        for layer, layer_index in mp.layers:
            todo = [
                wm for wm in cfg.words if not out.exists("tests", mp.key, model_key(wm), f"{model_key(layer)}.parquet")
            ]
            self.n_tests += len(cfg.words)
            if not todo:
                continue
            sets = []  # one matrix per image set: stored, or a Gram task's result
            for set_index, images in zip(mp.set_indices, mp.images):
                parts = similarity_file(mp.key, layer, set_index)
                if out.exists(*parts):
                    sets.append(ray.put(_matrices(out.read_table(*parts))[0]))
                else:
                    sets.append(
                        gram_task.options(**options).remote(
                            out.uri,
                            ("extract", mp.extract_key, "activations", model_key(mp.model), layer),
                            mp.model,
                            layer,
                            layer_index,
                            set_index,
                            images,
                            mp.concept_ids,
                            cfg.gram_memory_mb,
                            cfg.gram_compute,
                            mp.key,
                        )
                    )
                    self.grams.append(sets[-1])
            for wm in todo:
                shards = range(0, cfg.permutations, cfg.permutation_shard)
                refs = [observe_task.options(**options).remote(words[wm], *sets)] + [
                    permutation_task.options(**options).remote(
                        words[wm], min(cfg.permutation_shard, cfg.permutations - s), cfg.seed, s, *sets
                    )
                    for s in shards
                ]
                self.pending[(mp.key, wm, layer)] = {"refs": refs, "mp": mp, "layer_index": layer_index}
                self.n_tasks += len(refs)

    def wait(self) -> None:
        """Gather finished tasks into test files, with progress, until none is pending."""
        progress = Progress(self.n_tasks, "tasks", "2 vs. 2 and permutations")
        owner = {ref: key for key, item in self.pending.items() for ref in item["refs"]}
        remaining = list(owner)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=1.0)
            for ref in ready:
                key = owner[ref]
                item = self.pending[key]
                item["done"] = item.get("done", 0) + 1
                if item["done"] == len(item["refs"]):
                    self._write_test(key, item)
            if ready:
                progress.update(len(ready))
        progress.close()

    def _write_test(self, key: tuple[str, str, str], item: dict[str, Any]) -> None:
        _, wm, layer = key
        mp: ModelPlan = item["mp"]
        observed, *shards = _get(item["refs"])
        k, w = len(mp.set_indices), len(mp.concept_ids)
        null = np.concatenate(shards) if shards else np.zeros((0, k), np.int64)
        table = pa.table(
            [
                [mp.model] * k,
                [layer] * k,
                pa.array([item["layer_index"]] * k, pa.int32()),
                [wm] * k,
                pa.array(mp.set_indices, pa.int32()),
                pa.array([w] * k, pa.int32()),
                pa.array([w * (w - 1) // 2] * k, pa.int64()),
                pa.array(observed["passes"], pa.int64()),
                [mp.concept_ids] * k,
                pa.array(list(observed["concept_passes"]), pa.list_(pa.int32())),
                pa.array([null[:, s].astype(np.int32) for s in range(k)], pa.list_(pa.int32())),
            ],
            schema=schema.TESTS,
        )
        self.output.write_table(table, "tests", mp.key, model_key(wm), f"{model_key(layer)}.parquet")
        self.computed += 1


def _get(refs):
    """ray.get, with bad input raised in a task surfacing as the one-line InputError it is."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):
            raise InputError(str(err.cause)) from None
        raise


# --- the reducer -----------------------------------------------------------------------------------


def reduce_scores(tests: list[pa.Table], alpha: float) -> tuple[pa.Table, pa.Table]:
    """scores and concept_scores from the test tables (one per model x layer x word model)."""
    rows, concept_rows = [], []
    for t in tests:
        r = t.to_pylist()
        k, n_pairs, w = len(r), r[0]["n_pairs"], r[0]["n_concepts"]
        base = {c: r[0][c] for c in ("model", "layer", "layer_index", "word_model")}
        passes = np.array([x["passes"] for x in r], np.int64)
        null = np.array([x["null_passes"] for x in r], np.int64).reshape(k, -1)  # (K, n_perm)
        n_perm = null.shape[1]
        acc_sets, null_sets = passes / n_pairs, null / n_pairs
        acc, null_mean_over_sets = passes.sum() / (k * n_pairs), null.sum(axis=0) / (k * n_pairs)

        def stats(observed, draws, n_perm=n_perm):
            if not n_perm:
                return {"null_mean": None, "null_std": None, "p_value": None}
            return {
                "null_mean": float(draws.mean()),
                "null_std": float(draws.std()),
                "p_value": permutation_p_value(draws, observed),
            }

        common = {**base, "n_concepts": w, "n_pairs": n_pairs, "n_perm": n_perm, "p_bhy": None, "significant": None}
        rows.append(
            {
                **common,
                "set_index": None,
                "accuracy": float(acc),
                "std": float(np.std(acc_sets, ddof=1 if k > 1 else 0)),
                **stats(acc, null_mean_over_sets),
            }
        )
        for s, x in enumerate(r):
            rows.append(
                {
                    **common,
                    "set_index": x["set_index"],
                    "accuracy": float(acc_sets[s]),
                    "std": None,
                    **stats(acc_sets[s], null_sets[s]),
                }
            )
        per_concept = np.array([x["concept_passes"] for x in r], np.float64) / (w - 1)  # (K, w)
        words = r[0]["concept_ids"]
        for set_index, rates in [(None, per_concept.mean(axis=0))] + [
            (x["set_index"], per_concept[s]) for s, x in enumerate(r)
        ]:
            concept_rows += [
                {**base, "set_index": set_index, "concept_id": c, "word": None, "pass_rate": float(v)}
                for c, v in zip(words, rates)
            ]
    adjust_family(rows, alpha)
    return pa.Table.from_pylist(rows, schema=schema.SCORES), pa.Table.from_pylist(
        concept_rows, schema=schema.CONCEPT_SCORES
    )


def adjust_family(rows: list[dict[str, Any]], alpha: float) -> None:
    """Set p_bhy and significant on every mean-over-sets row with a p-value: BHY over them all, one family."""
    means = [i for i, row in enumerate(rows) if row["set_index"] is None and row["p_value"] is not None]
    significant, adjusted = bhy([rows[i]["p_value"] for i in means], alpha)
    for i, sig, adj in zip(means, significant, adjusted):
        rows[i]["p_bhy"], rows[i]["significant"] = float(adj), bool(sig)


def _name_concepts(concept_scores: pa.Table, concepts: pa.Table) -> pa.Table:
    """Fill in each concept's word (in its row's word model)."""
    words = {(c, wm): w for c, wm, w in zip(*(concepts[x].to_pylist() for x in ("concept_id", "word_model", "word")))}
    named = [
        words[(c, wm)]
        for c, wm in zip(concept_scores["concept_id"].to_pylist(), concept_scores["word_model"].to_pylist())
    ]
    return concept_scores.set_column(
        concept_scores.schema.get_field_index("word"), "word", pa.array(named, pa.string())
    )


def run(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the main job; returns the summary it also writes to OUT/summary.json."""
    output = Output(cfg.out)
    check_same_experiment(output, cfg)
    extract_outs = {m: posixpath.join(cfg.out, "extract", model_key(m)) for m in cfg.models}
    plans = {
        m: plan_extraction(cfg.extract_config(m, extract_outs[m], cfg.words, cfg.sets)) for m in cfg.models
    }  # all bad input, before any write
    connect(log)
    exp = cfg.experiment_id()
    write_resolved(output, cfg)
    started = time.monotonic()
    analysis, models = Analysis(cfg, output), {}
    for m in cfg.models:
        run_extract(cfg.extract_config(m, extract_outs[m], cfg.words, cfg.sets), log=log, plan=plans[m])
        models[m] = plan_model(output, model_key(m), plans[m], log)
        analysis.submit(models[m])
    if analysis.pending:
        log(
            f"analysis: {len(analysis.grams)} Gram task(s), {len(analysis.pending)} of {analysis.n_tests} tests to run "
            f"({analysis.n_tasks} tasks)"
        )
    analysis.wait()

    tests = [
        output.read_table("tests", plans[m].model_key, model_key(wm), f"{model_key(layer.name)}.parquet")
        for m in cfg.models
        for wm in cfg.words
        for layer in plans[m].layers
    ]
    scores, concept_scores = reduce_scores(tests, cfg.alpha)
    concepts = Output(extract_outs[cfg.models[0]]).read_table("concepts.parquet")
    concept_scores = _name_concepts(concept_scores, concepts)
    output.write_table(schema.stamp(scores, exp), "scores.parquet")
    output.write_table(schema.stamp(concept_scores, exp), "concept_scores.parquet")
    figures = {}
    for m in cfg.models:
        buf = io.BytesIO()
        layer_curves(scores.to_pylist(), plans[m].model, cfg.alpha).savefig(buf, format="png", dpi=110)
        figures[plans[m].model] = buf.getvalue()
        output.write_bytes(buf.getvalue(), "figures", f"{plans[m].model_key}.png")
    coverage = {
        plans[m].model: (plans[m], models[m].left_out, Output(extract_outs[m]).read_table("errors.parquet"))
        for m in cfg.models
    }
    report = write_report(output, cfg, scores, concept_scores, figures, coverage)
    summary = {
        "experiment_id": exp,
        "models": cfg.models,
        "words": cfg.words,
        "n_tests": len(tests),
        "tests_computed": analysis.computed,
        "gram_tasks": len(analysis.grams),
        "n_significant": int(pc.sum(pc.fill_null(scores["significant"], False)).as_py() or 0),
        "seconds": round(time.monotonic() - started, 3),
        "report": report,
    }
    output.write_json(
        {k: v for k, v in summary.items() if k not in ("seconds", "tests_computed", "gram_tasks")}, "summary.json"
    )
    log(f"report: {report}")
    return summary
