"""``semprobe adversarial`` end to end on the packaged samples, against references computed here."""

import dataclasses
import io
import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli_stderr
from PIL import Image
from statsmodels.stats.multitest import multipletests
from test_attack import reference_mim
from test_misclassified import naive_one_vs_two, reference_pool

from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError
from semprobe.datasets.classes import imagenet_classes
from semprobe.datasets.concepts import match_concepts
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.adversarial import chosen_pairs, run_adversarial
from semprobe.ray_jobs.cli import main
from semprobe.ray_jobs.config import AdversarialConfig
from semprobe.ray_jobs.failure_analysis import FailureContext

EPS, STEP, STEPS = 0.3, 0.06, 3  # in [-1, 1]: 0.3 is 38.25 levels of 255


@pytest.fixture(scope="module")
def glove():
    word_model = load_word_model("glove-50d")
    words = {
        c["class_index"]: c["word"]
        for c in match_concepts(imagenet_classes(), "imagenet", [word_model]).table.to_pylist()
    }
    return words, dict(zip(words, word_model.vectors(list(words.values())).astype(np.float64)))


@pytest.fixture(scope="module")
def adversarial_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("adv") / "out"
    cfg = AdversarialConfig(
        out=str(out), sources=2, targets_per_source=3, eps=EPS, step=STEP, steps=STEPS, permutations=30, attack_shard=4
    )
    return out, run_adversarial(cfg.validate(), log=lambda m: None)


def test_pairs_follow_the_word_similarity_ranks(adversarial_run, glove):
    out, summary = adversarial_run
    words, vectors = glove
    rows = pq.read_table(out / "adversarial.parquet").to_pylist()
    assert summary["n_pairs"] == len(rows) == 6 and summary["references"] == 10
    _, pool, _ = reference_pool(out)
    sources = [int(c) for c in np.random.default_rng([0, 1]).permutation(sorted(pool))][:2]
    assert [row["image_id"] for row in rows] == [pool[c] for c in sources for _ in range(3)]
    for t in sources:
        others = [c for c in sorted(words) if words[c] != words[t]]
        cos = {c: vectors[t] @ vectors[c] / np.linalg.norm(vectors[t]) / np.linalg.norm(vectors[c]) for c in others}
        pearson = {c: np.corrcoef(vectors[t], vectors[c])[0, 1] for c in others}  # the paper ranks by Pearson r
        ranked = sorted(others, key=lambda c: (-pearson[c], c))
        mine = [row for row in rows if row["source_index"] == t]
        # the most similar, the least similar, and the middle rank (round((len - 1) / 2))
        assert [row["target_index"] for row in mine] == [ranked[0], ranked[round((len(ranked) - 1) / 2)], ranked[-1]]
        assert [row["target_rank"] for row in mine] == [1, 2, 3]
        assert [row["word_cosine"] for row in mine] == pytest.approx(
            [cos[row["target_index"]] for row in mine], abs=1e-12
        )


class FakeWords:
    def __init__(self, vectors: dict[str, np.ndarray]):
        self.table = vectors

    def vectors(self, words):
        return np.stack([self.table[w] for w in words])


@pytest.mark.parametrize("similarity", ["pearson", "cosine"])
def test_targets_are_ranked_by_the_chosen_word_similarity(similarity):
    """Word vectors with offsets, so that Pearson r (centred) and cosine (not) rank the targets differently."""
    rng = np.random.default_rng(3)
    classes = list(range(12))
    words = {c: f"w{c}" for c in classes}
    vectors = {f"w{c}": rng.normal(size=8) + rng.normal(scale=3) for c in classes}
    manifest = [{"image_id": f"img{c}", "uri": f"/x/{c}.png", "class_index": c} for c in classes]
    pool = {c: f"img{c}" for c in classes}
    ctx = FailureContext(None, FakeWords(vectors), None, words, manifest, {}, pool, classes)
    cfg = AdversarialConfig(sources=3, targets_per_source=4, target_similarity=similarity).validate()
    pairs = chosen_pairs(cfg, ctx)
    sources = [int(c) for c in np.random.default_rng([0, 1]).permutation(classes)][:3]
    assert [p.source_index for p in pairs] == [t for t in sources for _ in range(4)]
    measures = {
        "pearson": lambda a, b: np.corrcoef(a, b)[0, 1],
        "cosine": lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b),
    }
    for t in sources:
        others = [c for c in classes if c != t]
        sim = {c: measures[similarity](vectors[words[t]], vectors[words[c]]) for c in others}
        ranked = sorted(others, key=lambda c: (-sim[c], c))
        # ranks 1 and 4: the most and least similar; 2 and 3 evenly spaced: round(10/3) = 3, round(20/3) = 7
        expected = [ranked[0], ranked[3], ranked[7], ranked[10]]
        mine = [p for p in pairs if p.source_index == t]
        assert [p.target_index for p in mine] == expected and [p.target_rank for p in mine] == [1, 2, 3, 4]
        cosine = [measures["cosine"](vectors[words[t]], vectors[words[c]]) for c in expected]
        assert [p.word_cosine for p in mine] == pytest.approx(cosine, abs=1e-12)  # the cosine, whatever ranks
    if similarity == "pearson":  # the data are built so that the two rankings disagree somewhere
        cosine = chosen_pairs(dataclasses.replace(cfg, target_similarity="cosine"), ctx)
        assert [p.target_index for p in cosine] != [p.target_index for p in pairs]


