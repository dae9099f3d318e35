import pyarrow as pa

from semprobe.datasets.image_sets import draw_image_sets


def images(counts: dict[str, int]) -> pa.Table:
    rows = [(f"{c}/{i:03d}", c) for c, n in counts.items() for i in range(n)]
    return pa.table({"image_id": [r[0] for r in rows], "concept_id": [r[1] for r in rows]})


def chosen(table: pa.Table) -> dict[tuple[str, int], str]:
    return {(r["concept_id"], r["set_index"]): r["image_id"] for r in table.to_pylist()}


def test_disjoint_sets_one_image_per_concept_each():
    drawn = draw_image_sets(images({"cat": 10, "dog": 7, "eel": 2}), k=3, seed=1)
    got = chosen(drawn.images)
    assert sorted(got) == [(c, s) for c in ("cat", "dog") for s in range(3)]
    assert len(set(got.values())) == 6  # disjoint
    assert drawn.dropped == {"eel": 2}
    assert drawn.images["image_id"].to_pylist() == sorted(got.values())


def test_seeded_and_independent_of_other_concepts_and_row_order():
    base = chosen(draw_image_sets(images({"cat": 10, "dog": 7}), k=2, seed=5).images)
    assert base == chosen(draw_image_sets(images({"cat": 10, "dog": 7}), k=2, seed=5).images)
    shuffled = images({"dog": 7, "cat": 10, "fox": 4})
    other = chosen(draw_image_sets(shuffled.take(pa.array(list(range(20, -1, -1)))), k=2, seed=5).images)
    assert {k: v for k, v in other.items() if k[0] != "fox"} == base
    draws = {tuple(sorted(chosen(draw_image_sets(images({"cat": 10}), k=2, seed=s).images).items())) for s in range(6)}
    assert len(draws) > 1  # the seed matters
