"""The README's "From Python" snippet runs as written, and prints what the test computes by hand."""

import re
from pathlib import Path

import numpy as np

from semprobe.analysis.twovtwo import permutations, two_vs_two

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_from_python_snippet_runs_and_scores_as_the_test_by_hand(capsys):
    namespace = {}
    exec(compile(snippet(), str(README), "exec"), namespace)
    assert "semantic" in capsys.readouterr().out
    scores, features, words = namespace["scores"], namespace["features"], namespace["words"]
    assert scores["layer"].to_list() == ["noise", "semantic"]
    c_word = np.corrcoef(np.asarray(words, np.float64))
    w = len(c_word)
    for row in scores.iter_rows(named=True):
        c_img = np.corrcoef(features[row["layer"]])
        accuracy = two_vs_two(c_img, c_word).accuracy
        null = np.array([two_vs_two(c_img, c_word[p][:, p]).accuracy for p in permutations(w, 1000, 0)])
        assert row["accuracy"] == accuracy
        assert row["p_value"] == (1 + np.sum(null >= accuracy - 1e-12)) / 1001
    assert scores["significant"].to_list() == [False, True]  # the noisy view of the words, and only it