def test_stored_images_are_the_quantised_mim_attack_inside_the_eps_ball(adversarial_run):
    out, summary = adversarial_run
    rows = pq.read_table(out / "adversarial.parquet").to_pylist()
    loaded = load_model("efficientnet_lite0")
    pre = loaded.preprocess
    manifest, _, _ = reference_pool(out)
    clean = np.stack(
        [
            decode_image(read_bytes(manifest[row["image_id"]]["uri"]), pre.size, pre.resize_size, pre.interpolation)
            for row in rows
        ]
    )
    p = torch.from_numpy(clean).permute(0, 3, 1, 2).float()
    target = torch.tensor([row["target_index"] for row in rows])
    # in [-1, 1], in the job's batches (attack shards of 4 pairs)
    mean = torch.tensor([-1 + 2 * m for m in pre.mean]).view(1, 3, 1, 1)  # the model's normalisation, in [-1, 1]
    std = torch.tensor([2 * s for s in pre.std]).view(1, 3, 1, 1)
    adv = torch.cat(
        [
            reference_mim(
                loaded.module,
                -1 + p[lo : lo + 4] * (2 / 255),
                target[lo : lo + 4],
                mean,
                std,
                EPS,
                STEP,
                STEPS,
                1.0,
                bounds=(-1, 1),
            )
            for lo in (0, 4)
        ]
    )
    expected = torch.minimum(torch.maximum(torch.round((adv + 1) * (255 / 2)), p - 38), p + 38).clamp(0, 255)
    with torch.no_grad():
        logits = loaded.module(
            (expected / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
        )
    for k, row in enumerate(rows):
        assert row["status"] in ("success", "missed") and row["clean_predicted"] == row["source_index"]
        stored = np.asarray(Image.open(io.BytesIO(row["png"])))
        np.testing.assert_array_equal(stored, expected[k].permute(1, 2, 0).numpy().astype(np.uint8))
        linf = np.abs(stored.astype(int) - clean[k].astype(int)).max()
        assert linf <= 38 and row["linf"] == pytest.approx(linf * 2 / 255)
        assert row["predicted"] == int(logits[k].argmax())
        assert (row["status"] == "success") == (row["predicted"] == row["target_index"])
    assert summary["n_success"] == sum(row["status"] == "success" for row in rows) > 0
    assert summary["n_extraction_agrees"] == summary["n_success"]


def test_one_vs_two_by_target_rank_matches_the_naive_reference(adversarial_run, glove):
    out, summary = adversarial_run
    _, vectors = glove
    vec = vectors.__getitem__
    success = [row for row in pq.read_table(out / "adversarial.parquet").to_pylist() if row["status"] == "success"]
    _, pool, order = reference_pool(out)
    # the rank groups, then their union ("all targets"), which has a table of its own
    rows = [
        *pq.read_table(out / "one_vs_two_by_rank.parquet").to_pylist(),
        *pq.read_table(out / "one_vs_two.parquet").to_pylist(),
    ]
    groups = list(dict.fromkeys(row["group"] for row in rows))
    assert groups[-1] == "all targets" and len(rows) == 16 * len(groups)
    for row in rows[::5]:
        acts = {}
        for folder in ("extract", "extract-adversarial"):
            t = pads.dataset(
                out / folder / "activations" / "efficientnet_lite0" / row["layer"], format="arrow"
            ).to_table()
            acts.update(zip(t["image_id"].to_pylist(), t["values"].combine_chunks().to_numpy_ndarray()))
        members = [
            s
            for s in success
            if row["group"] == "all targets" or row["group"].startswith(f"target rank {s['target_rank']}")
        ]
        cases = []
        for s in members:
            t, p = s["source_index"], s["target_index"]
            refs = [c for c in order if c not in (t, p)][:10]
            cases.append(
                (acts[s["adversarial_id"]], [acts[pool[c]] for c in refs], vec(t), vec(p), [vec(c) for c in refs])
            )
        accuracy, p_value = naive_one_vs_two(cases, 30)
        assert row["n"] == len(members) and row["accuracy"] == accuracy
        assert row["p_value"] == pytest.approx(p_value, abs=1e-12)
    _, p_bhy, _, _ = multipletests(
        [row["p_value"] for row in rows], alpha=0.05, method="fdr_by"
    )  # one family: groups x layers
    assert [row["p_bhy"] for row in rows] == pytest.approx(list(p_bhy), abs=1e-12)
    for name in ("one_vs_two.png", "examples.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert "target rank 1 (most similar)" in (out / "report.html").read_text()


def test_rerun_attacks_nothing_and_is_identical(adversarial_run, capsys):
    out, _ = adversarial_run
    names = ("adversarial.parquet", "one_vs_two.parquet", "one_vs_two_by_rank.parquet")
    before = {name: (out / name).read_bytes() for name in names}
    (out / "adversarial" / "shards" / "shard-00001.parquet").unlink()  # an interrupted run: one shard of two missing
    logs = []
    cfg = json.loads((out / "config.json").read_text())["config"]
    run_adversarial(AdversarialConfig(**cfg).validate(), log=logs.append)
    assert "resuming: 1 of 2 attack shards already complete" in logs
    assert {name: (out / name).read_bytes() for name in before} == before


def test_bad_pairs_are_recorded_not_fatal(ray_session, tmp_path, glove):
    words, _ = glove
    classes = imagenet_classes()
    no_word = next(c.wnid for c in classes if c.class_index not in words and c.lemmas[0] != "crane")
    classes_by_wnid = {c.wnid: c.class_index for c in classes}
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "image_id,target\n"
        "imagenet_02_438.jpg,n00000000\n"  # not a class
        f"imagenet_02_438.jpg,{no_word}\n"  # a class without a word
        "imagenet_06_609.jpg,1\n"  # misclassified by Lite0
        "missing.jpg,2\n"
        "imagenet_02_438.jpg,438\n"  # its own class
        "imagenet_02_438.jpg,n03126707\n"  # the machine crane: the bird (134) owns the word 'crane'
    )
    summary = run_adversarial(
        AdversarialConfig(out=str(tmp_path / "out"), pairs=str(pairs), permutations=10).validate(), log=lambda m: None
    )
    rows = pq.read_table(tmp_path / "out" / "adversarial.parquet").to_pylist()
    notes = [row["note"] for row in rows]
    assert notes[0] == "target 'n00000000' is not an ImageNet class (an index 0-999 or a wnid)"
    assert notes[1] == f"target class {classes_by_wnid[no_word]} has no word: no lemma found in glove-50d"
    assert notes[2].startswith("source already misclassified (as class ")
    assert notes[3] == "not an image of --images whose class has a word"
    assert notes[4] == "the target is the source's own class"
    assert notes[5] == "target class 517 has no word: shares word 'crane' with n02012849"
    assert [row["status"] for row in rows] == ["skipped"] * 6 and rows[2]["clean_predicted"] == 436
    assert (summary["n_skipped"], summary["n_success"]) == (6, 0) and not (
        tmp_path / "out" / "one_vs_two.parquet"
    ).exists()
    assert "not an ImageNet class" in (tmp_path / "out" / "report.html").read_text()


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(
        InputError, match=r"--eps 3.0 lies outside the range of the input space \[-1,1\]: choose 0 < eps <= 2"
    ):
        AdversarialConfig(eps=3.0).validate()
    with pytest.raises(InputError, match=r"--eps 1.5 lies outside the range of the input space \[0,1\]"):
        AdversarialConfig(eps=1.5, space="0,1").validate()
    assert main(["adversarial", "--space", "0,255", "--out", str(tmp_path / "x")]) == 2
    assert cli_stderr(capsys).strip() == "semprobe: error: unknown input space '[0,255]': choose one of [0,1], [-1,1]"
    assert main(["adversarial", "--pairs", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "y")]) == 2
    assert "expected a .csv or .parquet file with columns image_id, target" in cli_stderr(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
