"""The benchmarks at toy sizes: they run and report each figure beside its floor; speed is never asserted."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import own_lines

from semprobe.ray_jobs import bench
from semprobe.ray_jobs.bench import settle
from semprobe.ray_jobs.cli import main

HEADER = "| benchmark | device | figure | floor | ratio | target | met |"


def _report(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = own_lines(capsys.readouterr().out)
    report, end = json.JSONDecoder().raw_decode(out)
    assert out[end:].strip().startswith(HEADER)
    return report


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_twovtwo(capsys):
    report = _report(capsys, ["bench", "twovtwo", "--sizes", "30", "--pairs", "20"])
    assert [(r["w"], r["threads"]) for r in report["results"]] == [(30, "1 thread"), (30, "all cores")]
    for r in report["results"]:
        assert r["n_pairs"] == 435 and 0 <= r["accuracy"] <= 1
        assert all(
            _positive(r[k]) for k in ("two_vs_two_s", "floor_matmul_s", "ratio", "naive_extrapolated_s", "speedup")
        )
        assert r["naive_agree"] == r["naive_pairs"] == 20


def test_bench_permutations(capsys):
    report = _report(capsys, ["bench", "permutations", "--w", "30", "--permutations", "20"])
    assert (report["w"], report["permutations"]) == (30, 20)
    assert [(r["kernel"], r["threads"], r["sets"], r["permutations"]) for r in report["results"]] == [
        ("numpy", "1 thread", 1, 20),
        ("numpy", "all cores", 1, 20),
        ("torch", "all cores", 1, 20),
        ("torch", "all cores", 5, 4),  # the paper's null: 5 sets' matrices per permutation, as many products
    ]
    for r in report["results"]:
        assert all(_positive(r[k]) for k in ("permutation_null_s", "ms_per_permutation", "floor_matmuls_s", "ratio"))


def test_bench_words(capsys):
    report = _report(capsys, ["bench", "words", "--words-mb", "0.3", "--repeats", "1"])
    # 0.3 MB of 300-value lines of about 8 bytes a value: 124 words; 1000 absent and every word present looked up
    assert (report["n_words"], report["dim"], report["lookups"]) == (124, 300, 124 + 1000)
    assert 0.25 < report["file_mb"] < 0.35
    assert all(_positive(report[k]) for k in ("scan_s", "conversion_s", "mapped_s"))
    (r,) = report["rows"]
    assert r["ratio"] == pytest.approx(report["scan_s"] / report["mapped_s"], rel=1e-3)


def test_bench_all_writes_one_json_and_one_table(capsys, ray_session, tmp_path, monkeypatch):
    # Between benchmarks bench waits up to a minute each for the CPUs to go quiet, which on a shared test machine
    # they never do (test_settle_waits_while_the_cpus_are_busy covers the wait); the figures here mean nothing.
    monkeypatch.setattr(bench, "settle", lambda busy=0.2, limit=60.0: 0.0)
    assert main(["bench", "all", "--quick", "--words-mb", "0.3", "--results", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    by_name = {r["benchmark"]: r for r in report["results"]}
    assert list(by_name) == ["extract", "twovtwo", "permutations", "analysis", "affine", "attack", "train", "words"]
    assert report["machine"]["cpus"] >= 1 and report["quick"] is True
    for r in report["rows"]:  # each figure beside its floor, the ratio, and whether the target is met
        if r["target"] is not None:
            op, target = r["target"].split()
            assert _positive(r["ratio"]) and r["met"] == (
                r["ratio"] >= float(target) if op == ">=" else r["ratio"] <= float(target)
            )
    extract = by_name["extract"]
    assert extract["rows"][0]["ratio"] == pytest.approx(
        extract["figure_images_per_s"] / extract["floor_images_per_s"], rel=1e-3
    )
    attack = by_name["attack"]
    assert (attack["batch_size"], attack["steps"], attack["target_ratio"]) == (2, 2, 1.3) and 0 <= attack[
        "reached_target"
    ] <= 2
    assert all(
        _positive(attack[k]) for k in ("figure_ms_per_image_iteration", "floor_ms_forward_backward_per_image", "ratio")
    )
    train = by_name["train"]
    assert (train["model"], train["batch_size"], train["steps"], train["target_overhead"]) == (
        "fractalnet_tiny",
        10,
        2,
        0.1,
    )
    assert all(
        _positive(train[k])
        for k in (
            "figure_ray_train_images_per_s",
            "floor_plain_loop_images_per_s",
            "plain_loop_in_a_ray_task_images_per_s",
        )
    )
    assert train["max_weight_difference"] == 0.0  # Ray Train ran exactly the steps of the plain loop
    assert by_name["affine"]["solve_maps"] == 6 and len(report["rows"]) == 1 + 4 + 4 + 6 + 2 + 1 + 1 + 1
    analysis = by_name["analysis"]
    assert [(k["device"], k["precision"]) for k in analysis["kernels"]] == [("cpu", "fp64"), ("cpu", "fp32")]
    assert all(_positive(k["tflops"]) and _positive(k["plain_tflops"]) for k in analysis["kernels"])
    assert analysis["real"]["agree"] and 0 <= analysis["real"]["fraction"] < 0.05
    assert set(analysis["store_seconds"]) == {"activations", "similarity"}
    assert analysis["run_layers"] == bench.QUICK_RUN_LAYERS and f"--layers {bench.QUICK_RUN_LAYERS}," in next(
        r["benchmark"] for r in analysis["rows"] if r["benchmark"].startswith("semprobe run")
    )
    assert [r["figure"] for r in report["rows"] if r["device"] == "GPU"] == ["no GPU"] * 2
    header, table, projection = (tmp_path / "bench.md").read_text().split("\n\n", 2)
    assert "--quick" in header and table.count("\n| ") == len(report["rows"])  # the rows under the header line
    assert "1 x p5.48xlarge: 8 x H100 SXM" in projection and projection.count("total (cost)") == 3
    assert own_lines(capsys.readouterr().out).startswith(HEADER)


def test_settle_waits_while_the_cpus_are_busy():
    spinners = [
        subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 6: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)
        assert settle(busy=0.2, limit=2.0) >= 2.0  # every core spinning: it waits out its limit
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def test_device_check_compares_every_device_and_precision_with_numpy():
    from semprobe.ray_jobs.kernel_bench import check, devices

    rows = check(sizes=(9, 30), n_perm=4)
    assert [(r["w"], r["device"], r["precision"]) for r in rows] == [
        (w, d, p) for w in (9, 30) for d in devices() for p in ("fp64", "fp32")
    ]
    assert all(r["pairs_equal"] and r["null_equal"] for r in rows)
