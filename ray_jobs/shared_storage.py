"""Storage every node sees: before a job's first write, every alive node must see the paths its workers read and
write as the driver does; a node that joins later is checked when it first touches the job's output.

On a real cluster each node has its own disks: a local ``--out`` (or the relative default, which ``ray job submit
--working-dir`` resolves inside each node's own copy of the working directory) scatters the activation store over
the nodes, and a local ``--images`` folder or word file that only the head holds makes the other nodes' work fail,
or worse, skip images as unreadable. So the job refuses to start.

What is checked, on a cluster (more than one alive node, or a driver that joined a cluster through ``RAY_ADDRESS``,
which may grow): ``--out`` (or any output root), local image sources (``--images``, ``--train``, ``--val``, a
``cifar100:DIR``), local word files (``word2vec:PATH`` ...), the checkpoint files of ``NAME:checkpoint=PATH`` models
and the training runs ``dynamics`` reads. URIs (``s3://``, ``gs://`` ...) are not checked: an object store is the same
from every node. Packaged inputs (``glove-50d``, ``sample:...``) live inside each node's installation.

How:

- A folder the job writes (an output root, a training run) gets a token: the driver writes a hidden file
  ``.semprobe-storage-<random>`` holding a random value, and a task pinned to each alive node
  (``NodeAffinitySchedulingStrategy(node, soft=False)``) reads it back. Only the same storage passes.
- An input is never written (it may be read-only, or a dataset others share): its fingerprint is compared instead,
  the size and the first 64 KiB of a file, the listing (names and file sizes) of a folder and of its first and last
  subfolder. An identical copy on every node passes too, which is all a reader needs.
- Refused: :class:`InputError` naming the node (IP and node id) and the path, and saying what works. The tokens are
  removed, and so is any folder the driver created for one: nothing is left under ``--out``.
- Passed: the tokens stay until the driver exits, and the expectations are held by a small named actor owned by
  the driver. A worker process that builds an :class:`~semprobe.ray_jobs.storage.Output` under a checked root (and
  each decode task) verifies, once per process and root, that its node sees the same token and inputs: a node the
  autoscaler added after the start check fails its first task with the same message.
- One node and a local ``ray.init``: nothing to compare, nothing is written.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from semprobe.analysis.errors import InputError

logger = logging.getLogger(__name__)

TOKEN_PREFIX = ".semprobe-storage-"  # hidden: dataset readers and globs skip it
HEAD_BYTES = 64 * 1024  # how much of a file its fingerprint reads: enough to tell files apart, cheap on any disk
ACTOR_NAME = "semprobe-shared-storage"
LOOK_TIMEOUT_S = 120  # a node whose check task has not answered by then is reported
TOKEN_PATIENCE_S = 2.0  # a token not (yet) visible is looked for again this long: some filesystems publish late
WHAT_WORKS = (
    "every node must see the same storage: use s3://, gs://, or an absolute path on a filesystem every node "
    "mounts (NFS, EFS, Filestore)"
)
_WORD_FILE_PREFIXES = ("word2vec", "glove", "fasttext", "table", "nondist")


@dataclass(frozen=True)
class Expect:
    """What every node must find at ``path``: the token file ``name`` holding ``value`` (kind ``token``), or a
    ``fingerprint`` equal to ``value``. ``role`` names the option in messages (``--out``, ``--images`` ...)."""

    path: str
    role: str
    kind: str  # token | fingerprint
    value: str
    name: str = ""


# --- what a node sees ----------------------------------------------------------------------------


def local_path(uri: str) -> str | None:
    """The absolute local path behind a path or ``file://`` URI; None for an object-store URI (``s3://``,
    ``gs://``, ...), which is the same from every node and needs no check."""
    if uri.startswith("file://"):
        return os.path.abspath(uri.removeprefix("file://"))
    return None if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def fingerprint(path: str) -> str:
    """What tells one copy of a read-only input from another, cheaply: a file's size and first 64 KiB; a folder's
    entries (names, and sizes of files) and those of its first and last subfolder (an ImageFolder's first and last
    class). ``missing`` when the path is absent; ``unreadable: ...`` when it cannot be read."""
    digest = hashlib.sha256()
    try:
        if os.path.isfile(path):
            digest.update(f"file {os.path.getsize(path)}\n".encode())
            with open(path, "rb") as f:
                digest.update(f.read(HEAD_BYTES))
        elif os.path.isdir(path):
            subfolders = _listing(path, digest)
            for sub in sorted({subfolders[0], subfolders[-1]}) if subfolders else []:
                digest.update(f"in {sub}\n".encode())
                _listing(os.path.join(path, sub), digest)
        else:
            return "missing"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return digest.hexdigest()


