"""``semprobe run``: the main job. Every layer of every CNN against every word model.

extraction of every model through one pipeline (:mod:`semprobe.ray_jobs.extraction`) -> Gram tasks, one per (model,
layer, set): the w x w concept correlations of each image set, from the memory-mapped
activation store in bounded feature chunks (with ``--store similarity``, the default when the
model actors get GPUs, the actors compute those matrices themselves and no activation is
written: :mod:`semprobe.ray_jobs.fused`) -> the stacked 2 vs. 2: per group of a model's layers,
one observe task and permutation-shard tasks (``permutation_shard`` permutations each), each over
the group's (layer, set) matrices and every word model, on the tasks' devices in ``--precision``
(:mod:`semprobe.ray_jobs.scheduler`) -> reducer: mean and std over sets,
permutation p-values, BHY within each family (``--family``) -> tables, figure, report.

Layout under OUT (besides the extractions under ``extract/<model>/``)::

    config.json                                   the resolved config, and the weights each model loaded
    similarity/<model>/<layer>/set-NNN.parquet    the CNN matrix of each image set
    similarity/<model>/words/<word model>.parquet the word matrices over the same concepts
    tests/<model>/<word model>/<layer>.parquet    observed and null 2 vs. 2, as pair counts
    scores.parquet                                one row per (model, layer, word model): mean over sets, p, BHY
    scores_by_set.parquet                         one row per (model, layer, word model, image set)
    concept_scores.parquet                        per concept: its pairs passed, mean over sets
    concept_scores_by_set.parquet                 the same per image set
    figures/<model>.png                           the layer curves (--x names or depth)
    figures/<model>_architecture.svg and .png     the architecture coloured by 2 vs. 2 (the first word model)
    figures/<model>_similarity.png                first, best and last layer's matrices and the word matrices
    figures/<model>_concepts_<word model>.png     per-concept pass rates: the 20 best and the 20 worst concepts
    report.html, summary.json

Every file is published atomically and is a unit of resume: a rerun recomputes
only what is missing, and every number downstream is computed from the files
as stored, so a resumed run ends with the same bytes.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from semprobe.analysis.figures import layer_curves
from semprobe.analysis.scores import family_columns
from semprobe.datasets import schema
from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.extraction import plan_extraction
from semprobe.ray_jobs.figures import save_architecture, save_figure
from semprobe.ray_jobs.fused import run_extractions
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.report import family_summary, write_report
from semprobe.ray_jobs.run_figures import concept_figures, similarity_figure
from semprobe.ray_jobs.scheduler import TwoVsTwoScheduler, plan_model, reduce_scores, test_file
from semprobe.ray_jobs.startup import connect, open_output, store_mode, write_resolved
from semprobe.ray_jobs.storage import Output, model_key


def _name_concepts(concept_scores: pa.Table, concepts: pa.Table) -> pa.Table:
    """Fill in each concept's word (in its row's word model)."""
    columns = ("concept_id", "word_model", "word")
    words = {(c, name): word for c, name, word in zip(*(concepts[x].to_pylist() for x in columns))}
    keys = zip(concept_scores["concept_id"].to_pylist(), concept_scores["word_model"].to_pylist())
    named = pa.array([words[key] for key in keys], pa.string())
    return concept_scores.set_column(concept_scores.schema.get_field_index("word"), "word", named)


def _model_panels(output: Output, cfg: RunConfig, model_plan, scores: list[dict], concept_scores: pa.Table) -> list:
    """The report's figures of one model beyond its curves, each (heading, PNG): the similarity matrices, then the
    concepts through the layers per word model; saved as figures/<model>_similarity.png and
    figures/<model>_concepts_<word model>.png."""
    key = model_plan.key
    matrices = similarity_figure(output, model_plan, scores, cfg.words)
    panels = [("Similarity matrices", save_figure(output, matrices, "figures", f"{key}_similarity.png"))]
    for word_model, figure in concept_figures(concept_scores.to_pylist(), model_plan.model, cfg.words, cfg.x).items():
        png = save_figure(output, figure, "figures", f"{key}_concepts_{model_key(word_model)}.png")
        panels.append((f"Concepts through the layers, against {word_model}", png))
    return panels


@holding_lease
def run(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the main job; returns the summary it also writes to OUT/summary.json."""
    output = open_output(cfg)
    extractions = {
        model: cfg.extract_config(model, posixpath.join(cfg.out, "extract", model_key(model)), cfg.words, cfg.sets)
        for model in cfg.models
    }
    plans = {model: plan_extraction(extractions[model]) for model in cfg.models}  # all bad input, before any write
    connect(log)
    exp = cfg.experiment_id()
    store = store_mode(cfg.store, cfg.gpus_per_actor, log)
    write_resolved(output, cfg, weights={model: plans[model].weights for model in cfg.models}, store=store)
    started = time.monotonic()
    scheduler, model_plans = TwoVsTwoScheduler(cfg, output, log), {}

    def extracted(i: int, _summary: dict[str, Any]) -> None:  # a model's tests start while the next one extracts
        model = cfg.models[i]
        model_plans[model] = plan_model(output, model_key(model), plans[model], log, store=store)
        scheduler.submit(model_plans[model])

    # one pipeline and actor pool for every CNN: each actor process starts (and imports) once, not once per CNN
    run_extractions([(extractions[m], plans[m], log) for m in cfg.models], store, cfg, finished=extracted)
    if scheduler.pending:
        log(
            f"analysis: {len(scheduler.grams)} Gram task(s), {scheduler.n_todo} of {scheduler.n_tests} tests to run "
            f"in {len(scheduler.pending)} group(s) of layers ({scheduler.n_tasks} tasks, {cfg.precision})"
        )
    scheduler.wait()

    tests = [
        output.read_table(*test_file(plans[model].model_key, word_model, layer.name))
        for model in cfg.models
        for word_model in cfg.words
        for layer in plans[model].layers
    ]
    reduced = reduce_scores(tests, cfg.alpha, family=family_columns(cfg.family))
    scores, scores_by_set, concept_scores, concept_scores_by_set = reduced.tables()
    concepts = Output(extractions[cfg.models[0]].out).read_table("concepts.parquet")
    concept_scores = _name_concepts(concept_scores, concepts)
    concept_scores_by_set = _name_concepts(concept_scores_by_set, concepts)
    for table, name in [
        (scores, "scores.parquet"),
        (scores_by_set, "scores_by_set.parquet"),
        (concept_scores, "concept_scores.parquet"),
        (concept_scores_by_set, "concept_scores_by_set.parquet"),
    ]:
        output.write_table(schema.stamp(table, exp), name)
    rows = scores.to_pylist()
    figures = {
        plans[model].model: save_figure(
            output,
            layer_curves(rows, plans[model].model, cfg.alpha, x=cfg.x),
            "figures",
            f"{plans[model].model_key}.png",
        )
        for model in cfg.models
    }
    diagrams = {
        plans[model].model: save_architecture(
            output, plans[model].graph, rows, plans[model].model, plans[model].model_key, cfg.words[0]
        )
        for model in cfg.models
    }
    panels = {
        plans[model].model: _model_panels(output, cfg, model_plans[model], rows, concept_scores) for model in cfg.models
    }
    coverage = {
        plans[model].model: (
            plans[model],
            model_plans[model].left_out,
            Output(extractions[model].out).read_table("errors.parquet"),
        )
        for model in cfg.models
    }
    report = write_report(
        output, cfg, scores, concept_scores, figures, coverage, reduced.families, diagrams, panels=panels
    )
    summary = {
        "experiment_id": exp,
        "models": cfg.models,
        "words": cfg.words,
        "n_tests": len(tests),
        "n_significant": int(pc.sum(pc.fill_null(scores["significant"], False)).as_py() or 0),
        **family_summary(cfg.family, reduced.families, cfg.alpha),
        "report": report,
    }
    output.write_json(summary, "summary.json")
    log(f"report: {report}")
    return {
        **summary,
        "tests_computed": scheduler.computed,
        "gram_tasks": len(scheduler.grams),
        "pairs_rechecked": scheduler.rechecked,
        "pairs_decided": scheduler.decided,
        "matrix_tasks": len(scheduler.matrix_tasks),
        "store": store,
        "seconds": round(time.monotonic() - started, 3),
    }
