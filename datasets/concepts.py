"""Concept matching: which word stands for each class in each word model.

For each class, the first lemma in the synset's order that the word model has,
tried as written, lowercased, and with spaces as underscores (word2vec's
phrases); unless a concept-words table names the class: then the table's word,
as written, in every word model. A class without a word in some word model is
dropped and reported. With several word models the concepts are the classes
every model matched, so that all models are compared on the same concepts.

One word, one class. Classes whose words coincide (ImageNet with GloVe: the bird
and the machine are both ``crane``; ``maillot``, ``cardigan``, ``panda``,
``partridge``, ``wagon`` twice each) would be one concept twice: two identical
rows of the word matrix, and a crane -> crane mistake whose 1 vs. 2 fails by
construction. Of the classes that share a word in any word model, the first in
class order (the lowest ImageNet index) is kept and the others are dropped
("shares word W with CLASS"). The rule is decided over the whole class space
(every ImageNet or CIFAR-100 class, whether it has images or not), so every job
keeps the same class for a word whatever its images.

Concept-words tables (``--concept-words FILE``): a CSV or Parquet file with the
columns ``class`` and ``word``; ``class`` is a wnid or an ImageNet index 0-999,
a CIFAR-100 label name (or index 0-99), or a folder's class name. CIFAR-100
sources use the packaged :data:`PACKAGED_TABLES` table unless told otherwise
(``none``: the lemma match alone): it names the nine two-word classes by the one
word GloVe has (``aquarium_fish`` -> ``aquarium``, ``maple_tree`` -> ``maple``,
``pickup_truck`` -> ``truck``, ...).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import pyarrow as pa

from semprobe.analysis.errors import InputError
from semprobe.datasets.classes import CLASS_SPACES, ClassInfo
from semprobe.datasets.images import read_user_table
from semprobe.datasets.schema import CONCEPTS
from semprobe.datasets.words import WordModel

# The concept-words table each class space uses when --concept-words is not given (files in datasets/data/).
PACKAGED_TABLES = {"cifar100": "cifar100_words.csv"}
NO_TABLE = "none"


def spellings(lemma: str) -> list[str]:
    """The spellings tried for one lemma, in order, without repeats."""
    forms = [lemma, lemma.lower(), lemma.replace(" ", "_"), lemma.lower().replace(" ", "_")]
    return list(dict.fromkeys(forms))


def packaged_table(name: str) -> str:
    """The path of a concept-words table shipped in ``semprobe/datasets/data``."""
    return str(resources.files("semprobe.datasets").joinpath("data", name))


def _class_order(c: ClassInfo) -> tuple:
    return (c.class_index is None, c.class_index if c.class_index is not None else 0, c.concept_id)


def _space_classes(classes: Sequence[ClassInfo], space: str) -> list[ClassInfo]:
    """Every class of the class space (and any given class outside it), in class order."""
    known = {c.concept_id: c for c in (CLASS_SPACES[space]() if space in CLASS_SPACES else ())}
    for c in classes:
        known.setdefault(c.concept_id, c)
    return sorted(known.values(), key=_class_order)


def read_concept_words(path: str, space: str, classes: Sequence[ClassInfo]) -> dict[str, str]:
    """concept_id -> word from a concept-words table (``class``, ``word``; .csv or .parquet, local or a URI).

    ``class`` names a class of ``classes`` (the class space) by concept id (wnid, label name) or class index.

    Raises
    ------
    InputError
        Unreadable file, missing columns, an empty word, a class named twice or not of the class space.
    """
    table = read_user_table(path, ("class", "word"), "concept words")
    by_name = {c.concept_id: c.concept_id for c in classes}
    by_name.update({str(c.class_index): c.concept_id for c in classes if c.class_index is not None})
    words: dict[str, str] = {}
    for name, word in zip(table["class"].to_pylist(), table["word"].to_pylist()):
        cid = by_name.get(str(name).strip())
        if cid is None:
            kind = {"imagenet": "a wnid or an index 0-999", "cifar100": "a label name or an index 0-99"}
            raise InputError(
                f"concept words {path}: class {name!r} is not a class of {space} "
                f"({kind.get(space, 'the name of a class of the images')})"
            )
        if not word or not str(word).strip():
            raise InputError(f"concept words {path}: class {name!r} has no word")
        if cid in words:
            raise InputError(f"concept words {path}: class {name!r} is named twice")
        words[cid] = str(word).strip()
    return words


def concept_words_table(option: str | None, space: str) -> str | None:
    """The table an option value selects: None -> the class space's packaged table (if any); 'none' -> none."""
    if option is None:
        name = PACKAGED_TABLES.get(space)
        return packaged_table(name) if name else None
    return None if option == NO_TABLE else option


def _candidates(c: ClassInfo, overrides: dict[str, str]) -> list[tuple[str | None, str]]:
    """(lemma, spelling) pairs to try for a class, in order: its table word alone, else its lemmas' spellings."""
    if c.concept_id in overrides:
        return [(None, overrides[c.concept_id])]
    return [(lemma, form) for lemma in c.lemmas for form in spellings(lemma)]