def _listing(folder: str, digest) -> list[str]:
    """Feed a folder's sorted entries (name and file size, or 'dir') to ``digest``; returns its subfolders' names."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(TOKEN_PREFIX):
                continue  # another job's token is no part of what the folder holds
            if entry.is_dir():
                subfolders.append(entry.name)
                digest.update(f"{entry.name} dir\n".encode())
            else:
                digest.update(f"{entry.name} {entry.stat().st_size}\n".encode())
    return subfolders


def mismatch(expect: Expect, patience: float = 0.0) -> str | None:
    """Why this node does not see ``expect`` as the driver does; None when it does. A missing token is looked
    for again for ``patience`` seconds (a filesystem that publishes new files late)."""
    if expect.kind == "token":
        token = os.path.join(expect.path, expect.name)
        deadline = time.monotonic() + patience
        while True:
            try:
                with open(token) as f:
                    seen = f.read()
                break
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    exists = os.path.isdir(expect.path)
                    return "the token the driver wrote there is missing" if exists else "the folder is missing"
                time.sleep(0.2)
            except OSError as err:
                return f"cannot read the token the driver wrote there ({err.strerror or err})"
        return None if seen == expect.value else "it holds another token there: another storage"
    seen = fingerprint(expect.path)
    if seen == expect.value:
        return None
    if seen == "missing" or seen.startswith("unreadable"):
        return f"it is {seen} there"
    return "it holds different files there"


def message(ip: str, node_id: str, expect: Expect, why: str, others: int = 0) -> str:
    """The one-line refusal: the node, the path, what is wrong, what works."""
    more = f" (and {others} more node(s))" if others else ""
    seen = f"does not see {expect.role} {expect.path} as the driver does"
    return f"node {ip} ({node_id[:8]}){more} {seen}: {why}; {WHAT_WORKS}"


def look(expects: list[Expect], patience: float = TOKEN_PATIENCE_S) -> list[tuple[int, str]]:
    """On one node: (index, why) of every expectation it does not meet."""
    return [(i, why) for i, e in enumerate(expects) if (why := mismatch(e, patience)) is not None]


# --- what the job's paths are --------------------------------------------------------------------


def job_paths(cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(outputs, inputs) of a job config as (local path, role): the folders its workers write (``out``; the
    training runs ``dynamics`` reads, written by ``train`` while it reads them; the word cache the driver fills) and
    the local inputs they read.
    Object-store URIs and packaged inputs are left out: every node sees them alike."""
    outputs, inputs = [], []

    def add(where: list, uri: Any, role: str) -> None:
        path = local_path(uri) if isinstance(uri, str) and uri else None
        if path is not None and (path, role) not in where:
            where.append((path, role))

    add(outputs, getattr(cfg, "out", None), "--out")
    for run in getattr(cfg, "runs", None) or []:
        add(outputs, run, "training run (--runs)")
    cache = getattr(cfg, "word_cache_dir", None)  # converted word files, which workers map: beside --out
    if callable(cache):
        add(outputs, cache(), "word cache (--word-cache)")
    for option in ("images", "train", "val", "data"):
        source = getattr(cfg, option, None)
        if isinstance(source, str) and not source.startswith("sample:"):
            # cifar100:DIR?split=test reads DIR; a folder or a manifest .parquet is itself
            body = source.removeprefix("cifar100:").partition("?")[0] if source.startswith("cifar100:") else source
            add(inputs, body, f"--{option}")
    words = getattr(cfg, "words", None)
    for name in [words] if isinstance(words, str) else words or []:
        prefix, colon, path = name.partition(":")
        if colon and prefix in _WORD_FILE_PREFIXES:
            add(inputs, path, f"word model file ({prefix}:)")
    models = getattr(cfg, "models", None) or [getattr(cfg, "model", None)]
    for model in models:
        if isinstance(model, str) and ":checkpoint=" in model:
            add(inputs, model.partition(":checkpoint=")[2], f"checkpoint of {model.partition(':checkpoint=')[0]}")
    return outputs, inputs


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class _Armed:
    """A root checked on every node, its expectations, and what the driver made for it (removed at exit)."""

    expects: list[Expect]
    tokens: list[str]


