"""Storage every node sees (ray_jobs/shared_storage.py): the fingerprints and tokens a node compares, the paths a
job's config names, and, on a real loopback cluster whose second node sees an empty tmpfs where the head sees a
folder (``unshare --mount``), the refusals (exit code 2, nothing written), the pass, and a node that joins late."""

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import free_ports

import semprobe
from semprobe.analysis.errors import InputError
from semprobe.ray_jobs import shared_storage
from semprobe.ray_jobs.config import AffineConfig, DynamicsConfig, RunConfig, TrainConfig
from semprobe.ray_jobs.shared_storage import Expect, fingerprint, job_paths, mismatch, verify

# --- fingerprints and tokens (no Ray) --------------------------------------------------------------


def naive_fingerprint(path: Path) -> str:
    """The reference: a file's size and first 64 KiB; a folder's sorted entries with file sizes, then the same of its
    first and last subfolder."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(f"file {path.stat().st_size}\n".encode() + path.read_bytes()[: 64 * 1024])
        return h.hexdigest()

    def listing(folder: Path) -> list[str]:
        subs = []
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.startswith(".semprobe-storage-"):
                continue
            if entry.is_dir():
                subs.append(entry.name)
                h.update(f"{entry.name} dir\n".encode())
            else:
                h.update(f"{entry.name} {entry.stat().st_size}\n".encode())
        return subs

    subs = listing(path)
    for sub in sorted({subs[0], subs[-1]}) if subs else []:
        h.update(f"in {sub}\n".encode())
        listing(path / sub)
    return h.hexdigest()


def image_folder(root: Path) -> Path:
    for cls, n in (("n01440764", 3), ("n01443537", 2), ("n01484850", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    return root


def test_fingerprint_of_a_file_is_its_size_and_first_64_kib(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"x" * 70_000 + b"1")
    b.write_bytes(b"x" * 70_000 + b"2")  # differs only past the first 64 KiB: the same fingerprint, by design
    c.write_bytes(b"y" + b"x" * 70_000)
    assert fingerprint(str(a)) == naive_fingerprint(a) == fingerprint(str(b))
    assert fingerprint(str(c)) == naive_fingerprint(c) != fingerprint(str(a))
    assert fingerprint(str(tmp_path / "absent")) == "missing"


def test_fingerprint_of_a_folder_is_its_listing_and_its_first_and_last_subfolders(tmp_path):
    folder = image_folder(tmp_path / "images")
    before = fingerprint(str(folder))
    assert before == naive_fingerprint(folder)
    (folder / ".semprobe-storage-0123456789abcdef").write_text("token")  # a job's token is not content
    assert fingerprint(str(folder)) == before
    (folder / "n01484850" / "1.jpg").write_bytes(b"z")  # a file in the last class
    assert fingerprint(str(folder)) == naive_fingerprint(folder) != before
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # an identical copy passes: a reader cannot tell, and needs not
    assert fingerprint(str(copy)) == fingerprint(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fingerprint(str(empty)) == hashlib.sha256().hexdigest() != before


def test_mismatch_says_what_this_node_sees(tmp_path):
    (tmp_path / ".semprobe-storage-aa").write_text("v1")
    token = Expect(str(tmp_path), "--out", "token", "v1", ".semprobe-storage-aa")
    assert mismatch(token) is None
    assert mismatch(Expect(str(tmp_path), "--out", "token", "v2", ".semprobe-storage-aa")) == (
        "it holds another token there: another storage"
    )
    assert mismatch(Expect(str(tmp_path), "--out", "token", "v1", ".semprobe-storage-bb")) == (
        "the token the driver wrote there is missing"
    )
    assert mismatch(Expect(str(tmp_path / "no"), "--out", "token", "v1", ".semprobe-storage-aa")) == (
        "the folder is missing"
    )
    words = tmp_path / "w.txt"
    words.write_text("cat 1 2\n")
    seen = Expect(str(words), "word model file (glove:)", "fingerprint", naive_fingerprint(words))
    assert mismatch(seen) is None
    words.write_text("cat 1 3\n")
    assert mismatch(seen) == "it holds different files there"
    words.unlink()
    assert mismatch(seen) == "it is missing there"


def test_a_refused_token_leaves_nothing_and_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    inputs = image_folder(tmp_path / "images")
    expects, made = shared_storage._expectations([(str(out), "--out")], [(str(inputs), "--images")])
    (token,) = made.tokens
    assert Path(token).parent == out and Path(token).name.startswith(".semprobe-storage-")
    assert expects[0] == Expect(str(out), "--out", "token", Path(token).read_text(), Path(token).name)
    assert len(expects[0].value) == 32 and expects[1] == Expect(
        str(inputs), "--images", "fingerprint", naive_fingerprint(inputs)
    )
    assert made.folders == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(out)]
    shared_storage._remove(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # a/ was made for the token: gone
    # an existing --out keeps what it held, and only that
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    _, made = shared_storage._expectations([(str(out), "--out")], [])
    assert made.folders == [] and len(list(out.iterdir())) == 2
    shared_storage._remove(made)
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_an_unwritable_output_is_refused_and_cleaned_up(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(InputError, match=rf"^cannot write to {blocked}/out: "):
        shared_storage._expectations([(str(blocked / "out"), "--out")], [])


def test_job_paths_names_every_local_path_workers_read_or_write(tmp_path):
    run = RunConfig(
        out=str(tmp_path / "out"),
        images=str(tmp_path / "images"),
        words=["glove-50d", f"word2vec:{tmp_path}/w.bin", "table:s3://bucket/t.parquet", f"table:file://{tmp_path}/t"],
        models=["efficientnet_lite0", f"timm:resnet18:checkpoint={tmp_path}/r18.pt"],
    ).validate()
    outputs, inputs = job_paths(run)
    cache = "word cache (--word-cache)"  # converted word files, beside --out by default
    assert outputs == [(str(tmp_path / "out"), "--out"), (str(tmp_path / ".semprobe-words"), cache)]
    assert inputs == [
        (str(tmp_path / "images"), "--images"),
        (f"{tmp_path}/w.bin", "word model file (word2vec:)"),
        (f"{tmp_path}/t", "word model file (table:)"),
        (f"{tmp_path}/r18.pt", "checkpoint of timm:resnet18"),
    ]
    # object stores and packaged inputs: nothing to check
    remote = RunConfig(out="s3://bucket/runs/x", images="gs://bucket/val").validate()
    assert job_paths(remote) == ([], [])
    assert job_paths(RunConfig(out="gs://b/x").validate()) == ([], [])  # sample:imagenet, glove-50d
    # the relative default resolves on the driver, which is what a node elsewhere cannot see
    assert job_paths(RunConfig().validate())[0] == [
        (os.path.abspath(f"runs/{RunConfig().experiment_id()}"), "--out"),
        (os.path.abspath("runs/.semprobe-words"), cache),
    ]
    dynamics = DynamicsConfig(
        runs=[str(tmp_path / "r1"), str(tmp_path / "r2")], images=f"cifar100:{tmp_path}/c?split=test"
    )
    assert job_paths(dynamics.validate()) == (
        [
            (str(dynamics.out), "--out"),
            (f"{tmp_path}/r1", "training run (--runs)"),
            (f"{tmp_path}/r2", "training run (--runs)"),
            (os.path.abspath("runs/.semprobe-words"), cache),
        ],
        [(f"{tmp_path}/c", "--images")],
    )
    train = TrainConfig(data=f"cifar100:{tmp_path}/cifar", out=str(tmp_path / "t")).validate()
    assert job_paths(train) == ([(str(tmp_path / "t"), "--out")], [(f"{tmp_path}/cifar", "--data")])
    # a config with a word cache (converted word files beside --out, which workers map): written, so a token
    cached = types.SimpleNamespace(out=str(tmp_path / "o"), word_cache_dir=lambda: str(tmp_path / ".words"))
    assert job_paths(cached) == (
        [(str(tmp_path / "o"), "--out"), (str(tmp_path / ".words"), cache)],
        [],
    )
    assert job_paths(types.SimpleNamespace(out="s3://b/o", word_cache_dir=lambda: None)) == ([], [])
    affine = AffineConfig(train=str(tmp_path / "tr"), val="sample:imagenet", out=str(tmp_path / "aff")).validate()
    assert job_paths(affine) == ([(str(tmp_path / "aff"), "--out")], [(str(tmp_path / "tr"), "--train")])


def test_a_worker_verifies_the_root_its_output_lies_in(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".semprobe-storage-aa").write_text("v")
    words = tmp_path / "w.txt"
    words.write_text("cat 1 2\n")
    roots = {
        str(out): [
            Expect(str(out), "--out", "token", "v", ".semprobe-storage-aa"),
            Expect(str(words), "word model file (glove:)", "fingerprint", naive_fingerprint(words)),
        ]
    }
    verify(str(out / "extract" / "m"), roots, "10.0.0.7", "f00dfeed" + "0" * 48)  # sees it all: passes
    verify(str(tmp_path / "elsewhere"), {str(out): [Expect(str(out), "--out", "token", "x", "y")]}, "ip", "n" * 56)
    words.write_text("cat 9 9\n")
    with pytest.raises(InputError) as err:
        verify(f"file://{out}", roots, "10.0.0.7", "f00dfeed" + "0" * 48)
    assert str(err.value) == (
        f"node 10.0.0.7 (f00dfeed) does not see word model file (glove:) {words} as the driver does: it holds "
        "different files there; every node must see the same storage: use s3://, gs://, or an absolute path on a "
        "filesystem every node mounts (NFS, EFS, Filestore)"
    )


def test_outside_ray_and_on_one_node_nothing_is_checked(tmp_path, monkeypatch):
    shared_storage.verify_node(str(tmp_path / "never-there"))  # no Ray here: no check, no error

    class OneNode:
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "127.0.0.1"}]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(shared_storage, "_ray", lambda: OneNode)
    shared_storage.check(RunConfig(out=str(tmp_path / "out")).validate())
    assert not (tmp_path / "out").exists()


# --- a real cluster whose nodes do not share a folder ----------------------------------------------

PACKAGE_PARENT = Path(semprobe.__file__).parent.parent
RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = r"""
import contextlib, io, json, os, sys, time
import ray
from semprobe.ray_jobs.cli import main
from semprobe.analysis.errors import InputError
from semprobe.ray_jobs import shared_storage
from semprobe.ray_jobs.config import ExtractConfig
from semprobe.ray_jobs.storage import Output
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, base = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
while True:  # the head may still be coming up
    try:
        ray.init(address=address)
        break
    except (ConnectionError, RuntimeError):
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
while not any(n["Alive"] and "private_node" in n["Resources"] for n in ray.nodes()):
    time.sleep(0.5)