@dataclass(frozen=True)
class ConceptMatch:
    """The concepts kept (one row per concept and word model) and the classes dropped, with why.

    ``dropped``: concept_id -> the word models that have no word for it; ``shared``: concept_id -> (word, the
    concept_id kept for that word); ``overrides``: concept_id -> the word the concept-words table gives it (for
    the classes asked about), ``table`` naming that file.
    """

    table: pa.Table  # schema datasets.schema.CONCEPTS
    dropped: dict[str, tuple[str, ...]]
    shared: dict[str, tuple[str, str]] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    words_table: str | None = None

    @property
    def concept_ids(self) -> list[str]:
        return list(dict.fromkeys(self.table["concept_id"].to_pylist()))

    def reason(self, concept_id: str) -> str | None:
        """Why a class was dropped, in words; None if it was kept (or never asked about)."""
        if concept_id in self.shared:
            word, kept = self.shared[concept_id]
            return f"shares word {word!r} with {kept}"
        if concept_id in self.dropped:
            models = ", ".join(self.dropped[concept_id])
            if concept_id in self.overrides:
                return f"its table word {self.overrides[concept_id]!r} is not in {models}"
            return f"no lemma found in {models}"
        return None

    def summary(self, n_classes: int) -> str:
        kept = len(self.concept_ids)
        lines = [
            f"concepts: {kept}/{n_classes} classes matched in every word model ({100 * kept / max(n_classes, 1):.1f}%)"
        ]
        if self.overrides:
            lines.append(
                f"  {len(self.overrides)} class(es) named by the concept-words table {self.words_table}: "
                + ", ".join(f"{cid} -> {word}" for cid, word in sorted(self.overrides.items()))
            )
        for cid in sorted({*self.dropped, *self.shared}):
            lines.append(f"  dropped {cid}: {self.reason(cid)}")
        return "\n".join(lines)


def match_concepts(
    classes: Sequence[ClassInfo],
    source: str,
    word_models: Sequence[WordModel],
    concept_words: str | None = None,
) -> ConceptMatch:
    """Match every class to a word in each word model; keep the classes all models matched, one per word.

    Parameters
    ----------
    classes : the classes to match (e.g. those with images), in the order of the table's rows
    source : the class space (imagenet, cifar100, folder): the universe of the one-class-per-word rule
    word_models : every word model the concepts must have a word in
    concept_words : a concept-words table (path or URI), ``'none'``, or None for the class space's packaged
        table (CIFAR-100's; ImageNet has none)
    """
    universe = _space_classes(classes, source)
    table_path = concept_words_table(concept_words, source)
    overrides = read_concept_words(table_path, source, universe) if table_path else {}
    table_name = posixpath.basename(table_path) if concept_words is None and table_path else table_path
    matched: dict[str, dict[str, tuple[str | None, str]]] = {}  # word model -> concept_id -> (lemma, word)
    for word_model in word_models:
        tried = [(c.concept_id, lemma, form) for c in universe for lemma, form in _candidates(c, overrides)]
        present = word_model.contains([form for _, _, form in tried])
        found: dict[str, tuple[str | None, str]] = {}
        for (cid, lemma, form), ok in zip(tried, present):
            if ok and cid not in found:
                found[cid] = (lemma, form)
        matched[word_model.name] = found
    missing = {
        c.concept_id: tuple(name for name, found in matched.items() if c.concept_id not in found) for c in universe
    }
    shared: dict[str, tuple[str, str]] = {}
    owner: dict[tuple[str, str], str] = {}  # (word model, word) -> the class kept for it
    for c in universe:  # in class order: the first class of a word keeps it
        if any(missing[c.concept_id]):
            continue
        words = [(name, found[c.concept_id][1]) for name, found in matched.items()]
        clash = next(((word, owner[(name, word)]) for name, word in words if (name, word) in owner), None)
        if clash:
            shared[c.concept_id] = clash
        else:
            owner.update((key, c.concept_id) for key in words)
    asked = [c.concept_id for c in classes]
    rows = [
        (
            c.concept_id,
            c.class_index,
            c.wnid,
            f"table:{table_name}" if c.concept_id in overrides else source,
            name,
            *matched[name][c.concept_id],
        )
        for c in classes
        if not missing[c.concept_id] and c.concept_id not in shared
        for name in matched
    ]
    columns = list(zip(*rows)) if rows else [[] for _ in CONCEPTS.names]
    return ConceptMatch(
        pa.table(dict(zip(CONCEPTS.names, columns)), schema=CONCEPTS),
        {cid: missing[cid] for cid in asked if missing[cid]},
        {cid: shared[cid] for cid in asked if cid in shared},
        {cid: overrides[cid] for cid in asked if cid in overrides},
        table_name if overrides else None,
    )
