import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semprobe.analysis.errors import InputError
from semprobe.datasets.classes import CIFAR100_CLASSES, ClassInfo, cifar100_classes, imagenet_classes
from semprobe.datasets.concepts import match_concepts, packaged_table, spellings
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
    # 645 classes have a GloVe word; of six pairs that share one, the lower index keeps it
    assert (len(words), len(inet.dropped), len(inet.shared)) == (639, 355, 6)
    assert inet.shared == {
        "n01807496": ("partridge", "n01797886"),
        "n02510455": ("panda", "n02509815"),
        "n02963159": ("cardigan", "n02113186"),
        "n03126707": ("crane", "n02012849"),  # the machine; the bird (index 134) keeps the word
        "n03710721": ("maillot", "n03710637"),
        "n03977966": ("wagon", "n02814533"),
    }
    assert len(set(words.values())) == len(words)
    lemma_only = match_concepts(cifar100_classes(), "cifar100", [glove], concept_words="none")
    assert "maple_tree" in lemma_only.dropped and "apple" not in lemma_only.dropped
    assert len(lemma_only.concept_ids) == 91


# --- one class per word --------------------------------------------------------------------

CRANE_BIRD = imagenet_classes()[134]
CRANE_MACHINE = imagenet_classes()[517]


def test_classes_sharing_a_word_keep_the_lowest_index_whatever_the_order_given():
    assert (CRANE_BIRD.lemmas[0], CRANE_MACHINE.lemmas[0]) == ("crane", "crane")
    vocab = Vocabulary("v", {"crane", "tench"})
    m = match_concepts([CRANE_MACHINE, TENCH, CRANE_BIRD], "imagenet", [vocab])
    assert m.concept_ids == [TENCH.concept_id, CRANE_BIRD.concept_id]  # rows in the order given
    assert m.shared == {CRANE_MACHINE.concept_id: ("crane", CRANE_BIRD.concept_id)} and m.dropped == {}
    assert m.reason(CRANE_MACHINE.concept_id) == f"shares word 'crane' with {CRANE_BIRD.concept_id}"
    assert f"  dropped {CRANE_MACHINE.concept_id}: shares word 'crane' with {CRANE_BIRD.concept_id}" in m.summary(3)


def test_the_rule_holds_over_the_class_space_not_only_the_classes_with_images():
    # Only the machine has images: the bird, lower in ImageNet, still owns 'crane', so every job agrees.
    m = match_concepts([CRANE_MACHINE], "imagenet", [Vocabulary("v", {"crane"})])
    assert m.concept_ids == [] and m.shared == {CRANE_MACHINE.concept_id: ("crane", CRANE_BIRD.concept_id)}
    # Outside a known class space the classes given are the universe, in class-index order.
    a, b, c = (ClassInfo(n, i, None, (w,)) for n, i, w in (("a", 2, "x"), ("b", 1, "x"), ("c", 0, "y")))
    m = match_concepts([a, b, c], "folder", [Vocabulary("v", {"x", "y"})])
    assert m.concept_ids == ["b", "c"] and m.shared == {"a": ("x", "b")}


def test_a_word_shared_in_any_word_model_drops_the_later_class():
    one = ClassInfo("one", 0, None, ("alpha", "beta"))
    two = ClassInfo("two", 1, None, ("gamma", "beta"))
    three = ClassInfo("three", 2, None, ("delta",))
    first = Vocabulary("m1", {"alpha", "gamma", "delta"})  # every class has a word of its own
    second = Vocabulary("m2", {"beta", "delta"})  # one and two are both 'beta'
    m = match_concepts([one, two, three], "folder", [first, second])
    assert m.concept_ids == ["one", "three"] and m.shared == {"two": ("beta", "one")}
    # a class dropped for a missing word claims nothing
    m = match_concepts([one, two], "folder", [Vocabulary("m1", {"gamma"}), Vocabulary("m2", {"beta"})])
    assert m.concept_ids == ["two"] and m.dropped == {"one": ("m1",)}


# --- concept-words tables --------------------------------------------------------------------


def test_concept_words_table_overrides_the_lemma_match(tmp_path):
    vocab = Vocabulary("v", {"man-eater", "tench", "apple", "fish"})
    table = tmp_path / "words.csv"
    table.write_text("class,word\n948,apple\nn01440764,fish\nn01484850, nope\n")
    m = match_concepts([SHARK, APPLE, TENCH], "imagenet", [vocab], str(table))
    rows = {r["concept_id"]: r for r in m.table.to_pylist()}
    assert set(rows) == {APPLE.concept_id, TENCH.concept_id}
    assert (rows[APPLE.concept_id]["word"], rows[APPLE.concept_id]["lemma"]) == ("apple", None)
    assert rows[TENCH.concept_id]["word"] == "fish"  # the table wins over a lemma the model has
    assert rows[TENCH.concept_id]["source"] == f"table:{table}"
    # the shark's lemma 'man-eater' is in the model, but the table names the class: its word decides
    assert m.dropped == {SHARK.concept_id: ("v",)}
    assert m.reason(SHARK.concept_id) == "its table word 'nope' is not in v"
    assert m.overrides == {SHARK.concept_id: "nope", APPLE.concept_id: "apple", TENCH.concept_id: "fish"}
    assert f"3 class(es) named by the concept-words table {table}" in m.summary(3)


