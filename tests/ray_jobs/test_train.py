"""``semprobe train`` through Ray Train on a small CIFAR-format dataset written here: schedule, learning, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import until_cpus_free
from test_cifar import write_cifar100

from semprobe.actors.trainer import learning_rate, lr_drops
from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.checkpoints import checkpoints
from semprobe.ray_jobs.config import TrainConfig
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.train import run_train

TINY = {"model": "fractalnet_tiny", "batch_size": 50, "lr": 0.05}


def test_the_learning_rate_drops_whenever_the_remaining_epochs_halve():
    assert lr_drops(400) == [200, 300, 350, 375]
    assert [learning_rate(0.02, e, 400) for e in (0, 199, 200, 299, 300, 350, 374, 375, 399)] == pytest.approx(
        [0.02, 0.02, 2e-3, 2e-3, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6]
    )
    assert lr_drops(8) == [4, 6, 7]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train=400, n_test=100)
    return f"cifar100:{root}"


# One whole run feeds the learning test, the data-parallel test and the reference of the interrupted one: 4 epochs,
# a checkpoint every 2 (so `every` skips epochs), the learning rate dropped at epochs 2 and 3 (lr_drops(4)), on two
# workers (DDP over gloo: each takes half of every global batch; a Ray Train start is the cost of a run, not epochs).
WHOLE = dict(epochs=4, every=2, workers=2, **TINY)


@pytest.fixture(scope="module")
def whole(ray_session, cifar, tmp_path_factory) -> tuple[dict, Path]:
    """A finished training run: its summary and output folder."""
    out = tmp_path_factory.mktemp("train") / "whole"
    summary = run_train(TrainConfig(data=cifar, out=str(out), **WHOLE).validate(), log=lambda m: None)
    return summary, out


def test_training_reports_checkpoints_and_learns(whole):
    summary, run = whole
    done = checkpoints(Output(str(run)), "normal")
    assert [c["epoch"] for c in done] == [0, 2, 4] and summary["checkpoints"] == 3
    assert not (run / ".lease.json").exists(), "the finished job released its lease"
    history = pq.read_table(run / "training.parquet").to_pylist()
    assert [h["epoch"] for h in history] == list(range(5))
    assert lr_drops(4) == [2, 3]
    assert [h["lr"] for h in history[1:]] == pytest.approx(
        [0.05 * 0.1 ** sum(e >= d for d in lr_drops(4)) for e in range(4)]
    )
    assert history[0]["train_error"] > 0.95 and history[-1]["train_error"] < history[1]["train_error"]
    # a checkpoint is a model of the zoo
    from semprobe.actors.zoo import load_model

    model = load_model(f"fractalnet_tiny:checkpoint={done[-1]['path']}/model.pt")
    assert model.name.startswith("fractalnet_tiny:checkpoint=")


def same_checkpoints(run: Path, reference: Path) -> list[int]:
    """The epochs of ``run``'s checkpoints, each asserted to be ``reference``'s model of that epoch, bit for bit."""
    models = {c["epoch"]: c["path"] for c in checkpoints(Output(str(reference)), "normal")}
    kept = checkpoints(Output(str(run)), "normal")
    for c in kept:
        a, b = (torch.load(path + "/model.pt") for path in (c["path"], models[c["epoch"]]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"epoch {c['epoch']}"
    return [c["epoch"] for c in kept]


def test_an_interrupted_run_resumes_to_the_same_model(ray_session, cifar, whole, tmp_path):
    summary, reference = whole
    # the same run as `semprobe train` in a driver of its own, on the tests' Ray (as a cluster user's driver joins
    # a running cluster), killed once a checkpoint past the initial model (epoch 2) has landed
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "semprobe.ray_jobs.cli", "train", "--data", cifar, "--model", "fractalnet_tiny",
           "--epochs", "4", "--every", "2", "--workers", "2", "--batch-size", "50", "--lr", "0.05", "--out",
           str(cut)]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not any(c["epoch"] >= 1 for c in checkpoints(Output(str(cut)), "normal")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray ends the dead driver's trainer and its workers: once their CPUs are back, nothing writes to cut
    until_cpus_free(ray_session, deadline, "the killed driver's training workers did not end")
    epochs = same_checkpoints(cut, reference)
    reached = epochs[-1]
    assert epochs == list(range(0, reached + 1, 2)) and 2 <= reached < 4, (
        "killed mid-training, with every checkpoint so far (0: the initial model)"
    )
    assert (cut / ".lease.json").exists(), "the killed driver's lease is left behind"
    logs = []
    resumed = run_train(TrainConfig(data=cifar, out=str(cut), **WHOLE).validate(), log=logs.append)  # takes it over
    assert resumed["resumed_from"] == reached and f"train: resuming normal from epoch {reached} of 4" in logs
    timeless = [pq.read_table(folder / "training.parquet").drop(["epoch_seconds"]) for folder in (cut, reference)]
    assert timeless[0].equals(timeless[1])  # every number but the wall time
    assert same_checkpoints(cut, reference) == [0, 2, 4]
    assert (resumed["train_error"], resumed["test_error"]) == (summary["train_error"], summary["test_error"])


def test_bad_training_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="--data 'sample:cifar100' is not a CIFAR-100 source: pass cifar100:DIR"):
        TrainConfig(data="sample:cifar100").validate()
    with pytest.raises(InputError, match="CIFAR-100 pickle not found"):
        run_train(TrainConfig(data=f"cifar100:{tmp_path}", out=str(tmp_path / "o")).validate(), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_words_with_layers_the_model_lacks_are_refused_before_training(tmp_path):
    """The analysis beside training resolves its layers on the first checkpoint: 'deepest', its default, exists
    only for FractalNet, so another architecture is refused before any data is read, not after training."""
    import timm

    path = tmp_path / "net.pt"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    options = {"data": f"cifar100:{tmp_path / 'nowhere'}", "model": f"timm:test_efficientnet:checkpoint={path}"}
    cfg = TrainConfig(**options, words=["glove-50d"], out=str(tmp_path / "o")).validate()
    with pytest.raises(InputError, match=r"^layer kind 'deepest' .* needs a FractalNet, not EfficientNet: choose"):
        run_train(cfg, log=lambda m: None)
    # other layers it has pass, to the next check: the data
    cfg = TrainConfig(**options, words=["glove-50d"], layers="blocks,logits", out=str(tmp_path / "o")).validate()
    with pytest.raises(InputError, match="CIFAR-100 pickle not found"):
        run_train(cfg, log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_two_data_parallel_workers_train_one_model(whole):
    """The same code on two workers (DDP over gloo): each takes half of every global batch, one model comes out."""
    _, run = whole
    history = pq.read_table(run / "training.parquet").to_pylist()
    assert history[2]["train_loss"] < history[1]["train_loss"]  # the averaged gradients train it (both at lr 0.05)
    for c in checkpoints(Output(str(run)), "normal"):
        state = torch.load(c["path"] + "/model.pt")
        # a plain state dict (no DDP "module." prefix), loadable as fractalnet_tiny:checkpoint=
        assert state and not any(k.startswith("module.") for k in state)


def _trainer_state(epoch: int = 2) -> dict:
    """state.pt as the trainer writes it: an SGD optimizer after a step, two workers' RNG states, the epoch."""
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    torch.manual_seed(epoch)
    first = torch.get_rng_state()
    torch.rand(3)
    return {"optimizer": optimizer.state_dict(), "rng": [first, torch.get_rng_state()], "epoch": epoch}


