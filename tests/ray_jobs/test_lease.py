"""One driver per --out: the lease file, taken by real processes, refused, expired, taken over, released."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs import lease
from semprobe.ray_jobs.cli import main

# A driver in a process of its own: takes the lease on argv[1], says so, holds it until its stdin closes.
# argv[2], when given, is the host it claims to run on (a node elsewhere, whose pids mean nothing here).
HOLDER = textwrap.dedent(
    """
    import sys
    from semprobe.ray_jobs import lease
    if len(sys.argv) > 2:
        lease._this_machine = lambda: {"host": sys.argv[2], "boot_id": "b", "pid_namespace": "p"}
    held = lease.acquire(sys.argv[1])
    print("held", held.token, flush=True)
    sys.stdin.read()
    held.release()
    """
)


def _holder(out: Path, *host: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), *host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline().split()
    assert line[:1] == ["held"], line
    return proc, line[1]


def _record(out: Path) -> dict:
    return json.loads((out / lease.LEASE_FILE).read_text())


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_second_driver_is_refused_with_code_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    proc, token = _holder(out)
    try:
        record = _record(out)
        assert (record["token"], record["pid"], record["host"]) == (token, proc.pid, socket.gethostname())
        assert main(["extract", "--images", "sample:imagenet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["since"]))
        assert f"{out} is in use by another driver: {socket.gethostname()} pid {proc.pid}, since {since} UTC" in err
        assert "last heartbeat" in err and "choose another --out" in err and err.count("\n") == 1
        assert _record(out)["token"] == token, "the holder's lease is untouched"
        assert sorted(p.name for p in out.iterdir()) == [lease.LEASE_FILE], "the refused job wrote nothing"
    finally:
        proc.stdin.close()  # the holder finishes: it releases the lease
        assert proc.wait(timeout=30) == 0
    assert not (out / lease.LEASE_FILE).exists()


def test_the_heartbeat_renews_the_lease_while_it_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT", 0.05)
    with lease.hold(str(tmp_path / "out")) as held:
        first = _record(tmp_path / "out")
        time.sleep(0.5)
        later = _record(tmp_path / "out")
        assert later["token"] == first["token"] == held.token and later["since"] == first["since"]
        assert later["heartbeat"] - first["heartbeat"] >= 0.3
    assert not (tmp_path / "out").exists(), "the folder the lease made, left empty, is removed"


def test_a_holder_that_died_elsewhere_is_taken_over_after_the_expiry(tmp_path, monkeypatch):
    """A node that died (its pid means nothing here): its lease stands until its heartbeat is EXPIRY old."""
    monkeypatch.setattr(lease, "EXPIRY", 1.5)
    out = tmp_path / "out"
    proc, token = _holder(out, "node-b")
    _kill(proc)
    with pytest.raises(InputError, match=rf"in use by another driver: node-b pid {proc.pid}, since "):
        lease.acquire(str(out))
    assert _record(out)["token"] == token
    time.sleep(max(0.0, _record(out)["heartbeat"] + lease.EXPIRY + 0.1 - time.time()))
    with lease.hold(str(out)) as held:
        assert _record(out)["token"] == held.token != token and _record(out)["pid"] == os.getpid()
    assert not (out / lease.LEASE_FILE).exists()


def test_a_holder_that_died_on_this_machine_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    proc, token = _holder(out)
    assert lease.EXPIRY == 30  # the default: the takeover below does not wait for it
    _kill(proc)
    began = time.monotonic()
    with lease.hold(str(out)) as held:
        assert _record(out)["token"] == held.token != token
    assert time.monotonic() - began < 5


def test_the_lease_is_reentrant_within_a_process_and_released_by_the_last_hold(tmp_path):
    out = tmp_path / "a" / "b"
    first = lease.acquire(str(out))
    second = lease.acquire(str(out))
    assert first is second and first.holds == 2
    first.release()
    assert _record(out)["token"] == first.token
    second.release()
    assert not (tmp_path / "a").exists(), "every folder the lease made is removed"


def test_a_finished_or_failed_job_releases_its_lease(tmp_path):
    seen = []

    @lease.holding_lease
    def job(cfg, fail=False):
        seen.append(_record(Path(cfg.out))["pid"])
        (Path(cfg.out) / "result").write_text("x")
        if fail:
            raise InputError("bad input")
        return "done"

    class Cfg:
        out = str(tmp_path / "out")

    assert job(Cfg()) == "done" and seen == [os.getpid()]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result"]
    with pytest.raises(InputError):
        job(Cfg(), fail=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result"]


@pytest.mark.parametrize("start", ["free", "stale"])
def test_of_drivers_taking_one_lease_at_once_exactly_one_wins(tmp_path, start):
    """Four processes released together on a free lease, or on one whose holder died: one holds it."""
    out, go = tmp_path / "out", tmp_path / "go"
    if start == "stale":
        out.mkdir()
        (out / lease.LEASE_FILE).write_text(json.dumps({"token": "dead", "host": "node-c", "pid": 1, "heartbeat": 0}))
    racer = textwrap.dedent(
        f"""
        import os, sys, time
        from semprobe.analysis.errors import InputError
        from semprobe.ray_jobs import lease
        open(os.path.join({str(tmp_path)!r}, f"ready-{{os.getpid()}}"), "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        try:
            held = lease.acquire({str(out)!r})
        except InputError:
            print("refused", flush=True)
        else:
            print("won", held.token, flush=True)
            until = time.monotonic() + 60
            while not os.path.exists({str(go)!r} + ".done") and time.monotonic() < until:
                time.sleep(0.01)  # held until the others have tried and left (a minute at most)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", racer], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 4:  # all four started and waiting
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer did not start"
        time.sleep(0.05)
    go.touch()
    while sum(p.poll() is not None for p in procs) < 3:  # the three refused ones have left (a winner waits)
        assert time.monotonic() < deadline, "more than one racer holds the lease"
        time.sleep(0.01)
    go.with_name("go.done").touch()
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    winners = [r for r in results if r[:1] == ["won"]]
    assert len(winners) == 1 and sum(r == ["refused"] for r in results) == 3, results
    assert not (out / lease.LEASE_FILE).exists(), "released when the winner exited"
    assert not out.exists() or list(out.iterdir()) == [], "no temporary left behind"


def test_a_lease_on_an_object_store_path_is_refused_taken_over_and_released(tmp_path, monkeypatch):
    """s3:// and gs:// go through pyarrow.fs without create-if-absent: here a SubTreeFileSystem takes that path."""
    monkeypatch.setattr(lease, "SETTLE", 0.0)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    other = {"token": "theirs", "host": "node-d", "pid": 7, "since": time.time(), "heartbeat": time.time()}
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / lease.LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(InputError, match="bucket is in use by another driver: node-d pid 7, since "):
        lease.acquire("bucket", fs)
    other["heartbeat"] -= lease.EXPIRY + 1
    (tmp_path / "bucket" / lease.LEASE_FILE).write_text(json.dumps(other))
    with lease.hold("bucket", fs) as held:
        assert _record(tmp_path / "bucket")["token"] == held.token
    assert list((tmp_path / "bucket").iterdir()) == []


def test_a_holder_that_lost_its_lease_says_so(tmp_path, monkeypatch, capsys):
    """A driver paused past the expiry finds another's lease at its next heartbeat: it warns, and does not
    overwrite the new holder's record."""
    monkeypatch.setattr(lease, "HEARTBEAT", 0.05)
    out = tmp_path / "out"
    held = lease.acquire(str(out))
    taker = {"token": "new", "host": "node-e", "pid": 9, "since": time.time(), "heartbeat": time.time()}
    (out / lease.LEASE_FILE).write_text(json.dumps(taker))
    deadline = time.monotonic() + 5
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost["token"] == "new"
    assert f"lost the lease on {out} to node-e pid 9" in capsys.readouterr().err
    held.release()
    assert _record(out) == taker, "the new holder's lease stays"
