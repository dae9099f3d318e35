"""The papers' finding on real ImageNet images: semantics emerge with depth (skips without the dev images)."""

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from semprobe.ray_jobs.config import RunConfig
from semprobe.ray_jobs.run import run


def test_efficientnet_lite0_against_glove_rises_through_the_blocks(ray_session, shared_sample, tmp_path):
    cfg = RunConfig(images=str(shared_sample), out=str(tmp_path / "out"), permutations=200).validate()
    run(cfg, log=lambda m: None)
    rows = sorted(
        pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist(),
        key=lambda r: r["layer_index"],
    )
    acc = np.array([r["accuracy"] for r in rows])
    assert rows[0]["n_concepts"] > 150  # one image for each of several hundred classes, about 2/3 with a GloVe word
    assert spearmanr(np.arange(len(acc)), acc).statistic > 0.9  # rising, layer after layer
    assert acc[-4:].mean() - acc[:2].mean() > 0.15  # clearly, not within the null's scatter
    assert acc[0] > 0.5  # early layers already carry low-level signal
    assert all(r["significant"] for r in rows[-8:])  # and the deep half survives BHY