def test_concept_words_parquet_with_integer_classes_and_shared_words(tmp_path):
    table = tmp_path / "words.parquet"
    pq.write_table(pa.table({"class": [517, 0], "word": ["tench", "crane"]}), table)  # swapped on purpose
    vocab = Vocabulary("v", {"crane", "tench"})
    m = match_concepts([TENCH, CRANE_BIRD, CRANE_MACHINE], "imagenet", [vocab], str(table))
    # tench (0) now says 'crane' and owns it: the bird (134) shares it; the machine (517) says 'tench', alone
    assert m.concept_ids == [TENCH.concept_id, CRANE_MACHINE.concept_id]
    assert m.shared == {CRANE_BIRD.concept_id: ("crane", TENCH.concept_id)}


@pytest.mark.parametrize(
    "text, message",
    [
        ("class,word\nn99999999,x\n", r"class 'n99999999' is not a class of imagenet \(a wnid or an index 0-999\)"),
        ("class,word\n1000,x\n", "class '1000' is not a class of imagenet"),
        ("class,word\n0,x\nn01440764,y\n", "class 'n01440764' is named twice"),
        ("class,word\n0,\n", "class '0' has no word"),
        ("klass,word\n0,x\n", r"lacks column\(s\) class: it needs class, word"),
    ],
)
def test_bad_concept_words_tables(tmp_path, text, message):
    table = tmp_path / "t.csv"
    table.write_text(text)
    with pytest.raises(InputError, match=f"concept words {table}: {message}|concept words {table} {message}"):
        match_concepts([TENCH], "imagenet", [Vocabulary("v", {"x"})], str(table))


def test_concept_words_file_kinds(tmp_path):
    with pytest.raises(InputError, match=r"concept words .*t\.txt: expected a \.csv or \.parquet file"):
        match_concepts([TENCH], "imagenet", [Vocabulary("v", {"x"})], str(tmp_path / "t.txt"))
    with pytest.raises(InputError, match=r"cannot read concept words .*missing\.csv"):
        match_concepts([TENCH], "imagenet", [Vocabulary("v", {"x"})], str(tmp_path / "missing.csv"))
    cifar = tmp_path / "c.csv"
    cifar.write_text("class,word\nmaple_tree,maple\n5,sofa\n")  # a label name and an index (bed)
    m = match_concepts(cifar100_classes(), "cifar100", [Vocabulary("v", {"maple", "sofa"})], str(cifar))
    assert [(r["concept_id"], r["word"]) for r in m.table.to_pylist()] == [("bed", "sofa"), ("maple_tree", "maple")]
    with pytest.raises(InputError, match="class 'oak' is not a class of cifar100 \\(a label name or an index 0-99\\)"):
        cifar.write_text("class,word\noak,x\n")
        match_concepts(cifar100_classes(), "cifar100", [Vocabulary("v", {"x"})], str(cifar))


def test_packaged_cifar100_table_matches_every_class_in_glove_with_distinct_words():
    glove = load_word_model("glove-50d")
    m = match_concepts(cifar100_classes(), "cifar100", [glove])  # the packaged table by default
    words = [r["word"] for r in m.table.to_pylist()]
    assert len(words) == 100 and len(set(words)) == 100 and m.dropped == {} and m.shared == {}
    assert all(glove.contains(words))
    assert m.words_table == "cifar100_words.csv" and packaged_table("cifar100_words.csv").endswith(
        "datasets/data/cifar100_words.csv"
    )
    by_class = dict(zip(m.table["concept_id"].to_pylist(), words))
    assert {c: by_class[c] for c in CIFAR100_CLASSES if "_" in c} == {
        "aquarium_fish": "aquarium",
        "lawn_mower": "mower",
        "maple_tree": "maple",
        "oak_tree": "oak",
        "palm_tree": "palm",
        "pickup_truck": "truck",
        "pine_tree": "pine",
        "sweet_pepper": "pepper",
        "willow_tree": "willow",
    }
    sources = dict(zip(m.table["concept_id"].to_pylist(), m.table["source"].to_pylist()))
    assert sources["maple_tree"] == "table:cifar100_words.csv" and sources["apple"] == "cifar100"
    assert sum(s.startswith("table:") for s in sources.values()) == 9
    # ImageNet has no packaged table: the default is the lemma match
    assert match_concepts([TENCH], "imagenet", [glove]).overrides == {}