def test_the_training_state_loads_as_tensors_only_and_unchanged(tmp_path):
    """What resume needs survives weights_only loading bit for bit: the RNG states, momentum buffers, epoch."""
    from semprobe.actors.trainer import check_state, load_checkpoint_file

    state = _trainer_state()
    torch.save(state, tmp_path / "state.pt")
    loaded = check_state(load_checkpoint_file(str(tmp_path / "state.pt"), "state.pt"), "state.pt")
    assert loaded["epoch"] == 2 and len(loaded["rng"]) == 2
    assert all(torch.equal(a, b) and a.dtype == torch.uint8 for a, b in zip(loaded["rng"], state["rng"]))
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, buffers in state["optimizer"]["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][k]["momentum_buffer"], buffers["momentum_buffer"])
    torch.set_rng_state(loaded["rng"][1])  # the restored generator draws what the saved one would have
    expected = torch.rand(4)
    torch.set_rng_state(state["rng"][1])
    assert torch.equal(torch.rand(4), expected)
    for bad in ({**state, "rng": [torch.zeros(3)]}, {**state, "epoch": "2"}, [state]):
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=r"^bad.pt is not a semprobe train state \(expected optimizer, rng"):
            check_state(load_checkpoint_file(str(tmp_path / "bad.pt"), "bad.pt"), "bad.pt")


def _crafted_checkpoint(out: Path, marker: Path) -> Path:
    """A registered checkpoint of run 'normal' under OUT whose state.pt runs os.system when fully unpickled."""
    from test_cifar import _RunsCode

    folder = out / "train" / "normal" / "checkpoint_000000"
    folder.mkdir(parents=True)
    torch.save(torch.nn.Linear(2, 2).state_dict(), folder / "model.pt")
    torch.save({**_trainer_state(1), "hook": _RunsCode(marker)}, folder / "state.pt")
    record = {"checkpoint_results": [{"metrics": {"epoch": 1}, "checkpoint_dir_name": folder.name}]}
    (out / "train" / "normal" / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    return folder / "state.pt"


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from semprobe.actors.trainer import load_checkpoint_file

    marker = tmp_path / "ran"
    state = _crafted_checkpoint(tmp_path / "out", marker)
    with pytest.raises(InputError, match=rf"^refused checkpoint file {state}: it calls posix\.system, which"):
        load_checkpoint_file(str(state), str(state), mmap=True)
    assert not marker.exists()
    torch.load(state, weights_only=False)  # the payload is live: the unsafe load runs it
    assert marker.exists()


def test_crafted_files_are_refused_by_semprobe_train_with_code_2_and_run_nothing(cifar, tmp_path, capsys):
    """Through the command: a crafted checkpoint to resume from, and a crafted CIFAR pickle."""
    import pickle

    from test_cifar import _RunsCode, write_cifar100

    from semprobe.ray_jobs.cli import main

    marker = tmp_path / "ran"
    state = _crafted_checkpoint(tmp_path / "out", marker)
    argv = ["train", "--model", "fractalnet_tiny", "--epochs", "2", "--batch-size", "50"]
    assert main([*argv, "--data", cifar, "--out", str(tmp_path / "out")]) == 2
    assert f"semprobe: error: refused checkpoint file {state}: it calls posix.system" in capsys.readouterr().err
    write_cifar100(tmp_path / "data", n_train=100, n_test=100)
    crafted = tmp_path / "data" / "cifar-100-python" / "test"
    crafted.write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"fine_labels": [0]}, protocol=2))
    assert main([*argv, "--data", f"cifar100:{tmp_path / 'data'}", "--out", str(tmp_path / "out2")]) == 2
    assert f"semprobe: error: refused CIFAR-100 pickle {crafted}: it calls posix.system" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out" / ".lease.json").exists()
