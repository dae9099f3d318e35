"""Smoke tests of the 2 vs. 2 benchmarks at toy sizes: they run and report; speed is never asserted."""

import json
import math

from ray_jobs.cli import main


def _report(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    report, end = json.JSONDecoder().raw_decode(out)
    assert out[end:].strip().startswith("| benchmark |")
    return report


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_twovtwo(capsys):
    report = _report(capsys, ["bench", "twovtwo", "--sizes", "30", "--pairs", "20"])
    assert [(r["w"], r["threads"]) for r in report["results"]] == [(30, "1 thread"), (30, "all cores")]
    for r in report["results"]:
        assert r["n_pairs"] == 435 and 0 <= r["accuracy"] <= 1
        assert all(_positive(r[k]) for k in ("two_vs_two_s", "floor_matmul_s", "ratio", "naive_extrapolated_s", "speedup"))
        assert r["naive_agree"] == r["naive_pairs"] == 20


def test_bench_permutations(capsys):
    report = _report(capsys, ["bench", "permutations", "--w", "30", "--permutations", "20"])
    assert (report["w"], report["permutations"]) == (30, 20)
    assert [r["threads"] for r in report["results"]] == ["1 thread", "all cores"]
    for r in report["results"]:
        assert all(_positive(r[k]) for k in ("permutation_null_s", "ms_per_permutation", "floor_matmuls_s", "ratio"))


def test_bench_attack(capsys):
    report = _report(capsys, ["bench", "attack", "--batch-size", "2", "--steps", "2", "--repeats", "1"])
    assert (report["batch_size"], report["steps"], report["target_ratio"]) == (2, 2, 1.3)
    assert all(_positive(report[k]) for k in ("figure_ms_per_image_iteration", "floor_ms_forward_backward_per_image", "ratio"))
    assert 0 <= report["reached_target"] <= 2


def test_bench_train(capsys, ray_session):
    report = _report(capsys, ["bench", "train", "--model", "fractalnet_tiny", "--batch-size", "10", "--steps", "3", "--repeats", "1"])
    assert (report["model"], report["batch_size"], report["steps"], report["target_overhead"]) == ("fractalnet_tiny", 10, 3, 0.1)
    assert all(_positive(report[k]) for k in ("figure_ray_train_images_per_s", "floor_plain_loop_images_per_s",
                                               "plain_loop_in_a_ray_task_images_per_s"))
    assert report["max_weight_difference"] == 0.0  # Ray Train ran exactly the steps of the plain loop