def say(**kw):
    print(json.dumps(kw), flush=True)

def node(resource, key="NodeID"):
    return next(n[key] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])

def attempt(**options):
    try:
        shared_storage.check(ExtractConfig(**options).validate(), log=lambda m: None)
        return "ok"
    except InputError as err:
        return str(err)

say(private=node("private_node"), ip=node("private_node", "NodeManagerAddress"))
# the CLI as a user types it, a relative --out from a folder the private node does not see
os.chdir(f"{base}/private/cwd")
errors = io.StringIO()
with contextlib.redirect_stderr(errors):
    code = main(["extract", "--out", "runs/x", "--images", "sample:imagenet?range=0:2"])
say(cli=[code, errors.getvalue()])
say(local_out=attempt(out=f"{base}/private/out"))
say(local_images=attempt(out=f"{base}/shared/out1", images=f"{base}/private/images"))
say(local_words=attempt(out=f"{base}/shared/out2", words=[f"glove:{base}/private/words.txt"]))
say(shared=attempt(out=f"{base}/shared/out", images=f"{base}/shared/images", words=[f"glove:{base}/shared/words.txt"]))
say(late_armed=attempt(out=f"{base}/late/out"))
sys.stdin.readline()  # the test starts the late node now
while not any(n["Alive"] and "late_node" in n["Resources"] for n in ray.nodes()):
    time.sleep(0.5)

