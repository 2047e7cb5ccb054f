"""The study's networks, data and trainer: one network trained to a train cross-entropy
target by :func:`famviz.fam.train` (SGD with momentum or Adam underneath plain training, FAM,
SAM or ASAM).

Every random draw (initialization, the train subset, label noise, mini-batch order) comes from
generators seeded by exact ints derived from the run's seed; torch's global RNG is not used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as fv_data
from .. import fam, models

__all__ = ["sub_seed", "digits_model", "digits_data", "train_to_target", "TrainResult"]

#: samples per forward pass when the full training set is evaluated
EVAL_BATCH = 4096


def sub_seed(seed: int, tag: str) -> int:
    """An independent seed for one use (``tag``) of a run's ``seed``: a hash, so the streams for
    initialization, data and shuffling never overlap."""
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def digits_model(config: dict) -> nn.Module:
    """The built-in zoo's network: ``depth`` hidden ReLU layers of ``width`` units on 64 pixels."""
    widths = [64] + [config["width"]] * config["depth"] + [10]
    return models.mlp(widths, seed=sub_seed(config["seed"], "init"))


def digits_data(config: dict):
    """The digits split of ``split_seed``; a seeded subset of ``train_size`` training samples
    and a seeded ``label_noise`` fraction of training labels moved to another class."""
    (X, y), test = fv_data.digits(test_size=0.25, seed=config["split_seed"])
    gen = torch.Generator().manual_seed(sub_seed(config["seed"], "data"))
    n = config["train_size"]
    if n is not None:
        if n > len(X):
            raise ValueError(f"train_size {n} exceeds the {len(X)} training samples")
        idx = torch.randperm(len(X), generator=gen)[:n]
        X, y = X[idx], y[idx]
    noise = config["label_noise"]
    if noise:
        k = int(round(noise * len(y)))
        idx = torch.randperm(len(y), generator=gen)[:k]
        shift = torch.randint(1, 10, (k,), generator=gen)
        y = y.clone()
        y[idx] = (y[idx] + shift) % 10
    return (X, y), test


@dataclass(frozen=True)
class TrainResult:
    """Epochs run, whether the target was reached, and the last full-data train loss."""

    epochs: int
    converged: bool
    train_loss: float
    steps: int


@torch.no_grad()
def full_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    total = 0.0
    for i in range(0, len(X), EVAL_BATCH):
        total += float(F.cross_entropy(model(X[i:i + EVAL_BATCH]), y[i:i + EVAL_BATCH],
                                       reduction="sum"))
    return total / len(X)


def train_to_target(model: nn.Module, train, config: dict, *, layer: str,
                    target_loss: float, max_epochs: int) -> tuple[nn.Module, TrainResult]:
    """Train a copy of ``model`` with :func:`famviz.fam.train` until the mean train
    cross-entropy (evaluation mode, after an epoch) is at most ``target_loss``, or
    ``max_epochs`` epochs; return the trained copy and what happened.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the run diverged).
    """
    trained, history = fam.train(
        model, train, method=config["method"], lam=config["lam"], rho=config["rho"],
        epochs=max_epochs, lr=config["lr"], batch_size=config["batch_size"],
        momentum=config["momentum"], weight_decay=config["weight_decay"], layer=layer,
        optimizer=config["optimizer"], seed=sub_seed(config["seed"], "shuffle"),
        callbacks=[lambda epoch, net, h: h.train_loss[-1] <= target_loss],
        progress=False, track_kappa=False,
    )
    loss = history.train_loss[-1]
    return trained.eval(), TrainResult(len(history), loss <= target_loss, loss,
                                       sum(history.steps))
