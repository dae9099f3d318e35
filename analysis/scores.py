"""Layer scores: from features to the 2 vs. 2 accuracy of each layer, its permutation null, p-value and BHY.

The same functions serve ``semprobe run`` (its Ray tasks and its reducer) and
:func:`layer_scores`, the in-memory entry point for features a researcher
already holds, so both give identical numbers on the same inputs:

    feature rows --concept_matrix--> (w, w) per image set --observe / permutation_null--> counts
    --score--> accuracy, std, null, p --adjust_family--> p_bhy, significant
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse

from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import GramAccumulator, correlation_matrix
from semprobe.analysis.stats import BhyReach, bhy, bhy_reach, permutation_p_value
from semprobe.analysis.twovtwo import permutation_null, two_vs_two

if TYPE_CHECKING:
    import polars

# Features per Gram chunk: at most this many MB of float32 per (w, chunk) slice (``semprobe run --gram-memory-mb``).
GRAM_MEMORY_MB = 256


def chunk_features(w: int, dim: int, memory_mb: int = GRAM_MEMORY_MB) -> int:
    """Features per chunk so that a (w, chunk) float32 slice takes at most ``memory_mb`` MB (at least 1)."""
    return max(1, min(dim, memory_mb * 2**20 // (4 * w)))


def concept_matrix(chunks: Iterable[np.ndarray], w: int, compute: str = "float32") -> np.ndarray:
    """The (w, w) float32 Pearson correlations between w concepts' feature rows, given in feature chunks.

    Parameters
    ----------
    chunks : iterable of ndarray, each (w, d_chunk), any real dtype
        Consecutive slices of the rows' features (e.g. of :func:`chunk_features` features each).
    w : int
        The number of rows (concepts).
    compute : "float32" or "float64"
        Precision of each chunk's Gram product; the sums are float64. The rows
        need not be centred (the float64 sums remove the means); ``semprobe run``
        passes the activation store's z-scored rows.

    Returns
    -------
    ndarray (w, w) float32, as ``semprobe run`` stores it. Raises ZeroVarianceError
    (an InputError) naming constant rows.
    """
    acc = GramAccumulator(w, compute)
    for chunk in chunks:
        acc.add(chunk)
    return acc.correlation().astype(np.float32)


def word_matrix(vectors: np.ndarray) -> np.ndarray:
    """(w, w) float32 Pearson correlations between w word vectors ((w, k) any real dtype, or a sparse matrix
    kept sparse), computed in float64."""
    vectors = vectors if scipy.sparse.issparse(vectors) else np.asarray(vectors)
    return correlation_matrix(vectors).astype(np.float32)


@dataclass(frozen=True)
class Observed:
    """The observed 2 vs. 2 of K image sets against one word matrix, as counts.

    passes : (K,) int64, pairs passed in each set; concept_passes : (K, w) int32, each
    concept's pairs passed (of w - 1).
    """

    passes: np.ndarray
    concept_passes: np.ndarray


def observe(image_sets: Sequence[np.ndarray], word: np.ndarray) -> Observed:
    """The 2 vs. 2 of each (w, w) image-set matrix against the (w, w) word matrix."""
    results = [two_vs_two(a, word) for a in image_sets]
    return Observed(
        np.array([int(r.passed.sum()) // 2 for r in results], np.int64),
        np.stack([r.passed.sum(axis=1) for r in results]).astype(np.int32),
    )


@dataclass(frozen=True)
class LayerTest:
    """One layer against one word model over K image sets: observed and null 2 vs. 2, as counts.

    passes : (K,) int64; null_passes : (n_perm, K) int64, permutation k's pairs passed in
    each set; concept_passes : (K, w) int32; n_concepts : w.
    """

    passes: np.ndarray
    null_passes: np.ndarray
    concept_passes: np.ndarray
    n_concepts: int

    @property
    def n_pairs(self) -> int:
        return self.n_concepts * (self.n_concepts - 1) // 2

    @property
    def n_perm(self) -> int:
        return self.null_passes.shape[0]


def _null_stats(observed: float, draws: np.ndarray, n_perm: int) -> dict[str, float | None]:
    if not n_perm:
        return {"null_mean": None, "null_std": None, "p_value": None}
    return {
        "null_mean": float(draws.mean()),
        "null_std": float(draws.std()),
        "p_value": permutation_p_value(draws, observed),
    }


def score(test: LayerTest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The layer's score over its sets, and each set's.

    Over sets: the accuracy is the mean over the K sets, ``std`` their sample
    standard deviation (0 with one set), and the null the set-averaged accuracy
    under each permutation. Each set: its accuracy and its own null. ``p_value``
    is (1 + #{null >= accuracy}) / (1 + n_perm), None without permutations.
    Returns dicts of the stats columns of ``scores`` and ``scores_by_set``
    (the latter in set order, without set_index).
    """
    k, n_pairs, n_perm = len(test.passes), test.n_pairs, test.n_perm
    common = {"n_concepts": test.n_concepts, "n_pairs": n_pairs, "n_perm": n_perm}
    acc_sets = test.passes / n_pairs
    acc = test.passes.sum() / (k * n_pairs)
    null_mean_over_sets = test.null_passes.sum(axis=1) / (k * n_pairs)
    over_sets = {
        "accuracy": float(acc),
        "std": float(np.std(acc_sets, ddof=1 if k > 1 else 0)),
        **common,
        **_null_stats(acc, null_mean_over_sets, n_perm),
        "p_bhy": None,
        "significant": None,
    }
    by_set = [
        {"accuracy": float(acc_sets[s]), **common, **_null_stats(acc_sets[s], test.null_passes[:, s] / n_pairs, n_perm)}
        for s in range(k)
    ]
    return over_sets, by_set


