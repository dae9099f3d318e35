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
        # class space: imagenet | cifar100 | folder; table:FILE where a concept-words table named the word
        ("source", pa.string()),
        ("word_model", pa.string()),
        ("lemma", pa.string()),  # the lemma of the class that matched; null where a table named the word
        ("word", pa.string()),  # the lemma as spelled in the word model
    ]
)

# An image source's images (datasets.images.ImageSource.images), sorted by image_id.
IMAGE_TABLE = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("concept_id", pa.string()), ("class_index", pa.int32())]
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
    meta.update(
        {b"semprobe.schema_version": SCHEMA_VERSION.encode(), b"semprobe.experiment_id": experiment_id.encode()}
    )
    return table.replace_schema_metadata(meta)


def similarity(w: int) -> pa.Schema:
    """One row per (model, layer, image set) or word model: the w x w Pearson r between concepts."""
    return pa.schema(
        [
            ("model", pa.string()),  # null for a word model's matrix
            ("layer", pa.string()),
            ("layer_index", pa.int32()),
            ("set_index", pa.int32()),
            ("space", pa.string()),  # "cnn" or the word model
            ("concept_ids", pa.list_(pa.string())),  # rows and columns, in order
            ("matrix", pa.fixed_shape_tensor(pa.float32(), [w, w])),
        ]
    )


# One row per (model, layer, word model, image set): the observed 2 vs. 2 and its null, as counts.
TESTS = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("word_model", pa.string()),
        ("set_index", pa.int32()),
        ("n_concepts", pa.int32()),
        ("n_pairs", pa.int64()),
        ("passes", pa.int64()),  # pairs passed
        ("concept_ids", pa.list_(pa.string())),
        ("concept_passes", pa.list_(pa.int32())),  # pairs passed per concept, of n_concepts - 1
        ("null_passes", pa.list_(pa.int32())),  # pairs passed under each permutation, in order
    ]
)

# One row per (model, layer, word model): the mean over the image sets, tested against the permutation
# null and corrected by BHY over the experiment's whole family (every model x layer x word model).
SCORES = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("word_model", pa.string()),
        ("accuracy", pa.float64()),  # mean over sets
        ("std", pa.float64()),  # over sets (sample std; 0 with one set)
        ("n_concepts", pa.int32()),
        ("n_pairs", pa.int64()),
        ("n_perm", pa.int32()),
        ("null_mean", pa.float64()),  # of the set-averaged accuracy under each permutation
        ("null_std", pa.float64()),
        ("p_value", pa.float64()),  # (1 + #{null >= accuracy}) / (1 + n_perm); null without permutations
        ("p_bhy", pa.float64()),
        ("significant", pa.bool_()),  # p_bhy <= alpha
    ]
)

# One row per (model, layer, word model, image set): each set's accuracy against its own null, uncorrected.
SCORES_BY_SET = pa.schema(
    [
        *[SCORES.field(name) for name in ("model", "layer", "layer_index", "word_model")],
        ("set_index", pa.int32()),
        *[SCORES.field(name) for name in ("accuracy", "n_concepts", "n_pairs", "n_perm", "null_mean", "null_std")],
        SCORES.field("p_value"),
    ]
)

# Per (model, layer, word model, concept): the fraction of the concept's pairs passed, mean over sets.
CONCEPT_SCORES = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("word_model", pa.string()),
        ("concept_id", pa.string()),
        ("word", pa.string()),
        ("pass_rate", pa.float64()),
    ]
)

# The same per image set.
CONCEPT_SCORES_BY_SET = pa.schema([*CONCEPT_SCORES][:4] + [pa.field("set_index", pa.int32())] + [*CONCEPT_SCORES][4:])

