"""Training with SGD, FAM, SAM or ASAM: one step (:func:`make_step`, for custom loops) and a
reproducible loop on a copy of a model (:func:`train`) with its :class:`History`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import replace as _replace

import torch
from torch import Tensor, nn

from .._random import (
    check_seed,
    derive_seed,
    global_rng_state,
    make_generator,
    seed_dropout,
    unseed_dropout,
)
from ..curvature import new_seed
from ..objective import (
    LOSSES,
    check_device,
    check_option,
    check_targets,
    resolve_loss,
)
from ..datastream import DataStream
from ..replica import RngStream, check_model, replicate
from ._args import check_normalize, number
from .penalty import (
    GRADIENTS,
    _curvature,
    _eval_modes,
    _has_mode_dependent,
    _layer,
    _plan,
    _Target,
)
from .sam import ASAM_ETA, SAM, frozen_running_stats

#: training methods of :func:`train`
METHODS = ("sgd", "fam", "sam", "asam")
#: base optimizers by name (SGD with ``momentum``; Adam with its default betas); a callable
#: ``params -> torch.optim.Optimizer`` gives any other
OPTIMIZERS = ("sgd", "adam")
#: FAM's λ when none is given (a scale that suits the tutorials' digits MLP; it is data dependent)
DEFAULT_LAM = 0.01
#: ρ when none is given: Foret et al. use 0.05 for SAM; Kwon et al. recommend a ρ about ten
#: times larger for ASAM (0.5 for CIFAR-10 with SGD)
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}
#: samples per forward pass when :func:`train` evaluates losses and accuracies
EVAL_BATCH = 4096
#: mini-batch size of :func:`train` on tensor data when none is given
DEFAULT_BATCH_SIZE = 128


class StopTraining(Exception):
    """Raise from a :func:`train` callback to stop after the current epoch (returning ``True``
    from the callback does the same). The model and history so far are returned."""



# ------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepInfo:
    """What one training step did.

    Attributes:
        loss: the mini-batch loss at θ (before the step, without the penalty).
        penalty: FAM's κ (÷ m if normalized) on the batch; NaN for other methods.
        forward_passes: full forward passes through the model.
        backward_passes: backward passes (autograd calls; a batched, vmapped pass counts once).
    """

    loss: float
    penalty: float
    forward_passes: int
    backward_passes: int


def _base_optimizer(optimizer, named, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer under every method: by name (:data:`OPTIMIZERS`, with ``lr``,
    ``momentum`` for SGD and ``weight_decay``) or from a factory ``params -> Optimizer``."""
    if callable(optimizer):
        made = optimizer([p for _, p in named])
        if not isinstance(made, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got "
                            f"{type(made).__name__}")
        return made
    check_option("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "adam":
        return torch.optim.Adam(named, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(named, lr=lr, momentum=momentum, weight_decay=weight_decay)


class Step:
    """One optimizer step of SGD, FAM, SAM or ASAM on ``model`` (trained in place); built by
    :func:`make_step`. Call it with a batch ``(X, y)``; returns a :class:`StepInfo`."""

    def __init__(self, model: nn.Module, method: str, *, lam: float, rho: float, lr: float,
                 momentum: float, weight_decay: float, layer: str | None, loss,
                 normalize: str | None, gradient: str, eta: float, optimizer="sgd"):
        self.model = model
        self.method = method
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.target = _Target(model, layer)
        self.layer, self.module = self.target.name, self.target.module
        self.lam, self.normalize, self.gradient = lam, normalize, gradient
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
        base = _base_optimizer(optimizer, named, lr, momentum, weight_decay)
        if method in ("sam", "asam"):
            self.optimizer: torch.optim.Optimizer | SAM = SAM(base, rho=rho,
                                                              adaptive=method == "asam", eta=eta)
        else:
            self.optimizer = base
        # FAM: share the loss' forward pass unless the model behaves differently in train mode
        # (BatchNorm, dropout): then the penalty gets its own forward pass in evaluation mode,
        # as penalty() and relative_flatness() evaluate it
        self.shared_forward = not _has_mode_dependent(model)
        self.path: str | None = None

    def _loss(self, X: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
        value = self.loss_fn(self.model(X) if out is None else out, y)
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError("the loss must return a scalar tensor (use reduction='mean')")
        return value

    def _fam_penalty(self, out: Tensor, phi: Tensor, z: Tensor, y: Tensor):
        """κ on the batch (÷ m if normalized) from the captured layer tensors: a tensor in the
        graph (exact), or for the frozen gradient the detached value and the term 2TW (÷ m) to
        add to W's gradient — applying :math:`2TW` directly instead of differentiating
        :math:`\\langle WW^\\top, T\\rangle` saves the autograd bookkeeping."""
        if self.path is None:
            self.path = _plan(self.model, self.target, self.loss_name, z, out)
        W = self.module.weight
        scale = 1.0 / W[0].numel() if self.normalize == "m" else 1.0
        if self.gradient == "exact":
            value, backwards = _curvature(self.path, self.module, phi, z, out, y,
                                          self.loss_name, self.loss_fn, True)
            return value * scale, None, backwards
        T, backwards = _curvature(self.path, self.module, phi, z, out, y, self.loss_name,
                                  self.loss_fn, False, want="T")
        with torch.no_grad():
            TW = (T @ W.reshape(len(T), -1)).reshape(W.shape)
            value = (W * TW).sum()
            return (value if scale == 1.0 else value * scale), TW.mul_(2 * scale), backwards

    def __call__(self, X: Tensor, y: Tensor) -> StepInfo:
        model, opt = self.model, self.optimizer
        with torch.enable_grad():
            if self.method == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = self._loss(X, y)
                loss.backward()
                opt.step()
                return StepInfo(float(loss.detach()), float("nan"), 1, 1)
            if self.method == "fam":
                opt.zero_grad(set_to_none=True)
                if self.shared_forward:
                    out, phi, z = self.target.forward(X)
                    loss = self._loss(X, y, out)
                    pen, decay, backwards = self._fam_penalty(out, phi, z, y)
                    forwards = 1
                else:  # the penalty's own forward pass in evaluation mode
                    loss = self._loss(X, y)
                    with _eval_modes(self.target.model):
                        out, phi, z = self.target.forward(X)
                        pen, decay, backwards = self._fam_penalty(out, phi, z, y)
                    forwards = 2
                if decay is None:
                    (loss + self.lam * pen).backward()
                else:
                    loss.backward()
                    W = self.module.weight
                    if W.requires_grad:
                        if W.grad is None:
                            W.grad = torch.zeros_like(W)
                        W.grad.add_(decay, alpha=self.lam)
                opt.step()
                return StepInfo(float(loss.detach()), float(pen.detach()), forwards,
                                1 + backwards)
            # SAM / ASAM: gradient at theta, ascend, gradient at theta + eps (BatchNorm
            # statistics updated by the first pass only), descend from theta
            opt.zero_grad(set_to_none=True)
            loss = self._loss(X, y)
            loss.backward()
            opt.first_step()
            opt.zero_grad(set_to_none=True)
            with frozen_running_stats(model):
                self._loss(X, y).backward()
            opt.second_step()
            return StepInfo(float(loss.detach()), float("nan"), 2, 2)


def make_step(model: nn.Module, method: str = "sgd", *, lam: float | None = None,
              rho: float | None = None, lr: float = 0.05, momentum: float = 0.9,
              weight_decay: float = 0.0, layer: str | None = None, loss="cross_entropy",
              normalize: str | None = None, gradient: str = "exact",
              eta: float = ASAM_ETA, optimizer="sgd") -> Step:
    """A callable ``step(X, y) -> StepInfo`` that trains ``model`` **in place** with one of
    :data:`METHODS` (over the base ``optimizer``: SGD with momentum by default); for custom
    training loops. Arguments as in :func:`train`, which uses it."""
    check_model(model)
    check_option("method", method, METHODS)
    check_option("gradient", gradient, GRADIENTS)
    check_normalize(normalize)
    lam = DEFAULT_LAM if lam is None else number("lam", lam, low=0.0)
    rho = DEFAULT_RHO.get(method, 0.0) if rho is None else number("rho", rho, low=0.0)
    return Step(
        model, method, lam=lam, rho=rho,
        lr=number("lr", lr, low=0.0, strict=True),
        momentum=number("momentum", momentum, low=0.0, high=1.0),
        weight_decay=number("weight_decay", weight_decay, low=0.0),
        layer=layer, loss=loss, normalize=normalize, gradient=gradient,
        eta=number("eta", eta, low=0.0, strict=True), optimizer=optimizer,
    )


# --------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class History:
    """Per-epoch record of a :func:`train` run (a new object after every epoch).

    Per-epoch tuples (one entry per completed epoch):
        epoch: 1, 2, ...
        train_loss, train_accuracy: on the full training data after the epoch (evaluation mode:
            dropout off, BatchNorm on running statistics). Accuracy is NaN when the targets are
            not class labels.
        test_loss, test_accuracy: the same on ``test_data`` (NaN without it).
        kappa: relative flatness κ of the feature layer on the full training data
            (:func:`famviz.relative_flatness`, the paper's unnormalized κ; NaN when not tracked).
        batch_loss: mean mini-batch loss during the epoch (at θ, without the penalty).
        penalty: mean FAM penalty on the mini-batches (÷ m if normalized); NaN for other methods.
        time_per_step: mean wall-clock seconds per optimizer step (evaluation excluded).
        forward_passes, backward_passes: totals for the epoch's steps (see :class:`StepInfo`).
        steps: optimizer steps taken.

    Everything else records the run's settings. Two runs with the same seed and settings give
    identical histories except ``time_per_step``.
    """

    method: str
    layer: str
    loss: str
    seed: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    lam: float | None
    rho: float | None
    eta: float | None
    normalize: str | None
    gradient: str | None
    penalty_path: str | None
    num_train: int
    num_test: int
    stopped_early: bool = False
    optimizer: str = "sgd"
    device: str = "cpu"
    epoch: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    train_accuracy: tuple[float, ...] = ()
    test_loss: tuple[float, ...] = ()
    test_accuracy: tuple[float, ...] = ()
    kappa: tuple[float, ...] = ()
    batch_loss: tuple[float, ...] = ()
    penalty: tuple[float, ...] = ()
    time_per_step: tuple[float, ...] = ()
    forward_passes: tuple[int, ...] = ()
    backward_passes: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()

    #: the per-epoch fields
    PER_EPOCH = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "kappa",
                 "batch_loss", "penalty", "time_per_step", "forward_passes", "backward_passes",
                 "steps")

    def __len__(self) -> int:
        return len(self.epoch)

    def to_dict(self) -> dict:
        """Plain Python (lists for the per-epoch fields), ready for ``json.dumps``/pandas."""
        d = asdict(self)
        for key in self.PER_EPOCH:
            d[key] = list(d[key])
        return d

    def last(self) -> dict:
        """The last epoch's values, keyed by field name (empty before the first epoch)."""
        return {key: getattr(self, key)[-1] for key in self.PER_EPOCH} if len(self) else {}

    def _append(self, **values) -> History:
        new = {key: getattr(self, key) + (values[key],) for key in self.PER_EPOCH}
        return _replace(self, **new)


class _Data:
    """Training or test data of :func:`train`: tensors that train() re-batches (shuffled by its
    private generator), or live data (a ``DataLoader``) whose own batches are used and which
    is re-read every epoch under a private random state seeded from ``seed`` (its shuffling and
    augmentation reproducible, torch's global generator untouched)."""

    def __init__(self, data, what: str, dtype, device, loss_name: str, seed: int):
        long_labels = loss_name == "cross_entropy"
        self.stream = DataStream(data, dtype=dtype, device=device, long_labels=long_labels,
                                 rng=RngStream(derive_seed(seed, f"{what} order")))

        def one_tensor(i, X, y):
            if not isinstance(X, Tensor):
                raise ValueError(f"{what}: train() takes one input tensor per batch; for "
                                 "positional or keyword inputs, put famviz.fam.penalty or "
                                 "famviz.fam.PenaltyTap in your own training loop")

        self.stream.scan(one_tensor)
        self.live = self.stream.live
        self.num_samples = self.stream.num_samples
        if not self.live:
            batches = list(self.stream)
            try:
                self.X = torch.cat([X for X, _ in batches])
                self.y = torch.cat([y for _, y in batches])
            except RuntimeError as exc:
                raise ValueError(f"the batches of {what} have inconsistent shapes: {exc}") \
                    from exc

    def first_inputs(self) -> Tensor:
        """Up to two samples' inputs, to check shapes with."""
        X = self.X if not self.live else self.stream.first()[0]
        return X[:2]

    def epoch(self, batch_size: int | None, shuffle: torch.Generator):
        """The mini-batches of one epoch."""
        if self.live:
            yield from self.stream
            return
        order = torch.randperm(self.num_samples, generator=shuffle).to(self.X.device)
        for start in range(0, self.num_samples, batch_size):
            idx = order[start:start + batch_size]
            yield self.X[idx], self.y[idx]

    def evaluation_batches(self):
        if self.live:
            yield from self.stream
            return
        for start in range(0, self.num_samples, EVAL_BATCH):
            yield self.X[start:start + EVAL_BATCH], self.y[start:start + EVAL_BATCH]

    def for_measures(self):
        """The data as the measures take it."""
        return self.stream if self.live else (self.X, self.y)


@torch.no_grad()
def _evaluate(model: nn.Module, data: _Data | None, loss_fn) -> tuple[float, float]:
    """Mean loss and accuracy (NaN unless the targets are class labels) in evaluation mode."""
    if data is None:
        return float("nan"), float("nan")
    total, correct, n, classify = 0.0, 0, 0, None
    with _eval_modes(model):
        for xb, yb in data.evaluation_batches():
            out = model(xb)
            total += float(loss_fn(out, yb)) * len(xb)
            n += len(xb)
            if classify is None:
                classify = out.ndim == 2 and out.shape[1] > 1 and not yb.is_floating_point()
            if classify:
                correct += int((out.argmax(dim=1) == yb).sum())
    return total / n, (correct / n if classify else float("nan"))


def _private_randomness(net: nn.Module, X: Tensor, seed: int,
                        device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The private generators of a training run — batch order (CPU, seeded with ``seed``
    itself) and dropout (on the model's device) — with ``net``'s dropout modules switched to
    the latter. Then one forward pass of ``net`` in training mode checks that nothing else
    draws from torch's global RNG (``F.dropout`` in a custom ``forward``, a dropout subclass
    with its own ``forward``, ``torch.rand`` in a layer...): such a model is refused, with the
    caller's global state restored, because its run could not be reproduced from ``seed``."""
    shuffle = make_generator(seed, "cpu")
    dropout = make_generator(derive_seed(seed, "dropout"), device)
    seed_dropout(net, dropout)
    before, start = global_rng_state(device), dropout.get_state()
    modes = [m.training for m in net.modules()]
    try:
        with torch.no_grad(), frozen_running_stats(net):
            net.train()
            net(X[:2])
    finally:
        for m, mode in zip(net.modules(), modes):
            m.training = mode
        dropout.set_state(start)  # the probe's draws do not count
        after = global_rng_state(device)
        drew = any(not torch.equal(a, b) for a, b in zip(before, after))
        if drew:
            torch.set_rng_state(before[0])
            if len(before) > 1:
                torch.cuda.set_rng_state(before[1], device)
    if drew:
        raise ValueError(
            "the model draws from torch's global random number generator in training mode "
            "(e.g. torch.nn.functional.dropout in a custom forward, or a dropout subclass with "
            "its own forward): train() draws only from private generators seeded by `seed`, "
            "so such a run could not be reproduced. Use nn.Dropout / Dropout1d/2d/3d / "
            "AlphaDropout modules (train() seeds those) instead. Your global RNG state was "
            "restored."
        )
    return shuffle, dropout


def train(
    model: nn.Module,
    train_data,
    test_data=None,
    method: str = "sgd",
    *,
    lam: float | None = None,
    rho: float | None = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    layer: str | None = None,
    loss="cross_entropy",
    normalize: str | None = None,
    gradient: str = "exact",
    eta: float = ASAM_ETA,
    seed: int | None = None,
    callbacks: Sequence[Callable] = (),
    progress: bool = True,
    track_kappa: bool = True,
    optimizer="sgd",
    device=None,
) -> tuple[nn.Module, History]:
    """Train a copy of ``model`` with SGD, FAM, SAM or ASAM; return ``(trained, history)``.

    All methods share the base optimizer — SGD with ``lr``, ``momentum`` and ``weight_decay`` —
    and the mini-batches, so runs from one initialization differ only by the method:

    * ``"sgd"``: the mini-batch loss.
    * ``"fam"`` (Adilova et al. 2023): loss + λ·κ(W) of ``layer`` on the mini-batch
      (:func:`penalty`; ``normalize``, ``gradient`` apply).
    * ``"sam"`` (Foret et al. 2021) / ``"asam"`` (Kwon et al. 2021): :class:`SAM` around SGD
      with radius ``rho`` (and ``eta`` for ASAM).

    The input model is never modified (a deep copy is trained; its train/eval modes are restored
    at the end).

    Randomness: the initialization is the caller's (the model as passed). Everything random in
    training comes from private ``torch.Generator`` objects seeded from ``seed`` (an exact
    integer): the batch order of every epoch, the dropout masks (the copy's ``nn.Dropout``,
    ``Dropout1d/2d/3d``, ``AlphaDropout`` and ``FeatureAlphaDropout`` modules draw from one;
    the returned model has the plain torch modules back) and κ when it is estimated. torch's
    global RNG is never drawn from or reseeded, so the same seed and settings give the same
    model and history (up to ``time_per_step``) whatever else the process draws, also for runs
    in parallel threads. A model that draws from the global RNG in training mode in another way
    (``torch.nn.functional.dropout`` in a custom ``forward``) cannot be reproduced from
    ``seed``: one forward pass of the copy, with the global RNG state read before and after,
    detects it, and the model is refused with a ``ValueError`` (the state restored).
    Callbacks run outside this: if they draw random numbers, they draw from the caller's
    generators.

    Args:
        model: the network (not modified).
        train_data: ``(X, y)`` or a list of ``(X, y)`` batches (gathered into tensors and
            re-batched: ``batch_size`` decides the mini-batches), or a ``DataLoader`` (any
            re-iterable of batches): its own batches are the mini-batches and it is re-read
            every epoch, so its shuffling and augmentation stay live; it is read under a
            private random state seeded from ``seed``.
        test_data: optional held-out data (the same forms) for the test columns of the history.
        method: one of :data:`METHODS`.
        lam: FAM's λ ≥ 0 (default :data:`DEFAULT_LAM`); ignored by other methods (recorded as
            None).
        rho: SAM/ASAM radius ρ ≥ 0 (default :data:`DEFAULT_RHO`); ignored by SGD and FAM.
        epochs: passes over the training data (≥ 1).
        lr, momentum, weight_decay: the SGD base optimizer (lr > 0, 0 ≤ momentum < 1,
            weight_decay ≥ 0).
        batch_size: mini-batch size (≥ 1, default :data:`DEFAULT_BATCH_SIZE`) for tensor
            data; the last batch of an epoch may be smaller. A ``DataLoader`` makes its own
            batches (passing ``batch_size`` with one is an error).
        layer: the feature layer, an ``nn.Linear`` or ``nn.Conv2d`` (FAM's penalty and the
            tracked κ); ``None``: the last ``nn.Linear`` module (:func:`last_linear`).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar``.
        normalize: FAM penalty κ (``None``) or κ/m (``"m"``).
        gradient: FAM penalty gradient, ``"exact"`` or ``"frozen"`` (see :func:`penalty`).
        eta: ASAM's η.
        seed: an integer in ``[0, 2**64)`` for the batch order and dropout (a float, bool or
            negative number is refused); ``None`` draws one from the OS (recorded in
            ``history.seed``, which reproduces the run).
        callbacks: functions ``callback(epoch, model, history)`` called after every epoch with
            the model being trained (do not modify it) and the history so far. Returning
            ``True`` or raising :class:`StopTraining` ends training after that epoch
            (``history.stopped_early`` is then True).
        progress: show a ``tqdm`` progress bar over epochs.
        track_kappa: compute κ on the full training data after every epoch.
        optimizer: the base optimizer under every method: ``"sgd"`` (with ``momentum``,
            the default) or ``"adam"``, both with ``lr`` and ``weight_decay``; or a factory
            ``params -> torch.optim.Optimizer`` for any other (SAM/ASAM wrap it).
        device: train (and evaluate) on this device; default: the model's.

    Raises:
        ValueError: an unknown method/option, λ < 0, ρ < 0, epochs < 1, a layer that is not an
            ``nn.Linear``/``nn.Conv2d``, targets that do not fit the outputs, ...
        FloatingPointError: the loss became NaN or infinite (lower ``lr`` or ``lam``).

    Example (two moons; FAM from the same initialization as SGD):

    >>> from famviz import data, models
    >>> train_data, test_data = data.moons(n_samples=200, seed=0)
    >>> model = models.mlp([2, 16, 2], seed=0)
    >>> trained, history = train(model, train_data, test_data, method="fam", lam=0.01,
    ...                          epochs=3, seed=0, progress=False)
    >>> len(history), history.method, history.layer, history.penalty_path, trained is model
    (3, 'fam', '2', 'softmax', False)
    >>> sorted(history.to_dict())[:4]
    ['backward_passes', 'batch_loss', 'batch_size', 'device']
    """
    check_model(model)
    check_option("method", method, METHODS)
    check_option("gradient", gradient, GRADIENTS)
    check_normalize(normalize)
    epochs = number("epochs", epochs, low=1, integer=True)
    if batch_size is not None:
        batch_size = number("batch_size", batch_size, low=1, integer=True)
    seed = new_seed() if seed is None else check_seed("seed", seed)
    if not callable(optimizer):
        check_option("optimizer", optimizer, OPTIMIZERS)
    if isinstance(test_data, str):
        raise TypeError(f"test_data is the string {test_data!r}; pass the method by keyword: "
                        f"train(model, train_data, method={test_data!r})")
    if lam is not None:
        number("lam", lam, low=0.0)
    if rho is not None:
        number("rho", rho, low=0.0)
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables, got {type(cb).__name__}")
    layer_name, _ = _layer(model, layer)
    loss_name, loss_fn = resolve_loss(loss)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("the model has no parameters")
    dtype = first.dtype
    device = check_device(device) or first.device
    train_set = _Data(train_data, "train_data", dtype, device, loss_name, seed)
    test_set = (None if test_data is None
                else _Data(test_data, "test_data", dtype, device, loss_name, seed))
    if train_set.live:
        if batch_size is not None:
            raise ValueError("batch_size: train_data is a DataLoader (re-read every epoch), "
                             "which makes its own mini-batches; drop batch_size or set the "
                             "DataLoader's batch_size")
        batch_size = train_set.stream.max_batch
        last_batch = train_set.stream.min_batch
    else:
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        last_batch = train_set.num_samples % batch_size
    if (last_batch == 1 and train_set.num_samples > 1
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())):
        raise ValueError(
            f"{train_set.num_samples} training samples in batches of {batch_size} leave a batch "
            "of one sample, which BatchNorm cannot normalize in training mode; choose a "
            "batch_size that does not leave a remainder of 1 (or drop_last=True)"
        )

    # the trained copy: a replica that owns its parameters and buffers (hooks kept)
    net = replicate(model, {n: p.detach().to(device, copy=True)
                            for n, p in model.named_parameters()},
                    {n: b.detach().to(device, copy=True) for n, b in model.named_buffers()})
    modes = [m.training for m in net.modules()]
    with torch.no_grad(), _eval_modes(net):  # clear errors before any training
        for what, part in (("train_data", train_set), ("test_data", test_set)):
            if part is None:
                continue
            inputs = part.first_inputs()
            try:
                out = net(inputs)
            except RuntimeError as exc:
                raise ValueError(f"{what}: the model cannot evaluate inputs of shape "
                                 f"{tuple(inputs.shape[1:])} (per sample): {exc}") from exc
            if loss_name in LOSSES:
                part.stream.scan(lambda i, X, y: check_targets(loss_name, tuple(out.shape), y))

    step = make_step(net, method, lam=lam, rho=rho, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, layer=layer_name, loss=loss, normalize=normalize,
                     gradient=gradient, eta=eta, optimizer=optimizer)
    is_fam, is_sam = method == "fam", method in ("sam", "asam")
    history = History(
        method=method, layer=layer_name, loss=loss_name, seed=seed, epochs=epochs,
        lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
        batch_size=batch_size, lam=step.lam if is_fam else None,
        rho=step.optimizer.rho if is_sam else None,
        eta=float(eta) if method == "asam" else None,
        normalize=normalize if is_fam else None, gradient=gradient if is_fam else None,
        penalty_path=None, num_train=train_set.num_samples,
        num_test=0 if test_set is None else test_set.num_samples,
        optimizer=optimizer if isinstance(optimizer, str) else getattr(
            optimizer, "__name__", type(optimizer).__name__),
        device=str(device),
    )

    from tqdm.auto import tqdm  # noqa: PLC0415 (kept out of the core's import time)

    shuffle, _ = _private_randomness(net, train_set.first_inputs(), seed, device)
    bar = tqdm(range(1, epochs + 1), desc=f"{method}", disable=not progress, leave=False)
    try:
        for epoch in bar:
            net.train()
            seconds, losses, pens, fwd, bwd, steps = 0.0, [], [], 0, 0, 0
            for xb, yb in train_set.epoch(batch_size, shuffle):
                t0 = time.perf_counter()
                info = step(xb, yb)
                seconds += time.perf_counter() - t0
                if not math.isfinite(info.loss) or (is_fam and not math.isfinite(info.penalty)):
                    raise FloatingPointError(
                        f"{method}: the loss became {info.loss} (penalty {info.penalty}) in "
                        f"epoch {epoch}; lower lr{' or lam' if is_fam else ''}")
                losses.append(info.loss)
                pens.append(info.penalty)
                fwd += info.forward_passes
                bwd += info.backward_passes
                steps += 1
            for m, mode in zip(net.modules(), modes):
                m.training = mode
            tr_loss, tr_acc = _evaluate(net, train_set, loss_fn)
            te_loss, te_acc = _evaluate(net, test_set, loss_fn)
            kappa = float("nan")
            if track_kappa:
                from ..measures.relative import relative_flatness  # noqa: PLC0415

                kappa = relative_flatness(net, train_set.for_measures(), layer_name, loss,
                                          seed=derive_seed(seed, "kappa")).value
            if is_fam and history.penalty_path is None:
                history = _replace(history, penalty_path=step.path)
            history = history._append(
                epoch=epoch, train_loss=tr_loss, train_accuracy=tr_acc, test_loss=te_loss,
                test_accuracy=te_acc, kappa=kappa, batch_loss=sum(losses) / len(losses),
                penalty=sum(pens) / len(pens), time_per_step=seconds / steps,
                forward_passes=fwd, backward_passes=bwd, steps=steps,
            )
            bar.set_postfix(loss=f"{tr_loss:.4f}", acc=f"{tr_acc:.3f}",
                            kappa=f"{kappa:.4g}", refresh=False)
            stop = False
            for cb in callbacks:
                try:
                    stop = bool(cb(epoch, net, history)) or stop
                except StopTraining:
                    stop = True
            if stop:
                if epoch < epochs:
                    history = _replace(history, stopped_early=True)
                break
    finally:
        bar.close()
        unseed_dropout(net)
        for m, mode in zip(net.modules(), modes):
            m.training = mode
        for p in net.parameters():
            p.grad = None
    return net, history