def concept_pass_rates(test: LayerTest) -> tuple[np.ndarray, np.ndarray]:
    """Each concept's fraction of its w - 1 pairs passed: (w,) mean over sets, and (K, w) per set (float64)."""
    per_set = test.concept_passes.astype(np.float64) / (test.n_concepts - 1)
    return per_set.mean(axis=0), per_set


# The BHY families a job may choose (``--family``): the columns whose values split its rows into families.
# ``all``: one family of every test; ``model``: one figure (one CNN's layers x word models); ``model,word_model``:
# one curve (one CNN's layers against one word model). A job whose "model" is another column renames it.
FAMILIES = {"all": (), "model": ("model",), "model,word_model": ("model", "word_model")}


def family_columns(family: str, model: str = "model") -> tuple[str, ...]:
    """The columns that split rows into BHY families for ``family`` (a key of FAMILIES); ``model`` names the
    column that identifies one network (``semprobe dynamics``: ``run``, a training run's checkpoints)."""
    if family not in FAMILIES:
        raise InputError(f"unknown BHY family '{family}': choose one of {', '.join(FAMILIES)}")
    return tuple(model if c == "model" else c for c in FAMILIES[family])


@dataclass(frozen=True)
class Family:
    """One BHY family: the values of the family columns its rows share, and its tested rows (by position)."""

    key: tuple[Any, ...]
    rows: list[int]
    n_perm: int

    @property
    def m(self) -> int:
        return len(self.rows)

    def reach(self, alpha: float) -> BhyReach:
        return bhy_reach(self.m, self.n_perm, alpha)


def families(rows: Sequence[Mapping[str, Any]], by: Sequence[str] = ()) -> list[Family]:
    """The rows with a p-value, split into families by their values of the columns ``by`` (none: one family),
    in order of first appearance; each family's ``n_perm`` is the largest of its rows'."""
    grouped: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(rows):
        if row["p_value"] is not None:
            grouped.setdefault(tuple(row[c] for c in by), []).append(i)
    return [
        Family(key, members, max(int(rows[i].get("n_perm") or 0) for i in members)) for key, members in grouped.items()
    ]


def adjust_family(rows: list[dict[str, Any]], alpha: float, by: Sequence[str] = ()) -> list[Family]:
    """Set ``p_bhy`` and ``significant`` on every row with a p-value: BHY within each family of rows that share
    their values of the columns ``by`` (none: all rows are one family). Returns the families."""
    found = families(rows, by)
    for family in found:
        significant, adjusted = bhy([rows[i]["p_value"] for i in family.rows], alpha)
        for i, sig, adj in zip(family.rows, significant, adjusted):
            rows[i]["p_bhy"], rows[i]["significant"] = float(adj), bool(sig)
    return found


def _as_rows(x: Any, what: str, w: int | None) -> np.ndarray:
    rows = np.asarray(x)
    if rows.ndim < 2 or not np.issubdtype(rows.dtype, np.number):
        raise InputError(f"{what} must be a numeric (n_concepts, d) array, got shape {rows.shape} of {rows.dtype}")
    if w is not None and rows.shape[0] != w:
        raise InputError(f"{what} has {rows.shape[0]} rows, but there are {w} concepts (one row per concept)")
    return rows.reshape(rows.shape[0], -1)