# The N x N table of affine feature equivalence (McNeely-White 2020): one row per (source,
# target, method); source == target rows hold each CNN alone.
AFFINE_SCORES = pa.schema(
    [
        ("source", pa.string()),
        ("target", pa.string()),
        ("method", pa.string()),  # affine | logit | naive
        ("accuracy", pa.float64()),  # top-1 of the target's classifier on mapped source features
        ("source_accuracy", pa.float64()),
        ("target_accuracy", pa.float64()),
        ("pct_change_vs_source", pa.float64()),  # 100 (accuracy - source_accuracy) / source_accuracy
        ("n_train", pa.int64()),
        ("n_val", pa.int64()),
    ]
)

# affine_maps/manifest.parquet of ``semprobe affine``: one row per (source, target, method) map stored beside it.
AFFINE_MAPS = pa.schema(
    [
        ("source", pa.string()),
        ("target", pa.string()),
        ("method", pa.string()),  # affine | logit | naive
        ("file", pa.string()),  # <method>/<source>__<target>.npy under affine_maps/: (d_A + 1, d_B), the bias last
        ("rcond", pa.float64()),  # reciprocal condition number of the system solved (affine; NaN otherwise)
        ("train_r2", pa.float64()),  # share of the target's feature variance explained on the training images
        ("rank", pa.int64()),  # of the target's classifier (logit maps; null otherwise)
        ("full_row_rank", pa.bool_()),  # rank == classes: the logit map loses nothing (logit maps; null otherwise)
    ]
)

# severity.parquet of ``semprobe misclassified``: one row per misclassified image whose true and predicted
# classes both have a word.
SEVERITY = pa.schema(
    [
        ("model", pa.string()),
        ("image_id", pa.string()),
        ("true_index", pa.int32()),
        ("true_word", pa.string()),
        ("predicted_index", pa.int32()),
        ("predicted_word", pa.string()),
        ("cosine", pa.float64()),  # of the true and the predicted word vectors: the severity
    ]
)

# The 1 vs. 2 test through the layers: one row per (layer, group of images), each its own test of its own images.
# one_vs_two.parquet holds every image of the run in one group ("misclassified", or "all targets" of
# ``semprobe adversarial``); one_vs_two_by_rank.parquet of ``semprobe adversarial`` its parts, one group per target
# rank ("target rank k"). Both tables of a run are one BHY family.
ONE_VS_TWO = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("group", pa.string()),
        ("accuracy", pa.float64()),
        ("n", pa.int32()),  # images
        ("n_references", pa.int32()),  # R
        ("n_perm", pa.int32()),
        ("null_mean", pa.float64()),
        ("null_std", pa.float64()),
        ("p_value", pa.float64()),
        ("p_bhy", pa.float64()),  # BHY over the layers and groups of the run
        ("significant", pa.bool_()),
    ]
)

# ``semprobe misclassified --store similarity``: one layer's Pearson r of each misclassified image with each
# reference image it is tested against, computed by the model actors (the activations are never written):
# extract/reference_correlations/<model>/<layer>.parquet, one row per (image, reference) pair.
REFERENCE_CORRELATIONS = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("image_id", pa.string()),
        ("reference_id", pa.string()),
        ("correlation", pa.float64()),  # NaN when either image's layer output is constant
    ]
)

# One row per requested (source image, target class) pair of ``semprobe adversarial``.
ADVERSARIAL = pa.schema(
    [
        ("pair", pa.int32()),
        ("image_id", pa.string()),  # the source image
        ("source_index", pa.int32()),
        ("source_word", pa.string()),
        ("target_index", pa.int32()),
        ("target_word", pa.string()),  # null when the target class has no word vector
        ("target_rank", pa.int32()),  # 1 = the most similar word ... K = the least similar; null for --pairs
        ("word_cosine", pa.float64()),  # cosine of the source and target words
        ("status", pa.string()),  # success | missed (the target was not reached) | skipped
        ("note", pa.string()),  # why skipped or missed
        ("clean_predicted", pa.int32()),
        ("predicted", pa.int32()),  # on the stored 8-bit adversarial image
        ("linf", pa.float64()),  # L-inf norm of the stored perturbation, in the attack's input space
        ("adversarial_id", pa.string()),  # the image's id in extract-adversarial/ (successes only)
        ("png", pa.binary()),  # the adversarial image at the model's input size
    ]
)

