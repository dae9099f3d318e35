"""Class metadata: ImageNet-1k index <-> wnid <-> lemmas, and CIFAR-100 fine labels.

ImageNet comes from the files timm ships (``timm/data/_info``), so it is there
offline; the lemma lists keep WordNet's order, which concept matching relies on.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# The CIFAR-100 fine label names in label-index order, as in the dataset's `meta` pickle.
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


@dataclass(frozen=True)
class ClassInfo:
    """One class of a label space."""

    concept_id: str  # wnid for ImageNet, the label name for CIFAR-100 and plain folders
    class_index: int | None
    wnid: str | None
    lemmas: tuple[str, ...]  # candidate words, most specific first (WordNet order)


def _timm_info(name: str) -> str:
    # timm's folder found, not imported: importing timm (with torchvision) takes 5 s, and the class list needs no
    # model (importlib.resources.files would import the package)
    folder = importlib.util.find_spec("timm").submodule_search_locations[0]
    return Path(folder, "data", "_info", name).read_text()


@functools.cache
def imagenet_classes() -> tuple[ClassInfo, ...]:
    """The 1000 ImageNet-1k classes in the standard index order."""
    wnids = _timm_info("imagenet_synsets.txt").split()
    lemmas = dict(line.split("\t", 1) for line in _timm_info("imagenet_synset_to_lemma.txt").splitlines() if line)
    return tuple(
        ClassInfo(w, i, w, tuple(lemma.strip() for lemma in lemmas[w].split(","))) for i, w in enumerate(wnids)
    )


@functools.cache
def cifar100_classes() -> tuple[ClassInfo, ...]:
    """The 100 CIFAR-100 fine classes; multi-word names become spaced lemmas."""
    return tuple(ClassInfo(n, i, None, (n.replace("_", " "),)) for i, n in enumerate(CIFAR100_CLASSES))


CLASS_SPACES = {"imagenet": imagenet_classes, "cifar100": cifar100_classes}
