import io
import re

from semprobe.ray_jobs.progress import Progress


def test_plain_lines_in_logs_with_rate_and_eta(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("semprobe.ray_jobs.progress.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    p = Progress(100, "images", "extract m", stream=stream, interval=10)
    for t, n in [(5.0, 25), (12.0, 25), (20.0, 50)]:  # within the interval, after it, done
        now[0] = t
        p.update(n)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"extract m: 50/100 images \(50%\) 4\.\d images/s ETA 0:00:1\d", lines[0])
    assert lines[1].startswith("extract m: 100/100 images (100%) 5.0 images/s ETA 0:00:00")
