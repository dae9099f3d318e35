"""The trainer: a CIFAR-100 CNN trained by Ray Train, one loop per worker (CPU, one GPU or several).

Larsson et al.'s recipe as Dharmaretnam & Fyshe ran it: SGD with momentum, the
learning rate divided by 10 each time the remaining epochs halve (400 epochs:
at 200, 300, 350 and 375). Every ``every`` epochs, and at epoch 0 and the end,
worker 0 reports a checkpoint holding the model's plain state dict (so
``fractalnet:checkpoint=DIR/model.pt`` loads it anywhere), the optimizer, the RNG
states and every epoch's errors so far. A rerun of the same run resumes from the
latest checkpoint and, on the same hardware, retraces the same steps: each
epoch's image order comes from (seed, epoch), and drop-path and dropout draw from
the restored torch RNG.

Checkpoint files are loaded with ``weights_only=True``: tensors, numbers, strings and plain containers, nothing a
pickle could run. ``state.pt`` needs no more (the optimizer's state dict, the torch RNG states as uint8 tensors, the
epoch; the image order is recomputed from (seed, epoch), so no numpy or ``random`` state is kept), and a file that
names anything else is refused (:func:`load_checkpoint_file`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError

MODEL_FILE, STATE_FILE, METRICS_FILE = "model.pt", "state.pt", "metrics.json"


def load_checkpoint_file(source: str | bytes, name: str, mmap: bool = False) -> Any:
    """A checkpoint file (a local path, or its bytes) as tensors and plain containers only. One that names any other
    global (a crafted pickle runs whatever function it names) is an InputError naming the file and the global, and
    nothing runs. ``mmap`` maps a local file's tensors instead of reading them (enough to check the file)."""
    try:
        if isinstance(source, bytes):
            return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the global it refused
        what = f"it calls {found.group(1)}" if found else "it holds objects other than tensors"
        raise InputError(
            f"refused checkpoint file {name}: {what}, which semprobe train never writes (allowed: tensors, numbers, "
            "strings, lists, dicts)"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:  # missing, truncated, not a torch file
        raise InputError(
            f"cannot read checkpoint file {name}: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from None


def check_state(state: Any, name: str) -> dict[str, Any]:
    """``state.pt`` as the trainer writes it: optimizer state dict, per-worker torch RNG states, epoch."""
    rng = state.get("rng") if isinstance(state, dict) else None
    if (
        not isinstance(state.get("optimizer") if isinstance(state, dict) else None, dict)
        or not isinstance(state.get("epoch"), int)
        or not isinstance(rng, list)
        or not rng
        or not all(isinstance(r, torch.Tensor) and r.dtype == torch.uint8 and r.dim() == 1 for r in rng)
    ):
        raise InputError(
            f"{name} is not a semprobe train state (expected optimizer, rng: uint8 tensors, epoch); rerun the "
            "training into a new --out"
        )
    return state


def lr_drops(epochs: int, drops: int = 4) -> list[int]:
    """The epochs at which the learning rate is divided by 10: whenever the remaining epochs halve."""
    return sorted({epochs - epochs // 2**k for k in range(1, drops + 1)} - {0, epochs})


def learning_rate(base: float, epoch: int, epochs: int) -> float:
    """The learning rate of (0-based) ``epoch`` of ``epochs``."""
    return base * 0.1 ** sum(epoch >= d for d in lr_drops(epochs))


def to_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(n, 32, 32, 3) uint8 -> (n, 3, 32, 32) float, the model's input."""
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


@torch.no_grad()
def error_rate(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean, std, device, batch_size: int = 500
) -> float:
    """Top-1 error in eval mode (no drop-path, no dropout)."""
    model.eval()
    wrong = 0
    for lo in range(0, len(images), batch_size):
        x = to_input(
            torch.from_numpy(images[lo : lo + batch_size].copy()).to(device), mean, std
        )  # object-store arrays are read-only
        wrong += int(np.count_nonzero(model(x).argmax(1).cpu().numpy() != labels[lo : lo + batch_size]))
    return wrong / len(images)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's loop per worker.

    ``config``: model (a zoo name), epochs, every, lr, momentum, weight_decay, batch_size (global), seed,
    until_train_accuracy (stop early once an epoch's training accuracy reaches it; None: never),
    threads (torch threads on a CPU worker; None: leave), and train / test: object refs (or arrays) of
    (images (n, 32, 32, 3) uint8, labels (n,) int64).
    """
    import ray
    import ray.train
    import ray.train.torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    (train_x, train_y), (test_x, test_y) = (
        ray.get(config[k]) if isinstance(config[k], ray.ObjectRef) else config[k] for k in ("train", "test")
    )
    loaded = load_model(config["model"])
    net = loaded.module
    device = ray.train.torch.get_device()
    mean = torch.tensor(loaded.preprocess.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocess.std, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    torch.manual_seed(config["seed"] + rank)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            net.load_state_dict(load_checkpoint_file(os.path.join(folder, MODEL_FILE), MODEL_FILE))
            state = check_state(load_checkpoint_file(os.path.join(folder, STATE_FILE), STATE_FILE), STATE_FILE)
            with open(os.path.join(folder, METRICS_FILE)) as f:
                history = json.load(f)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start = state["epoch"]
    # Drop-path skips whole columns in a step: DDP must expect parameters without gradients.
    model = (
        ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True})
        if world > 1
        else net.to(device)
    )

    def report(epoch: int, metrics: dict[str, Any], save: bool) -> None:
        rngs = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rngs, torch.get_rng_state())
        else:
            rngs = [torch.get_rng_state()]
        if not (save and rank == 0):
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, os.path.join(folder, MODEL_FILE))
            torch.save(
                {"optimizer": optimizer.state_dict(), "rng": rngs, "epoch": epoch}, os.path.join(folder, STATE_FILE)
            )
            with open(os.path.join(folder, METRICS_FILE), "w") as f:
                json.dump(history, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    epochs, per_worker = config["epochs"], config["batch_size"] // world
    if start == 0 and not history:
        metrics = {
            "epoch": 0,
            "lr": config["lr"],
            "train_error": error_rate(net, train_x, train_y, mean, std, device),
            "test_error": error_rate(net, test_x, test_y, mean, std, device),
            "train_loss": None,
            "epoch_seconds": None,
        }
        history.append(metrics)
        report(0, metrics, save=True)
    began = time.monotonic()
    for epoch in range(start, epochs):
        lr = learning_rate(config["lr"], epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        tick = time.perf_counter()
        # One global batch per step, each worker its slice of it: every worker takes the same number of steps.
        order = np.random.default_rng([config["seed"], epoch]).permutation(len(train_x))
        counts = torch.zeros(3, dtype=torch.float64, device=device)  # wrong, seen, summed loss
        for step in range(len(order) // config["batch_size"]):
            lo = step * config["batch_size"] + rank * per_worker
            idx = np.sort(order[lo : lo + per_worker])
            x = to_input(torch.from_numpy(train_x[idx]).to(device), mean, std)
            y = torch.from_numpy(train_y[idx]).to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            counts += torch.stack(
                [
                    (logits.argmax(1) != y).sum().double(),
                    torch.tensor(len(idx), dtype=torch.float64, device=device),
                    loss.detach().double() * len(idx),
                ]
            )
        if world > 1:
            torch.distributed.all_reduce(counts)
        wrong, seen, loss_sum = counts.tolist()
        seconds = time.perf_counter() - tick  # the training steps alone, for throughput
        train_error = wrong / seen  # during training, drop-path and dropout on, as Larsson et al. report it
        done = epoch + 1
        metrics = {
            "epoch": done,
            "lr": lr,
            "train_error": train_error,
            "train_loss": loss_sum / seen,
            "test_error": error_rate(net, test_x, test_y, mean, std, device),
            "epoch_seconds": seconds,
        }
        history.append(metrics)
        if rank == 0:  # progress: done/total, rate, ETA
            rate = (done - start) / (time.monotonic() - began)
            eta = (epochs - done) / rate
            print(
                f"train {config['model']}: epoch {done}/{epochs} ({rate * 60:.2f} epochs/min, ETA {eta / 60:.1f} min) "
                f"train error {train_error:.3f} test error {metrics['test_error']:.3f} lr {lr:g}",
                file=sys.stderr,
                flush=True,
            )
        stop = config.get("until_train_accuracy") is not None and 1 - train_error >= config["until_train_accuracy"]
        report(done, metrics, save=done % config["every"] == 0 or done == epochs or stop)
        if stop:
            break
