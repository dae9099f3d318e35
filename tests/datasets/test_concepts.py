import numpy as np

from semprobe.datasets.classes import CIFAR100_CLASSES, ClassInfo, imagenet_classes
from semprobe.datasets.concepts import match_concepts, spellings
from semprobe.datasets.words import WordModel, load_word_model


class Vocabulary(WordModel):
    """A word model that knows a fixed set of words (vectors are irrelevant to matching)."""

    def __init__(self, name, words):
        self.name, self.dim, self.words = name, 1, set(words)

    def contains(self, words):
        return np.array([w in self.words for w in words])

    def vectors(self, words):
        return np.ones((len(words), 1), np.float32)


SHARK = ClassInfo("n01484850", 2, "n01484850", ("great white shark", "white shark", "man-eater"))
APPLE = ClassInfo("n07742313", 948, "n07742313", ("Granny Smith",))
TENCH = ClassInfo("n01440764", 0, "n01440764", ("tench", "Tinca tinca"))


def test_spellings_order():
    assert spellings("Granny Smith") == ["Granny Smith", "granny smith", "Granny_Smith", "granny_smith"]
    assert spellings("dog") == ["dog"]


def test_first_lemma_in_synset_order_wins_with_phrase_spellings():
    w2v = Vocabulary("w2v", {"man-eater", "white_shark", "granny_smith", "tench"})
    m = match_concepts([SHARK, APPLE, TENCH], "imagenet", [w2v])
    rows = m.table.to_pylist()
    assert [(r["concept_id"], r["lemma"], r["word"]) for r in rows] == [
        ("n01484850", "white shark", "white_shark"),  # the 2nd lemma, as a word2vec phrase
        ("n07742313", "Granny Smith", "granny_smith"),
        ("n01440764", "tench", "tench"),
    ]
    assert m.dropped == {}


def test_missing_word_drops_class_and_intersection_across_models():
    a = Vocabulary("a", {"tench", "man-eater"})
    b = Vocabulary("b", {"tench", "granny smith"})
    m = match_concepts([SHARK, APPLE, TENCH], "imagenet", [a, b])
    assert m.concept_ids == ["n01440764"]
    assert m.dropped == {"n01484850": ("b",), "n07742313": ("a",)}
    assert m.table["word_model"].to_pylist() == ["a", "b"]
    summary = m.summary(3)
    assert summary.splitlines()[0] == "concepts: 1/3 classes matched in every word model (33.3%)"
    assert "dropped n01484850: no lemma found in b" in summary


def test_glove_coverage_of_imagenet_and_cifar():
    glove = load_word_model("glove-50d")
    inet = match_concepts(imagenet_classes(), "imagenet", [glove])
    words = dict(zip(inet.table["concept_id"].to_pylist(), inet.table["word"].to_pylist()))
    assert words["n01440764"] == "tench"
    assert words["n02108089"] == "boxer"
    assert words["n01484850"] == "man-eater"  # GloVe 6B has no phrases: the 3rd lemma of great white shark
    assert words["n02085620"] == "chihuahua"  # "Chihuahua" lowercased
    assert "n07742313" in inet.dropped  # Granny Smith: no single-word lemma
    assert (len(words), len(inet.dropped)) == (645, 355)
    cifar = match_concepts(
        [ClassInfo(n, i, None, (n.replace("_", " "),)) for i, n in enumerate(CIFAR100_CLASSES)], "cifar100", [glove]
    )
    assert "maple_tree" in cifar.dropped and "apple" not in cifar.dropped