_LOCK = threading.Lock()  # train runs dynamics in a thread beside it: both may check at once
_ARMED: dict[str, _Armed] = {}  # root -> what was checked (driver side)


def _ray():
    import ray

    return ray


def check(cfg, log=None) -> None:
    """Before a job's first write: every alive node must see the job's output and local inputs as the driver does.

    Skipped on one node with a local ``ray.init`` (no ``RAY_ADDRESS``): there is nobody to disagree. What this
    process has checked already (the extraction inside ``run`` writes inside run's checked ``--out`` and reads the
    same inputs) is not checked again.

    Raises
    ------
    InputError
        A node does not see a path as the driver does (nothing is left under ``--out``), or a token cannot be
        written.
    """
    ray = _ray()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1 and not os.environ.get("RAY_ADDRESS"):
        logger.debug("storage check skipped: one node, started by this driver")
        return
    outputs, inputs = job_paths(cfg)
    root = local_path(cfg.out) or cfg.out
    with _LOCK:
        outputs = [(p, role) for p, role in outputs if not _covered(p)]
        seen = {(e.path, e.value) for armed in _ARMED.values() for e in armed.expects if e.kind == "fingerprint"}
        inputs = [(p, role) for p, role in inputs if (p, fingerprint(p)) not in seen]
        if not outputs and not inputs:
            return
        expects, made = _expectations(outputs, inputs)
        try:
            failures = _look_everywhere(ray, nodes, expects)
        except BaseException:
            _remove(made)
            raise
        if failures:
            _remove(made)
            (ip, node_id, expect, why), others = failures[0], len({f[1] for f in failures}) - 1
            raise InputError(message(ip, node_id, expect, why, others))
        before = _ARMED.get(root, _Armed([], []))
        _ARMED[root] = _Armed(before.expects + expects, before.tokens + made.tokens)
        _publish(ray)
    roles = ", ".join(dict.fromkeys(e.role for e in expects))
    (log or logger.info)(f"storage: {len(nodes)} node(s) see {roles} alike; nodes that join later are checked too")


def _covered(path: str) -> bool:
    """Whether ``path`` lies in a folder whose token this process wrote and still finds."""
    return any(
        e.kind == "token"
        and (path == e.path or path.startswith(e.path.rstrip("/") + "/"))
        and os.path.exists(os.path.join(e.path, e.name))
        for armed in _ARMED.values()
        for e in armed.expects
    )


@dataclass
class _Made:
    tokens: list[str]
    folders: list[str]  # created for a token, deepest last


def _expectations(outputs, inputs) -> tuple[list[Expect], _Made]:
    """Tokens written into the output folders, fingerprints of the inputs; what was created, to remove on refusal."""
    made, expects = _Made([], []), []
    try:
        for path, role in outputs:
            if not os.path.isdir(path) and role != "--out":
                inputs = [*inputs, (path, role)]  # a training run not there yet: its absence is what must agree
                continue
            if role != "--out" and not os.access(path, os.W_OK):
                inputs = [*inputs, (path, role)]  # a run we may not write: compared as an input
                continue
            missing = []
            probe = path
            while not os.path.exists(probe):
                missing.append(probe)
                probe = os.path.dirname(probe)
            for folder in reversed(missing):
                os.mkdir(folder)
                made.folders.append(folder)
            name, value = f"{TOKEN_PREFIX}{secrets.token_hex(8)}", secrets.token_hex(16)
            token = os.path.join(path, name)
            with open(token, "x") as f:
                f.write(value)
            made.tokens.append(token)
            expects.append(Expect(path, role, "token", value, name))
    except OSError as err:
        _remove(made)
        raise InputError(f"cannot write to {path}: {err.strerror or err}") from None
    expects += [Expect(path, role, "fingerprint", fingerprint(path)) for path, role in inputs]
    return expects, made


