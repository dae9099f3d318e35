"""``semprobe adversarial``: targeted MIM examples, and where in the network the attack takes hold.

Dharmaretnam & Fyshe 2021, Sections 5.2-5.3: S correctly classified source
images (one per class, in the seed's order), each attacked toward K target
classes picked by word similarity to the source's word (the Pearson r of the word vectors, as the
paper says, or their cosine with ``--target-similarity cosine``; rank 1 the most
similar, rank K the least, the others evenly spaced by rank) with Dong et al.'s
momentum iterative method; then, for every attack that reached its target, the
1 vs. 2 test through the layers with t = source and p = target, per target rank.

Layout under OUT::

    config.json, summary.json, report.html
    extract/                     the clean images (``ray_jobs.extract``): predictions and the references' activations
    adversarial/shards/shard-NNNNN.parquet   the attack, one file per task (a rerun skips what exists)
    adversarial/images/pair-NNNNN.png        each successful adversarial image, at the model's input size
    adversarial/manifest.parquet             datasets.schema.ADVERSARIAL_MANIFEST: those images as an image source
    extract-adversarial/         their extraction
    adversarial.parquet          datasets.schema.ADVERSARIAL, one row per requested pair
    one_vs_two.parquet           datasets.schema.ONE_VS_TWO, one row per layer: every successful attack ("all targets")
    one_vs_two_by_rank.parquet   datasets.schema.ONE_VS_TWO, one row per (target rank, layer): the same images by rank
    report.html, figures/one_vs_two.png, figures/examples.png

Row kinds: the "all targets" group is the union of the rank groups, so its accuracy is their n-weighted mean and
its n their sum; beside them in one table a ``groupby(layer)`` would count every image twice. It is kept
apart, in one_vs_two.parquet, as in ``semprobe misclassified``; one_vs_two_by_rank.parquet holds the parts. Each
row is still its own test with its own null, and the rows of both tables are one BHY family.

The start and the 1 vs. 2 machinery are :mod:`semprobe.ray_jobs.failure_analysis`, shared with
``semprobe misclassified``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.util import ActorPool

from semprobe.analysis.errors import InputError
from semprobe.datasets import schema
from semprobe.datasets.classes import imagenet_classes
from semprobe.datasets.decode import ImageError, decode_image, read_bytes
from semprobe.datasets.images import read_user_table
from semprobe.ray_jobs.config import AdversarialConfig
from semprobe.ray_jobs.extraction import run_extract
from semprobe.ray_jobs.failure_analysis import (
    FailureContext,
    check_references,
    one_vs_two_through_layers,
    prepare,
    write_one_vs_two,
)
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.startup import model_actors
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import shard_file

OVERALL = "all targets"


@dataclass
class Pair:
    """One requested (source image, target class) pair: what is known of it before the attack.

    The fields are columns of ``datasets.schema.ADVERSARIAL`` (and the source's uri); the attack decides the
    others (``datasets.schema.ATTACK_RESULT``).
    """

    pair: int
    image_id: str
    target_index: int | None  # None: the target names no ImageNet class
    target_word: str | None
    uri: str | None = None  # None: no such image
    source_index: int | None = None
    source_word: str | None = None
    target_rank: int | None = None  # 1 = the most similar word ... K = the least similar; None for --pairs
    word_cosine: float | None = None
    clean_predicted: int | None = None  # known before the attack for --pairs
    status: str | None = None  # "skipped" when it cannot be attacked; None: to attack
    note: str | None = None  # why skipped


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@ray.remote
class AttackWorker:
    """The model on one device; attacks shards of (source, target) pairs and writes each shard's results."""

    def __init__(
        self,
        out: str,
        model: str,
        space: str,
        eps: float,
        step: float,
        steps: int,
        momentum: float,
        batch_size: int,
        threads: int | None,
    ):
        # foolbox is the actor's: imported here, not by every worker that imports this module
        from semprobe.actors.attack import TargetedAttacker

        if threads is None and not ray.get_gpu_ids():
            threads = len(os.sched_getaffinity(0))  # a CPU-only attack wants the node
        self.attacker = TargetedAttacker(model, space, eps, step, steps, momentum, threads=threads)
        self.output, self.batch_size = Output(out), batch_size

    def attack_shard(self, shard: int, pairs: list[Pair]) -> int:
        pre = self.attacker.preprocess
        results, decoded = [], []
        for pair in pairs:
            try:
                decoded.append((pair, decode_image(read_bytes(pair.uri), **pre.decode_args())))
            except ImageError as err:  # this pair's failure, not the job's
                results.append({"pair": pair.pair, "status": "skipped", "note": f"{err.stage}: {err}"})
        for lo in range(0, len(decoded), self.batch_size):
            part = decoded[lo : lo + self.batch_size]
            out = self.attacker(np.stack([x for _, x in part]), np.array([p.target_index for p, _ in part]))
            for k, (pair, _) in enumerate(part):
                clean, predicted = int(out["clean_predicted"][k]), int(out["predicted"][k])
                row = {"pair": pair.pair, "clean_predicted": clean}
                if clean != pair.source_index:
                    row.update(status="skipped", note=f"source already misclassified (as class {clean})")
                else:
                    reached = predicted == pair.target_index
                    row.update(
                        status="success" if reached else "missed",
                        note=None if reached else f"ended at class {predicted}",
                        predicted=predicted,
                        linf=float(out["linf"][k]),
                        png=_png(out["adversarial"][k]),
                    )
                results.append(row)
        table = pa.Table.from_pylist(sorted(results, key=lambda r: r["pair"]), schema=schema.ATTACK_RESULT)
        self.output.write_table(table, "adversarial", "shards", shard_file(shard))
        return len(pairs)


def _read_pairs(path: str) -> list[tuple[str, str]]:
    """(image_id, target) rows of a --pairs file (.csv or .parquet); the target is an ImageNet index or wnid."""
    table = read_user_table(path, ("image_id", "target"), "--pairs")
    return [(str(i), str(t)) for i, t in zip(table["image_id"].to_pylist(), table["target"].to_pylist())]


def _pair(ctx: FailureContext, n: int, image: dict[str, Any], target: int | None, rank: int | None) -> Pair:
    t = image["class_index"]
    return Pair(
        pair=n,
        image_id=image["image_id"],
        uri=image["uri"],
        source_index=t,
        source_word=ctx.words[t],
        target_index=target,
        target_word=ctx.words.get(target),
        target_rank=rank,
        word_cosine=float(ctx.cosine([t], [target])[0]) if target in ctx.words else None,
    )


def chosen_pairs(cfg: AdversarialConfig, ctx: FailureContext) -> list[Pair]:
    """S sources (one correctly classified image per class, classes in the seed's order) x K targets by word
    similarity (``--target-similarity``: the Pearson r of the word vectors, as the paper ranks them, or their
    cosine; ``word_cosine`` is the cosine either way)."""
    classes = [int(c) for c in np.random.default_rng([cfg.seed, 1]).permutation(sorted(ctx.pool))][: cfg.sources]
    by_id = {m["image_id"]: m for m in ctx.manifest}
    pairs = []
    for t in classes:
        others = [c for c in sorted(ctx.words) if c != t]  # one class per word: no other class shares t's
        if cfg.targets_per_source > len(others):
            raise InputError(
                f"--targets-per-source {cfg.targets_per_source} exceeds the {len(others)} classes with words"
            )
        similarity = ctx.similarity([t] * len(others), others, cfg.target_similarity)
        ranked = [others[i] for i in np.lexsort((others, -similarity))]  # most similar first; ties by class index
        picks = np.round(np.linspace(0, len(ranked) - 1, cfg.targets_per_source)).astype(int)
        for rank, i in enumerate(picks, 1):
            pairs.append(_pair(ctx, len(pairs), by_id[ctx.pool[t]], ranked[i], rank))
    return pairs


def requested_pairs(requested: list[tuple[str, str]], ctx: FailureContext) -> list[Pair]:
    """The --pairs rows; a row that cannot be attacked is kept as skipped, with the reason."""
    by_id = {m["image_id"]: m for m in ctx.manifest}
    by_wnid = {c.wnid: c.class_index for c in imagenet_classes()}
    pairs = []
    for image_id, target in requested:
        index = by_wnid.get(target, int(target) if target.isdigit() and int(target) < 1000 else None)
        image = by_id.get(image_id)
        if image is None:
            pair = Pair(pair=len(pairs), image_id=image_id, target_index=index, target_word=ctx.words.get(index))
            note = "not an image of --images whose class has a word"
        else:
            pair = _pair(ctx, len(pairs), image, index, None)
            pair.clean_predicted = predicted = ctx.predictions.get(image_id)
            note = (
                f"target '{target}' is not an ImageNet class (an index 0-999 or a wnid)"
                if index is None
                else f"target class {index} has no word: {ctx.unnamed(index)}"
                if index not in ctx.words
                else f"source already misclassified (as class {predicted})"
                if predicted != image["class_index"]
                else "the target is the source's own class"
                if index == image["class_index"]
                else None
            )
        if note:
            pair.status, pair.note = "skipped", note
        pairs.append(pair)
    return pairs


def _attack(cfg: AdversarialConfig, output: Output, pairs: list[Pair], log) -> dict[int, dict[str, Any]]:
    """Attack every pair not yet skipped, as actor tasks over shards; resumes from the shards on disk.

    Returns the rows of the shards (``datasets.schema.ATTACK_RESULT``) by pair number.
    """
    todo = [p for p in pairs if p.status is None]
    shards = [(i // cfg.attack_shard, todo[i : i + cfg.attack_shard]) for i in range(0, len(todo), cfg.attack_shard)]
    done = set(output.list("adversarial", "shards", suffix=".parquet"))
    pending = [(s, rows) for s, rows in shards if shard_file(s) not in done]
    if len(pending) < len(shards):
        log(f"resuming: {len(shards) - len(pending)} of {len(shards)} attack shards already complete")
    if pending:
        actors, gpus = model_actors(cfg.actors, cfg.gpus_per_actor)
        workers = [
            AttackWorker.options(num_gpus=gpus, num_cpus=cfg.cpus_per_actor).remote(
                cfg.out,
                cfg.model,
                cfg.space,
                cfg.eps,
                cfg.step,
                cfg.steps,
                cfg.momentum,
                cfg.batch_size,
                cfg.torch_threads,
            )
            for _ in range(min(actors, len(pending)))
        ]
        progress = Progress(len(todo), "pairs", f"attack {cfg.model} ({cfg.steps} steps)")
        progress.done = len(todo) - sum(len(rows) for _, rows in pending)
        for n in ActorPool(workers).map_unordered(lambda w, item: w.attack_shard.remote(*item), pending):
            progress.update(n)
        progress.close()
    results = {}
    for s, _ in shards:
        results.update({r["pair"]: r for r in output.read_table("adversarial", "shards", shard_file(s)).to_pylist()})
    return results


@holding_lease
def run_adversarial(cfg: AdversarialConfig, log=print) -> dict[str, Any]:
    """Choose pairs, attack, extract the adversarial images, 1 vs. 2 through the layers by target rank; report."""
    # The figures (matplotlib) and the report (polars) are the driver's: imported here, not by the workers that
    # import this module for its actor
    from semprobe.analysis.figures import one_vs_two_figure
    from semprobe.ray_jobs.report import write_failure_report

    output = Output(cfg.out)
    requested = _read_pairs(cfg.pairs) if cfg.pairs else None
    ctx = prepare(cfg, output, log)
    r = min(cfg.references, len(ctx.order) - 2)
    check_references(r)
    pairs = requested_pairs(requested, ctx) if requested is not None else chosen_pairs(cfg, ctx)
    n_misclassified = sum(1 for m in ctx.manifest if ctx.predictions.get(m["image_id"]) not in (None, m["class_index"]))
    log(
        f"adversarial: {len(pairs)} (source, target) pairs from {len({p.image_id for p in pairs})} source images "
        f"({n_misclassified} misclassified image(s) are no sources); eps {cfg.eps}, step {cfg.step}, "
        f"{cfg.steps} steps, "
        f"momentum {cfg.momentum} in {cfg.space}; R = {r}"
    )
    results = _attack(cfg, output, pairs, log)

    rows = []
    for p in pairs:
        merged = {**dataclasses.asdict(p), **results.get(p.pair, {})}
        row = {k: merged.get(k) for k in schema.ADVERSARIAL.names} | {"uri": merged.get("uri")}
        row["adversarial_id"] = f"pair-{p.pair:05d}" if row["status"] == "success" else None
        rows.append(row)
    table = pa.Table.from_pylist(
        [{k: row[k] for k in schema.ADVERSARIAL.names} for row in rows], schema=schema.ADVERSARIAL
    )
    exp = cfg.experiment_id()
    output.write_table(schema.stamp(table, exp), "adversarial.parquet")
    success = [row for row in rows if row["status"] == "success"]
    count = {s: sum(1 for row in rows if row["status"] == s) for s in ("success", "missed", "skipped")}
    log(
        f"adversarial: {count['success']} reached their target, {count['missed']} did not (discarded), "
        f"{count['skipped']} skipped"
    )
    summary = {
        "model": ctx.plan.model,
        "weights": ctx.plan.weights,
        "n_pairs": len(rows),
        **{f"n_{k}": v for k, v in count.items()},
        "references": r,
        "n_misclassified_images": n_misclassified,
        "n_classes_sharing_a_word": len(ctx.concepts.shared),
        "mean_linf": float(np.mean([row["linf"] for row in success])) if success else None,
    }
    figures, one_vs_two_rows = {}, []
    if success:
        for row in success:
            output.write_bytes(row["png"], "adversarial", "images", f"{row['adversarial_id']}.png")
        manifest = pa.table(
            {
                "image_id": [row["adversarial_id"] for row in success],
                "uri": [
                    posixpath.join(output.uri, "adversarial", "images", f"{row['adversarial_id']}.png")
                    for row in success
                ],
                "label": [row["source_index"] for row in success],
            },
            schema=schema.ADVERSARIAL_MANIFEST,
        )
        output.write_table(manifest, "adversarial", "manifest.parquet")
        extraction = dataclasses.replace(
            cfg.extract_config(cfg.model, posixpath.join(cfg.out, "extract-adversarial"), [cfg.words]),
            images=posixpath.join(output.uri, "adversarial", "manifest.parquet"),
            precropped=True,
        ).validate()
        extracted = run_extract(extraction, log=log)
        if extracted["n_errors"]:
            raise InputError(
                f"{extracted['n_errors']} adversarial image(s) failed to extract: see {extraction.out}/errors.parquet"
            )
        predicted = {
            p["image_id"]: p["predicted_index"]
            for p in pq.read_table(Output(extraction.out).path("predictions"), filesystem=output.fs).to_pylist()
        }
        summary["n_extraction_agrees"] = sum(predicted[row["adversarial_id"]] == row["target_index"] for row in success)
        groups = {}
        ranks = sorted({row["target_rank"] for row in success if row["target_rank"] is not None})
        for rank in ranks:
            label = {1: " (most similar)", cfg.targets_per_source: " (least similar)"}.get(rank, "")
            groups[f"target rank {rank}{label}"] = [i for i, row in enumerate(success) if row["target_rank"] == rank]
        groups[OVERALL] = list(range(len(success)))
        one_vs_two_rows = one_vs_two_through_layers(
            cfg,
            output,
            ctx,
            ("extract-adversarial", "activations"),
            [row["adversarial_id"] for row in success],
            [row["source_index"] for row in success],
            [row["target_index"] for row in success],
            r,
            groups,
            log=log,
        )
        write_one_vs_two(output, cfg, [row for row in one_vs_two_rows if row["group"] == OVERALL], "one_vs_two.parquet")
        write_one_vs_two(
            output, cfg, [row for row in one_vs_two_rows if row["group"] != OVERALL], "one_vs_two_by_rank.parquet"
        )
        title = (
            f"{ctx.plan.model}: {len(success)} targeted adversarial images (MIM, eps {cfg.eps} in {cfg.space}), R = {r}"
        )
        figure = one_vs_two_figure(one_vs_two_rows, title, "source beats target", OVERALL)
        figures["one_vs_two.png"] = save_figure(output, figure, "figures", "one_vs_two.png")
        figures["examples.png"] = save_figure(output, _examples(ctx, rows), "figures", "examples.png")
    output.write_json(summary, "summary.json")
    report = write_failure_report(
        output, cfg, "adversarial", summary, one_vs_two_rows, figures, [*_report_notes(cfg, rows), ctx.shared_words()]
    )
    log(f"adversarial: report at {report}")
    return summary


def _examples(ctx: FailureContext, rows: list[dict[str, Any]], n_sources: int = 3) -> Any:
    """The first sources with at least one success: the clean image, then each target's adversarial image."""
    from semprobe.analysis.figures import adversarial_panel  # matplotlib: the driver's (see run_adversarial)

    pre = ctx.plan.preprocess
    panel = []
    for image_id in dict.fromkeys(row["image_id"] for row in rows if row["status"] == "success"):
        mine = [row for row in rows if row["image_id"] == image_id and row.get("png")]
        clean = decode_image(read_bytes(mine[0]["uri"]), **pre.decode_args())
        attacked = [
            (
                np.asarray(Image.open(io.BytesIO(row["png"])).convert("RGB")),
                f"-> {row['target_word']}"
                + (f" (rank {row['target_rank']})" if row["target_rank"] else "")
                + ("" if row["status"] == "success" else " missed"),
            )
            for row in mine
        ]
        panel.append((clean, f"source: {mine[0]['source_word']}", attacked))
        if len(panel) == n_sources:
            break
    return adversarial_panel(panel)


def _report_notes(cfg: AdversarialConfig, rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """Tables for the report: per target rank, and what was skipped or missed."""
    ranks = sorted({row["target_rank"] for row in rows if row["target_rank"] is not None})
    per_rank = []
    for rank in ranks:
        mine = [row for row in rows if row["target_rank"] == rank]
        won = [row for row in mine if row["status"] == "success"]
        per_rank.append(
            [
                rank,
                len(mine),
                len(won),
                f"{np.mean([row['word_cosine'] for row in mine]):.3f}",
                f"{np.mean([row['linf'] for row in won]):.4f}" if won else "-",
            ]
        )
    failed = [
        [row["pair"], row["image_id"], row["target_word"] or row["target_index"], row["status"], row["note"]]
        for row in rows
        if row["status"] != "success"
    ]
    notes = []
    if per_rank:
        notes.append(
            ("by target rank", ["rank", "pairs", "reached the target", "mean word cosine", "mean L-inf"], per_rank)
        )
    notes.append((f"pairs not used ({len(failed)})", ["pair", "source image", "target", "status", "why"], failed))
    return notes
