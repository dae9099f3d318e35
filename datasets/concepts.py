"""Concept matching: which word stands for each class in each word model.

For each class, the first lemma in the synset's order that the word model has,
tried as written, lowercased, and with spaces as underscores (word2vec's
phrases). A class no lemma matches is dropped and reported. With several word
models the concepts are the classes every model matched, so that all models
are compared on the same concepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from semprobe.datasets.classes import ClassInfo
from semprobe.datasets.schema import CONCEPTS
from semprobe.datasets.words import WordModel


def spellings(lemma: str) -> list[str]:
    """The spellings tried for one lemma, in order, without repeats."""
    forms = [lemma, lemma.lower(), lemma.replace(" ", "_"), lemma.lower().replace(" ", "_")]
    return list(dict.fromkeys(forms))


@dataclass(frozen=True)
class ConceptMatch:
    """The concepts kept (one row per concept and word model) and the classes dropped."""

    table: pa.Table  # schema datasets.schema.CONCEPTS
    dropped: dict[str, tuple[str, ...]]  # concept_id -> the word models that had none of its lemmas

    @property
    def concept_ids(self) -> list[str]:
        return list(dict.fromkeys(self.table["concept_id"].to_pylist()))

    def summary(self, n_classes: int) -> str:
        kept = len(self.concept_ids)
        lines = [
            f"concepts: {kept}/{n_classes} classes matched in every word model ({100 * kept / max(n_classes, 1):.1f}%)"
        ]
        for cid, models in sorted(self.dropped.items()):
            lines.append(f"  dropped {cid}: no lemma found in {', '.join(models)}")
        return "\n".join(lines)


def match_concepts(classes: Sequence[ClassInfo], source: str, word_models: Sequence[WordModel]) -> ConceptMatch:
    """Match every class to a word in each word model; keep the classes all models matched."""
    matched: dict[str, dict[str, tuple[str, str]]] = {}  # word model -> concept_id -> (lemma, word)
    for word_model in word_models:
        tried = [(c.concept_id, lemma, form) for c in classes for lemma in c.lemmas for form in spellings(lemma)]
        present = word_model.contains([form for _, _, form in tried])
        found: dict[str, tuple[str, str]] = {}
        for (cid, lemma, form), ok in zip(tried, present):
            if ok and cid not in found:
                found[cid] = (lemma, form)
        matched[word_model.name] = found
    dropped = {
        c.concept_id: tuple(name for name, found in matched.items() if c.concept_id not in found)
        for c in classes
        if any(c.concept_id not in found for found in matched.values())
    }
    rows = [
        (c.concept_id, c.class_index, c.wnid, source, name, *matched[name][c.concept_id])
        for c in classes
        if c.concept_id not in dropped
        for name in matched
    ]
    columns = list(zip(*rows)) if rows else [[] for _ in CONCEPTS.names]
    return ConceptMatch(pa.table(dict(zip(CONCEPTS.names, columns)), schema=CONCEPTS), dropped)