def _remove(made: _Made) -> None:
    """Delete the tokens, then the folders created for them, deepest first (only while empty)."""
    for token in made.tokens:
        try:
            os.remove(token)
        except FileNotFoundError:
            pass
    for folder in reversed(made.folders):
        try:
            os.rmdir(folder)
        except OSError:
            pass  # someone put something there meanwhile: theirs


@atexit.register
def _remove_all() -> None:
    """At the driver's exit: the tokens of every check that passed (their folders hold the job's outputs)."""
    with _LOCK:
        for armed in _ARMED.values():
            _remove(_Made(armed.tokens, []))
        _ARMED.clear()


def _look_everywhere(ray, nodes: list[dict], expects: list[Expect]) -> list[tuple[str, str, Expect, str]]:
    """Run :func:`look` on every node (pinned there); (ip, node id, expectation, why) of each miss."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(look)
    refs = {
        n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            expects
        )
        for n in nodes
    }
    failures = []
    for node in nodes:
        try:
            missed = ray.get(refs[node["NodeID"]], timeout=LOOK_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            missed = [(0, f"its check did not answer within {LOOK_TIMEOUT_S} s")] if expects else []
        except ray.exceptions.RayError:
            if any(n["NodeID"] == node["NodeID"] and n["Alive"] for n in ray.nodes()):
                raise
            continue  # the node left meanwhile: it will not run this job's work
        failures += [(node["NodeManagerAddress"], node["NodeID"], expects[i], why) for i, why in missed]
    return failures


class _Holder:
    """The named actor's state: root -> expectations, for workers on nodes that join later."""

    def __init__(self):
        self.roots: dict[str, list[Expect]] = {}

    def put(self, roots: dict[str, list[Expect]]) -> None:
        self.roots = roots

    def get(self) -> dict[str, list[Expect]]:
        return self.roots


_HOLDER = None  # (the cluster and job, the driver's handle on the named actor)


def _publish(ray) -> None:
    """Hand the checked roots to the named actor (created on first use, owned by the driver: it goes with it). It
    lives on the driver's node, which a job cannot lose and go on: not on a worker node the autoscaler may remove."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    global _HOLDER
    context = ray.get_runtime_context()
    job = (context.gcs_address, context.get_job_id())
    if _HOLDER is None or _HOLDER[0] != job:  # one actor per driver and cluster
        here = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False)
        holder = ray.remote(num_cpus=0)(_Holder).options(name=ACTOR_NAME, scheduling_strategy=here)
        _HOLDER = (job, holder.remote())  # kept: an actor whose owner drops its handle is destroyed, named or not
    ray.get(_HOLDER[1].put.remote({root: armed.expects for root, armed in _ARMED.items()}))


# --- a worker ------------------------------------------------------------------------------------

_VERIFIED: set[str] = set()  # roots (as given) this worker process has verified, or found nothing to verify for


def verify_node(uri: str) -> None:
    """In a Ray worker: does this node see the checked root that ``uri`` lies in as the driver did? Once per process
    and ``uri``; nothing on the driver, outside Ray, or when no check is in force.

    Raises
    ------
    InputError
        This node (one that joined after the start check) does not see it: the same one-line message.
    """
    if uri in _VERIFIED:
        return
    ray = sys.modules.get("ray")  # not imported: not a Ray worker, and nothing to import for it
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return
    try:
        holder = ray.get_actor(ACTOR_NAME)
    except ValueError:
        _VERIFIED.add(uri)  # no check in force: one node, or a local ray.init
        return
    try:
        roots = ray.get(holder.get.remote())
    except ray.exceptions.RayActorError:
        logger.warning("storage check: the driver's node is gone; this node is not checked")
        return
    verify(uri, roots, ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())
    _VERIFIED.add(uri)


def verify(uri: str, roots: dict[str, list[Expect]], ip: str, node_id: str) -> None:
    """Raise the start check's :class:`InputError` if this node misses an expectation of a root ``uri`` lies in."""
    path = local_path(uri) or uri
    for root, expects in roots.items():
        if path == root or path.startswith(root.rstrip("/") + "/"):
            for i, why in look(expects):
                raise InputError(message(ip, node_id, expects[i], why))