def layer_scores(
    features: Mapping[str, Any],
    words: Any,
    *,
    concepts: Sequence[str] | None = None,
    sets: Sequence[Mapping[str, Any]] | None = None,
    permutations: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    model: str | None = None,
    word_model: str | None = None,
    compute: str = "float32",
    memory_mb: int = GRAM_MEMORY_MB,
) -> polars.DataFrame:
    """The 2 vs. 2 score of every layer against one word model, in memory, with no Ray.

    Parameters
    ----------
    features : mapping of layer name -> array-like (n_concepts, d) (or (n_concepts, ...), flattened)
        One image set: each layer's feature row per concept, rows in concept order.
        Layers keep the mapping's order (``layer_index``).
    words : array-like (n_concepts, k), or a scipy.sparse matrix
        The concepts' word vectors, in the same order (sparse rows, e.g. ``nondist:``'s, stay sparse).
    concepts : sequence of str, optional
        The concepts' names, to name a culprit in errors.
    sets : sequence of mappings like ``features``, optional
        Further image sets of the same layers and concepts: K = 1 + len(sets) sets,
        accuracy the mean over them and ``std`` its spread, as ``semprobe run --sets K``.
    permutations, seed : int
        The null: the same seeded permutations of the word side as ``semprobe run``.
    alpha : float
        BHY false discovery rate over the family of these layers.
    model, word_model : str, optional
        Written into the ``model`` and ``word_model`` columns.
    compute, memory_mb
        Precision of the Gram products and the size of a Gram chunk, as ``semprobe run``'s
        ``gram_compute`` and ``gram_memory_mb``.

    Returns
    -------
    polars.DataFrame with the columns of ``scores.parquet``, one row per layer. With
    ``semprobe run``'s activation rows and word vectors it reproduces that run's
    ``scores.parquet`` number for number (for one model and one word model).
    """
    if permutations < 0 or not 0 < alpha < 1:
        raise InputError(f"permutations must be >= 0 and alpha in (0, 1), got {permutations} and {alpha}")
    word_rows = words if scipy.sparse.issparse(words) else _as_rows(words, "words", None)
    w = word_rows.shape[0]
    if concepts is not None and len(concepts) != w:
        raise InputError(f"{len(concepts)} concept names for {w} rows of word vectors")
    if w < 4:
        raise InputError(f"the 2 vs. 2 needs at least 4 concepts, got {w}")
    image_sets = [features, *(sets or [])]
    for k, image_set in enumerate(image_sets[1:], 1):
        if list(image_set) != list(features):
            raise InputError(f"image set {k} has layers {list(image_set)}, the first has {list(features)}")
    word = word_matrix(word_rows)
    rows = []
    for layer_index, layer in enumerate(features):
        matrices = []
        for k, image_set in enumerate(image_sets):
            x = _as_rows(image_set[layer], f"layer {layer!r} of image set {k}", w)
            step = chunk_features(w, x.shape[1], memory_mb)
            try:
                matrices.append(concept_matrix((x[:, lo : lo + step] for lo in range(0, x.shape[1], step)), w, compute))
            except InputError as err:
                culprits = [concepts[r] for r in getattr(err, "rows", [])[:3]] if concepts is not None else []
                named = f" (concepts {', '.join(culprits)})" if culprits else ""
                raise InputError(f"layer {layer!r}, image set {k}{named}: {err}") from None
        observed = observe(matrices, word)
        null = permutation_null(matrices, word, permutations, seed).passes
        over_sets, _ = score(LayerTest(observed.passes, null, observed.concept_passes, w))
        rows.append({"model": model, "layer": layer, "layer_index": layer_index, "word_model": word_model, **over_sets})
    adjust_family(rows, alpha)
    return _frame(rows)


def _frame(rows: list[dict[str, Any]]) -> polars.DataFrame:
    """The rows as a DataFrame with the columns and types of ``scores.parquet`` (``datasets.schema.SCORES``)."""
    import polars as pl

    text, i32, i64, f64 = pl.String, pl.Int32, pl.Int64, pl.Float64
    columns = {
        "model": text, "layer": text, "layer_index": i32, "word_model": text, "accuracy": f64, "std": f64,
        "n_concepts": i32, "n_pairs": i64, "n_perm": i32, "null_mean": f64, "null_std": f64, "p_value": f64,
        "p_bhy": f64, "significant": pl.Boolean,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=columns)