# adversarial/shards/shard-NNNNN.parquet of ``semprobe adversarial``: what an attack task decides, per pair.
ATTACK_RESULT = pa.schema(
    [
        (name, ADVERSARIAL.field(name).type)
        for name in ("pair", "status", "note", "clean_predicted", "predicted", "linf", "png")
    ]
)

# adversarial/manifest.parquet of ``semprobe adversarial``: the successful adversarial images as an image source
# (a manifest .parquet of datasets.images), labelled with the source class.
ADVERSARIAL_MANIFEST = pa.schema(
    [
        ("image_id", pa.string()),  # adversarial_id of adversarial.parquet
        ("uri", pa.string()),  # OUT/adversarial/images/<image_id>.png
        ("label", pa.int32()),  # the source's ImageNet class index
    ]
)

# One row per epoch of ``semprobe train`` (epoch 0: the untrained network).
TRAINING = pa.schema(
    [
        ("epoch", pa.int32()),
        ("lr", pa.float64()),
        ("train_error", pa.float64()),  # during the epoch, drop-path and dropout on
        ("train_loss", pa.float64()),
        ("test_error", pa.float64()),  # after the epoch, eval mode
        ("epoch_seconds", pa.float64()),  # the training steps alone
    ]
)

# The checkpoint's side of a dynamics row: which run, epoch and image split, and the checkpoint's errors.
_CHECKPOINT = {
    "run": pa.string(),  # the training run's --out folder
    "run_name": pa.string(),  # normal | permuted
    "epoch": pa.int32(),
    "split": pa.string(),  # whose images the K sets are: train | test
    "model": pa.string(),  # the checkpoint as a model of the zoo
    "train_error": pa.float64(),  # the checkpoint's, as training reported it
    "test_error": pa.float64(),
}


def _dynamics(scores: pa.Schema) -> pa.Schema:
    head = [(name, _CHECKPOINT[name]) for name in ("run", "run_name", "epoch", "split")]
    tail = [(name, _CHECKPOINT[name]) for name in ("model", "train_error", "test_error")]
    return pa.schema([*head, *[scores.field(name) for name in scores.names if name != "model"], *tail])


# One row per (training run, checkpoint epoch, image split, layer, word model) of ``semprobe dynamics``:
# the scores columns of that checkpoint's 2 vs. 2 (mean over sets), BHY over the experiment's whole
# family (every run x epoch x split x layer x word model), beside the checkpoint's errors.
DYNAMICS = _dynamics(SCORES)

# The same per image set (uncorrected, as scores_by_set).
DYNAMICS_BY_SET = _dynamics(SCORES_BY_SET)

# ``semprobe train``'s checkpoints.parquet: one row per registered checkpoint, as Ray Train reported it.
CHECKPOINTS = pa.schema([*TRAINING, ("run", pa.string()), ("path", pa.string())])  # run: normal | permuted

# An extraction's layers.parquet: the chosen layers of its model, in order.
LAYERS = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("kind", pa.string()),  # activations, concat, blocks, pool, logits or node
        ("shape", pa.list_(pa.int32())),  # of one image's output, without the batch
        ("dim", pa.int64()),  # features: the product of shape
    ]
)

# ``semprobe compare``'s compare.parquet: one row per point of its figure, (run, model, word model, layer), as read
# from each run's scores.parquet, with the layer's relative depth (layer position / (number of layers - 1)).
COMPARE = pa.schema(
    [
        ("run", pa.string()),  # the run's folder, as given (absolute)
        ("label", pa.string()),  # the curve's name in the figure's legend
        *[SCORES.field(name) for name in ("model", "layer", "layer_index", "word_model")],
        ("depth", pa.float64()),
        *[SCORES.field(name) for name in ("accuracy", "std", "p_bhy", "significant")],
    ]
)
