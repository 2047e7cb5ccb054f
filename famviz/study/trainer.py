"""The study's trainer: one network trained to a train cross-entropy target, with SGD (momentum)
or Adam underneath plain training, FAM (:func:`famviz.fam.penalty`), SAM or ASAM
(:class:`famviz.fam.SAM`).

Every random draw (initialization, the train subset, label noise, mini-batch order) comes from
generators seeded by exact ints derived from the run's seed; torch's global RNG is not used.
"""

from __future__ import annotations

import hashlib
import math
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


def _optimizer(model: nn.Module, config: dict):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config["optimizer"] == "sgd":
        base = torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"],
                               weight_decay=config["weight_decay"])
    else:
        base = torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"])
    method = config["method"]
    if method in ("sam", "asam"):
        rho = config["rho"] if config["rho"] is not None else fam.DEFAULT_RHO[method]
        return fam.SAM(base, rho=rho, adaptive=method == "asam")
    return base


def train_to_target(model: nn.Module, train, config: dict, *, layer: str,
                    target_loss: float, max_epochs: int) -> TrainResult:
    """Train ``model`` in place until the mean train cross-entropy (evaluation mode, after an
    epoch) is at most ``target_loss``, or ``max_epochs`` epochs; a non-finite loss stops it."""
    X, y = train
    n, bs = len(X), config["batch_size"]
    gen = torch.Generator().manual_seed(sub_seed(config["seed"], "shuffle"))
    opt = _optimizer(model, config)
    method, lam = config["method"], config["lam"]

    def objective(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        if method == "fam":
            loss = loss + lam * fam.penalty(model, (xb, yb), layer)
        return loss

    steps, loss_now = 0, math.inf
    model.train()
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            xb, yb = X[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            objective(xb, yb).backward()
            if isinstance(opt, fam.SAM):
                opt.first_step()
                opt.zero_grad(set_to_none=True)
                objective(xb, yb).backward()
                opt.second_step()
            else:
                opt.step()
            steps += 1
        model.eval()
        loss_now = full_loss(model, X, y)
        model.train()
        if not math.isfinite(loss_now) or loss_now <= target_loss:
            break
    model.eval()
    for p in model.parameters():
        p.grad = None
    return TrainResult(epoch, math.isfinite(loss_now) and loss_now <= target_loss, loss_now,
                       steps)
