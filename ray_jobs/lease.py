"""One driver per output folder: ``OUT/.lease.json``, a lease with a heartbeat.

Two drivers writing one ``--out`` would not corrupt it (every file is published whole and the results are
deterministic), but they would do the work twice, race each other's sweeps of temporaries, and leave a
person unsure which run wrote what. So every job takes a lease on its output folder before it reads or writes
anything there, renews it every :data:`HEARTBEAT` seconds from a daemon thread, and releases it (deletes the
file) when it returns or fails. A second driver that finds a live lease stops with an
:class:`~semprobe.analysis.errors.InputError` (exit code 2) naming the holder: host, pid, Ray job, since when.

A lease is live while its heartbeat is younger than :data:`EXPIRY` seconds; an older one belonged to a driver
that died (kill -9, a lost node) and is taken over. A holder that is a process of this very machine (same host,
kernel boot and pid namespace) and no longer runs is taken over at once: a driver killed and rerun on the same
machine, the common case, does not wait out the expiry. A holder elsewhere is judged by its heartbeat alone (the
clocks of the nodes must agree to within a few seconds, as NTP keeps them).

How the lease is taken atomically:

- local paths (and shared filesystems mounted at one: NFS, EFS, Filestore): the record is written under a unique
  temporary name and hard-linked to ``.lease.json``; ``link(2)`` fails when the name exists, also over NFS, so of
  two drivers exactly one wins. Where links are unsupported, ``open(O_CREAT | O_EXCL)``. A dead holder's lease
  is replaced under a second such file, ``.lease.json.takeover``, so that one driver at a time takes it over.
- ``s3://``, ``gs://``: ``pyarrow.fs`` offers no create-if-absent, so the driver checks, writes its record, waits
  :data:`SETTLE` seconds and reads it back: the last writer wins and the other sees it lost. Two drivers started
  within that window of each other can both pass; the check then rests on the heartbeat, which reports the loss.

The lease is re-entrant within a process: a job that runs another job on the same folder holds it once.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.storage import Output

LEASE_FILE = ".lease.json"
HEARTBEAT = 5.0  # seconds between renewals
EXPIRY = 30.0  # seconds without a heartbeat after which a lease is the dead holder's, and taken over
SETTLE = 1.0  # object stores: seconds between writing a lease and reading it back
TAKE_TIMEOUT = 10.0  # seconds to keep trying while other drivers take the lease at the same moment

_held: dict[str, Lease] = {}  # lease path -> the lease this process holds there
_held_lock = threading.Lock()


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def _this_machine() -> dict[str, Any]:
    """What makes a pid meaningful: the host, the kernel's boot and the pid namespace (containers that share a
    host name have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
    }


