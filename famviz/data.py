"""Small real datasets that need no download: scikit-learn's bundled 8x8 digits and two moons.

Every function returns float32 tensors ``(X, y), (X_test, y_test)`` with integer class labels
(``torch.long``) and uses only the ``seed`` it is given, never the global RNG.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["digits", "moons"]


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value < 1):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")


def _split(X: np.ndarray, y: np.ndarray, test_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    if test_size == 0:
        X_tr, X_te, y_tr, y_te = X, X[:0], y, y[:0]
    else:
        X_tr, X_te, y_tr, y_te = train_test_split(
            X, y, test_size=test_size, random_state=seed, stratify=y
        )

    def pair(a, b):
        return torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.long)

    return pair(X_tr, y_tr), pair(X_te, y_te)


def digits(test_size: float = 0.25, seed: int = 0):
    """The 1797 handwritten 8x8 digits bundled with scikit-learn, pixels scaled to [0, 1].

    Args:
        test_size: fraction held out, split stratified by class; 0 returns empty test tensors.
        seed: seed of the split.

    Returns:
        ``(X, y), (X_test, y_test)`` with ``X`` of shape (n, 64) float32 and ``y`` long in 0..9.

    >>> (X, y), (Xt, yt) = digits(test_size=0.25, seed=0)
    >>> X.shape, Xt.shape, float(X.max()) <= 1.0
    (torch.Size([1347, 64]), torch.Size([450, 64]), True)
    """
    from sklearn.datasets import load_digits

    _check_fraction("test_size", test_size, allow_zero=True)
    bunch = load_digits()
    X = bunch.data.astype(np.float32) / 16.0  # pixel intensities are 0..16
    return _split(X, bunch.target.astype(np.int64), test_size, seed)


def moons(
    n_samples: int = 500,
    noise: float = 0.2,
    label_noise: float = 0.0,
    test_size: float = 0.25,
    seed: int = 0,
):
    """Two interleaving half circles (scikit-learn's ``make_moons``), optionally with flipped labels.

    Args:
        n_samples: total number of points before the split.
        noise: standard deviation of Gaussian noise added to the coordinates.
        label_noise: fraction of *training* labels flipped (test labels stay clean), for
            studies of memorization.
        test_size: held-out fraction (stratified).
        seed: seed of the sampling, the split and the label flips.

    Returns:
        ``(X, y), (X_test, y_test)`` with ``X`` of shape (n, 2) float32 and ``y`` long in {0, 1}.

    >>> (X, y), _ = moons(n_samples=100, label_noise=0.1, seed=1)
    >>> X.shape, sorted(set(y.tolist()))
    (torch.Size([75, 2]), [0, 1])
    """
    from sklearn.datasets import make_moons

    if n_samples < 4:
        raise ValueError(f"n_samples must be at least 4, got {n_samples}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    _check_fraction("label_noise", label_noise, allow_zero=True)
    _check_fraction("test_size", test_size, allow_zero=True)
    X, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    (X_tr, y_tr), test = _split(X.astype(np.float32), y.astype(np.int64), test_size, seed)
    if label_noise > 0:
        rng = np.random.default_rng(seed)
        n_flip = int(round(label_noise * len(y_tr)))
        idx = rng.choice(len(y_tr), size=n_flip, replace=False)
        y_tr = y_tr.clone()
        y_tr[idx] = 1 - y_tr[idx]
    return (X_tr, y_tr), test