@ray.remote(num_cpus=0)
def touch(uri):
    try:
        Output(uri)
        return "ok"
    except InputError as err:
        return str(err)

def on(resource, uri):
    strategy = NodeAffinitySchedulingStrategy(node(resource), soft=False)
    return ray.get(touch.options(scheduling_strategy=strategy).remote(uri))

say(late=node("late_node"), late_ip=node("late_node", "NodeManagerAddress"),
    late_touch=on("late_node", f"{base}/late/out/extract"), late_elsewhere=on("late_node", f"{base}/shared/out"),
    private_touch=on("private_node", f"{base}/late/out"))
"""


def _node_args(temp: str, resource: str | None = None) -> list[str]:
    agent, agent_grpc, env_agent, metrics = free_ports(4)
    return [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--temp-dir={temp}",
        *([f"--resources={json.dumps({resource: 1})}"] if resource else []),
    ]


class Nodes:
    """Ray nodes started here, each `ray start --block` in a session of its own: stopped by process group."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.cmds: list[list[str]] = []
        self.restarts = 0
        self.env = {
            **os.environ,
            "RAY_ADDRESS": "",
            "RAY_AUTH_MODE": "token",  # the head's default; a driver joining by address must say so too
            "RAY_agent_register_timeout_ms": "180000",  # a loaded test machine starts a node's agent slowly
            # stop() stops a node at once: by default SIGTERM first drains it for up to 30 s (for Ray Serve's proxies)
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # the semprobe this test imports, for the nodes' workers and the drivers
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }

    def start(self, args: list[str], hidden: Path | None = None) -> None:
        if hidden is not None:  # a mount namespace of its own in which `hidden` is an empty tmpfs
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs tmpfs "{hidden}" && exec "$0" "$@"', RAY, "start", *args]  # fmt: skip
        else:
            cmd = [RAY, "start", *args]
        self.cmds.append(cmd)
        self.procs.append(self._popen(cmd))

    def _popen(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            cmd, env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def revive(self) -> None:
        """Start again a worker node whose raylet gave up (on a loaded machine its agent may start too slowly):
        `ray start --block` exits when one of its processes dies."""
        for i, proc in enumerate(self.procs[1:], 1):
            if proc.poll() is not None and self.restarts < 3:
                self.restarts += 1
                if _group_alive(proc.pid):
                    os.killpg(proc.pid, signal.SIGKILL)  # what is left of the failed node
                self.procs[i] = self._popen(self.cmds[i])

    def stop(self) -> None:
        for proc in reversed(self.procs):  # `ray start --block` stops what it started on SIGTERM
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of this node's process group
            except ProcessLookupError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")  # the driver closed its stdout


def _said(lines: queue.Queue, log: Path, nodes: Nodes, timeout: float = 180) -> dict:
    """The driver's next JSON line (Ray may print on stdout too); fails, never hangs, when it has nothing to say."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            nodes.revive()
            if time.monotonic() < deadline:
                continue
            line = ""
        assert line, f"the driver said nothing more: {log.read_text()[-3000:]}"
        if line.startswith("{"):
            return json.loads(line)


@pytest.mark.ray
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare --mount")
def test_paths_a_node_does_not_see_are_refused_and_a_late_node_is_checked(tmp_path):
    base = tmp_path
    for name in ("private", "shared", "late"):
        (base / name).mkdir()
    for where in ("private", "shared"):
        image_folder(base / where / "images")
        (base / where / "words.txt").write_text("cat 0.1 0.2\n")
    (base / "private" / "cwd").mkdir()
    log = base / "driver.log"
    temp = tempfile.mkdtemp(prefix="rayst-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    nodes, driver = Nodes(), None
    gcs, dashboard, client = free_ports(3)
    address = f"127.0.0.1:{gcs}"
    try:
        nodes.start(
            ["--head", f"--port={gcs}", "--include-dashboard=false", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", *_node_args(temp)]
        )  # fmt: skip
        nodes.start([f"--address={address}", *_node_args(temp, "private_node")], hidden=base / "private")

        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, address, str(base)],
            env=nodes.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        )  # fmt: skip
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(driver.stdout, lines), daemon=True).start()
        got: dict = {}
        for _ in range(7):
            got.update(_said(lines, log, nodes))
        private = got["private"][:8]
        # (a) the CLI, a relative --out in a folder the second node does not see: exit 2, one line, nothing written
        code, stderr = got["cli"]
        assert code == 2, stderr[-3000:]
        error = stderr.strip().splitlines()[-1]
        assert error.startswith(f"semprobe: error: node {got['ip']} ({private}) does not see --out ")
        assert f"does not see --out {base}/private/cwd/runs/x as the driver does: the folder is missing;" in error
        assert error.endswith(
            "use s3://, gs://, or an absolute path on a filesystem every node mounts (NFS, EFS, Filestore)"
        )
        assert list((base / "private" / "cwd").iterdir()) == []  # not even the runs/ it made for the token

        what_works = "every node must see the same storage: use s3://, gs://, or an absolute path"
        assert got["local_out"].startswith(f"node {got['ip']} ({private}) does not see --out {base}/private/out ")
        assert what_works in got["local_out"]
        assert got["local_images"].startswith(
            f"node {got['ip']} ({private}) does not see --images {base}/private/images as the driver does: it is "
            "missing there;"
        )
        assert got["local_words"].startswith(
            f"node {got['ip']} ({private}) does not see word model file (glove:) {base}/private/words.txt "
        )
        # nothing was left behind by the refusals: no out, no out1/out2 with a token, no token in an input
        assert sorted(p.name for p in (base / "private").iterdir()) == ["cwd", "images", "words.txt"]
        assert sorted(p.name for p in (base / "shared").iterdir()) == ["images", "out", "words.txt"]
        # (b) what every node sees passes, and its token stays while the driver lives
        assert got["shared"] == "ok" and got["late_armed"] == "ok"
        assert [p.name[:18] for p in (base / "shared" / "out").iterdir()] == [".semprobe-storage-"]

        # (c) a node that joins after the start check: its first Output under the checked root is refused
        nodes.start([f"--address={address}", *_node_args(temp, "late_node")], hidden=base / "late")
        driver.stdin.write("go\n")
        driver.stdin.flush()
        got.update(_said(lines, log, nodes))
        assert got["late_touch"] == (
            f"node {got['late_ip']} ({got['late'][:8]}) does not see --out {base}/late/out as the driver does: the "
            "folder is missing; every node must see the same storage: use s3://, gs://, or an absolute path on a "
            "filesystem every node mounts (NFS, EFS, Filestore)"
        )
        assert got["late_elsewhere"] == "ok"  # shared/out: every node sees it
        assert got["private_touch"] == "ok"  # the private node sees late/ as the head does
        assert driver.wait(60) == 0
        # the driver's exit removed its tokens
        assert list((base / "shared" / "out").iterdir()) == [] and list((base / "late" / "out").iterdir()) == []
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_driver_checks_once_per_root_and_cleans_up_a_refusal(tmp_path, monkeypatch):
    """check() with the cluster faked: two nodes, one of which sees what the driver sees (it runs look() here), the
    other sees nothing while ``blind`` is set."""
    looks, published, blind = [], [], {"on": False}

    class TwoNodes:
        @staticmethod
        def nodes():
            return [
                {"Alive": True, "NodeID": c * 56, "NodeManagerAddress": ip}
                for ip, c in (("10.0.0.1", "a"), ("10.0.0.2", "b"))
            ]

    def look_everywhere(ray, nodes, expects):
        looks.append([e.path for e in expects])
        seen = shared_storage.look(expects, patience=0)
        assert seen == []  # the driver's own node always sees what it wrote
        missed = [(0, "the folder is missing")] if blind["on"] else []
        return [("10.0.0.2", "b" * 56, expects[i], why) for i, why in missed]

    monkeypatch.setattr(shared_storage, "_ray", lambda: TwoNodes)
    monkeypatch.setattr(shared_storage, "_look_everywhere", look_everywhere)
    monkeypatch.setattr(shared_storage, "_publish", lambda ray: published.append(dict(shared_storage._ARMED)))
    monkeypatch.setattr(shared_storage, "_ARMED", {})
    words = tmp_path / "w.txt"
    words.write_text("cat 1 2\n")
    out = tmp_path / "out"
    cfg = RunConfig(out=str(out), words=[f"glove:{words}"]).validate()
    shared_storage.check(cfg)
    assert looks == [[str(out), str(words), str(tmp_path / ".semprobe-words")]]  # --out, the file, the word cache
    (token,) = out.iterdir()
    assert published[-1][str(out)].expects[0].name == token.name
    # the extraction inside run: its --out lies in the checked one, its inputs are the same: no second look
    shared_storage.check(RunConfig(out=str(out / "extract" / "m"), words=[f"glove:{words}"]).validate())
    assert len(looks) == 1
    # a token that vanished (the folder was cleared) is written again
    token.unlink()
    shared_storage.check(cfg)
    assert looks[-1] == [str(out), str(tmp_path / ".semprobe-words")] and len(list(out.iterdir())) == 1
    # refused: nothing left, the folders made for the token gone, nothing published
    blind["on"] = True
    n = len(published)
    with pytest.raises(InputError, match=rf"^node 10.0.0.2 \(bbbbbbbb\) does not see --out {tmp_path}/new/out as "):
        shared_storage.check(RunConfig(out=str(tmp_path / "new" / "out")).validate())
    assert not (tmp_path / "new").exists() and len(published) == n
    shared_storage._remove_all()  # the driver's exit
    assert list(out.iterdir()) == []