def _ray_job() -> str | None:
    """The submission id of the Ray job this driver runs as (``ray job submit`` passes it in the job config)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_gone(pid: int) -> bool:
    """Whether no process of this pid runs here (a zombie, killed but not yet reaped, runs no more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's process
    state = _read_first_line(f"/proc/{pid}/stat")
    return bool(state) and state.rpartition(")")[2].split()[:1] == ["Z"]


def holder(record: dict[str, Any]) -> str:
    """A lease's holder in words: host, pid, Ray job, since when."""
    job = f", Ray job {record['job_id']}" if record.get("job_id") else ""
    since = _utc(record["since"]) if isinstance(record.get("since"), (int, float)) else "an unknown time"
    return f"{record.get('host', '?')} pid {record.get('pid', '?')}{job}, since {since}"


class Lease:
    """A lease this process holds on an output folder; :meth:`release` gives it back."""

    def __init__(self, output: Output):
        self.output, self.path = output, output.path(LEASE_FILE)
        self.token, self.since = uuid.uuid4().hex, time.time()
        self.holds, self.lost = 0, None  # re-entrant holds; the record of whoever took the lease from us
        self._created: list[str] = []  # folders the lease made, removed on release when left empty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the record -------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "token": self.token,
            **_this_machine(),
            "pid": os.getpid(),
            "job_id": _ray_job(),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
            "since": self.since,
            "since_utc": _utc(self.since),
            "heartbeat": now,
            "heartbeat_utc": _utc(now),
        }

    def _encode(self) -> bytes:
        return json.dumps(self.record(), indent=2, sort_keys=True).encode() + b"\n"

    def read(self) -> tuple[bytes, dict[str, Any]] | None:
        """The lease file as it is (bytes and record), None when there is none. A record being written (the
        exclusive-create fallback) or unreadable counts as live, with the file's modification time as heartbeat."""
        try:
            with self.output.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("heartbeat"), (int, float)):
                raise ValueError("not a lease")
        except ValueError:
            info = self.output.fs.get_file_info(self.path)
            mtime = info.mtime.timestamp() if info.mtime else time.time()
            record = {"heartbeat": mtime, "host": "an unknown host (unreadable lease)"}
        return raw, record

    def stale(self, record: dict[str, Any]) -> bool:
        """Whether a lease's holder is gone: no heartbeat for EXPIRY seconds, or a process of this machine that
        no longer runs (or this very process, which holds no lease there)."""
        if time.time() - record["heartbeat"] > EXPIRY:
            return True
        here = _this_machine()
        if any(record.get(k) != v or v is None for k, v in here.items()) or not isinstance(record.get("pid"), int):
            return False
        if record["pid"] == os.getpid():
            return record.get("token") != self.token
        return _process_gone(record["pid"])

    # taking, renewing, releasing --------------------------------------------------------------------------
    def _make_folder(self) -> None:
        if not self.output._local:
            self.output.fs.create_dir(self.output.root, recursive=True)
            return
        missing, folder = [], self.output.root
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            missing.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(self.output.root, exist_ok=True)
        self._created = missing  # deepest first

    def _exclusive(self, path: str, data: bytes) -> bool:
        """Create a local file whole unless the name exists; whether we did."""
        tmp = f"{path}.{self.token}.new"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.unlink(tmp)

    def _create(self) -> bool:
        """Write our record under the lease's name unless one is there; whether we did."""
        if self.output._local:
            return self._exclusive(self.path, self._encode())
        if self.output.exists(LEASE_FILE):
            return False
        with self.output.fs.open_output_stream(self.path) as f:
            f.write(self._encode())
        time.sleep(SETTLE)
        current = self.read()
        return current is not None and current[1].get("token") == self.token

    def _take_over(self, raw: bytes) -> bool:
        """Replace a dead holder's lease (``raw``, as read) with ours; whether we did. Locally one driver at a
        time does so, under ``.lease.json.takeover`` (created exclusively), and only while the lease is still
        the dead one: of several drivers taking over at once one wins, the others find its live lease."""
        if not self.output._local:
            with contextlib.suppress(FileNotFoundError):
                self.output.fs.delete_file(self.path)
            return self._create()
        lock = f"{self.path}.takeover"
        if not self._exclusive(lock, self.token.encode()):
            with contextlib.suppress(OSError):
                if time.time() - os.stat(lock).st_mtime > EXPIRY:  # a driver that died while taking over
                    os.unlink(lock)
            time.sleep(0.05)
            return False
        try:
            try:
                with open(self.path, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                current = None
            if current is not None and current != raw:
                return False  # renewed, or taken over by another driver before us
            if current is not None:
                os.unlink(self.path)
            return self._create()
        finally:
            os.unlink(lock)

    def take(self) -> None:
        """Take the lease, or raise InputError naming its live holder."""
        self._make_folder()
        deadline = time.monotonic() + TAKE_TIMEOUT
        while True:
            try:
                if self._create():
                    break
                current = self.read()
                if current is None:
                    continue  # released between our attempt and the read
                raw, record = current
                if not self.stale(record):
                    self._remove_created()
                    age = time.time() - record["heartbeat"]
                    raise InputError(
                        f"{self.output.uri} is in use by another driver: {holder(record)} (last heartbeat {age:.0f} "
                        f"s ago); wait for it to finish or stop it (a driver that died leaves its lease for "
                        f"{EXPIRY:g} s, then a rerun takes it over), or choose another --out"
                    )
                if self._take_over(raw):
                    break
            except FileNotFoundError:  # a driver that just released the lease removed the folder it had made
                self._make_folder()
            if time.monotonic() > deadline:
                self._remove_created()
                raise InputError(f"could not take the lease {self.path}: other drivers keep taking it; retry")
        self._thread = threading.Thread(target=self._beat, name=f"semprobe-lease {self.output.uri}", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        data = self._encode()
        if not self.output._local:
            with self.output.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        tmp = f"{self.path}.{self.token}.new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)  # readers see the old record or the new one, never half of one

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                current = self.read()
                if current is None or current[1].get("token") != self.token:
                    self.lost = current[1] if current else {}
                    print(
                        f"semprobe: warning: lost the lease on {self.output.uri}"
                        + (f" to {holder(self.lost)}" if self.lost else " (its file was deleted)")
                        + f": this driver went {EXPIRY:g} s without a heartbeat; stop one of the two drivers",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                self._write()
            except OSError as err:  # storage hiccup: try again next beat; EXPIRY allows several misses
                print(f"semprobe: warning: lease heartbeat on {self.path} failed: {err}", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Give back one hold; the last deletes the lease file (if it is still ours)."""
        with _held_lock:
            self.holds -= 1
            if self.holds > 0:
                return
            _held.pop(self.path, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            current = self.read()
            if current is not None and current[1].get("token") == self.token:
                self.output.fs.delete_file(self.path)
        self._remove_created()

    def _remove_created(self) -> None:
        """Folders the lease made, if nothing else was written there (a refused job leaves no trace)."""
        for folder in self._created:
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []


def acquire(out: str, fs: pafs.FileSystem | None = None) -> Lease:
    """Take (or, held by this process already, hold once more) the lease on an output folder."""
    output = Output(out, fs)
    path = output.path(LEASE_FILE)
    with _held_lock:
        lease = _held.get(path)
        if lease is not None and lease.lost is None:
            lease.holds += 1
            return lease
        lease = Lease(output)
        lease.take()
        lease.holds = 1
        _held[path] = lease
        return lease


@contextlib.contextmanager
def hold(out: str, fs: pafs.FileSystem | None = None):
    """The lease on ``out`` for the duration of a ``with`` block."""
    lease = acquire(out, fs)
    try:
        yield lease
    finally:
        lease.release()


def holding_lease(runner: Callable) -> Callable:
    """A job runner (``runner(cfg, ...)``) that holds the lease on ``cfg.out`` while it runs."""

    @functools.wraps(runner)
    def run(cfg, *args, **kwargs):
        with hold(cfg.out):
            return runner(cfg, *args, **kwargs)

    return run


@atexit.register
def _release_all() -> None:
    """A driver that exits (SystemExit, the end of the interpreter) gives back what it holds."""
    for lease in list(_held.values()):
        lease.holds = 1
        lease.release()
