r"""Log-probabilities of a sign pattern under a centred Gaussian: the integral behind
:func:`famviz.measures.prior_volume`.

For a kernel :math:`K` (n × n), signs :math:`f \in \{\pm1\}^n` and a probit noise variance
:math:`s^2 \ge 0`,

.. math::

    Z = \int \mathcal N(g; 0, K) \prod_i \Phi\!\left(\frac{f_i g_i}{s}\right) dg
      = P\big(f_i h_i > 0 \ \forall i\big),\quad h \sim \mathcal N(0, K + s^2 I),

an orthant probability (:math:`s = 0`: the step likelihood, :math:`Z = P(\mathrm{sign}(g) = f)`).
Three routines compute :math:`\log Z`, all in float64:

* :func:`log_orthant_ep`: expectation propagation (Rasmussen & Williams 2006, Alg. 3.5 with
  all sites updated in parallel and damped; :math:`\log Z_{EP}` of their eq. 3.65 written in
  site natural parameters, so sites of zero precision are harmless). O(n³) per iteration.
* :func:`log_orthant_exact`: closed forms for n ≤ 3, Genz's quasi-Monte-Carlo integration
  (``scipy.stats.multivariate_normal.cdf``) with an error from replicates up to
  :data:`EXACT_MAX_N`.
* :func:`log_orthant_mc`: the GHK / Genz separation-of-variables importance sampler with
  Botev's minimax exponential tilting, unbiased for :math:`Z`, with a standard error;
  independent of EP, the reference for large n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EPReport",
    "log_orthant_ep",
    "ep_posterior",
    "log_orthant_exact",
    "log_orthant_mc",
    "minimax_tilt",
    "EXACT_MAX_N",
    "JITTER",
]

#: the largest n for which :func:`log_orthant_exact` runs (Genz's integration is accurate to
#: about 1e-7 relative there in a fraction of a second; beyond, use EP or Monte-Carlo)
EXACT_MAX_N = 10
#: added to the diagonal, relative to its mean, where a Cholesky factor of K + s²I is needed and
#: K may be singular (s = 0: duplicate inputs, a low-rank kernel)
JITTER = 1e-10
#: integrand evaluations per replicate of scipy's randomized quasi-Monte-Carlo integrator, and
#: independent replicates (their spread is the reported error: about 1e-4 nats at n = 8)
EXACT_MAXPTS = 100_000
EXACT_REPLICATES = 4
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class EPReport:
    """How expectation propagation ended.

    Attributes:
        iterations: parallel sweeps over all sites.
        converged: the change of :math:`\\log Z` stayed below ``tol`` for two sweeps in a row.
        delta: the last change of :math:`\\log Z` (nats).
        damping: the damping factor used (1 = undamped).
        tol: the tolerance asked for.
    """

    iterations: int
    converged: bool
    delta: float
    damping: float
    tol: float


def _signs(K: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    K = torch.as_tensor(K, dtype=torch.float64)
    f = torch.as_tensor(f, dtype=torch.float64).reshape(-1)
    return K, f


def _tilted(m: Tensor, v: Tensor, f: Tensor, s2: float):
    """Moments of N(g; m, v) Φ(f g / s): log of its mass, its mean and its variance."""
    sd = torch.sqrt(v + s2)
    z = f * m / sd
    log_z = torch.special.log_ndtr(z)
    r = torch.exp(-0.5 * z * z - _LOG_SQRT_2PI - log_z)  # N(z)/Φ(z) without overflow
    mean = m + f * v * r / sd
    shrink = (v / (v + s2)) * r * (z + r)  # in (0, 1): the variance removed by the likelihood
    var = v * torch.clamp(1 - shrink, min=torch.finfo(torch.float64).eps)
    return log_z, mean, var


def log_orthant_ep(
    K: Tensor, f: Tensor, noise: float, *, damping: float = 0.5, tol: float = 1e-9,
    max_iter: int = 500,
) -> tuple[float, EPReport]:
    log_z, report, _ = ep_posterior(K, f, noise, damping=damping, tol=tol, max_iter=max_iter)
    return log_z, report


def ep_posterior(
    K: Tensor, f: Tensor, noise: float, *, damping: float = 0.5, tol: float = 1e-9,
    max_iter: int = 500,
) -> tuple[float, EPReport, Tensor]:
    r"""EP approximation of :math:`\log Z` (module docstring), float64.

    Sites :math:`\tilde t_i(g_i) = c_i \exp(-\tfrac12\tilde\tau_i g_i^2 + \tilde\nu_i g_i)` are
    all updated at once from the current cavities and damped,
    :math:`\tilde\tau \leftarrow (1-\delta)\tilde\tau + \delta\tilde\tau^{new}`; the posterior
    :math:`\Sigma = (K^{-1} + \tilde S)^{-1}` is recomputed through the Cholesky factor of
    :math:`B = I + \tilde S^{1/2} K \tilde S^{1/2}` (never :math:`K^{-1}`). With
    :math:`\mu = \Sigma\tilde\nu`,

    .. math::

        \log Z_{EP} = \sum_i \log c_i - \tfrac12 \log|B| + \tfrac12 \tilde\nu^\top \mu,

    where :math:`c_i` makes cavity × site integrate to the tilted mass :math:`\hat Z_i`.

    Returns:
        ``(log_z, report)``; :func:`ep_posterior` also returns the posterior mean of g.
    """
    K, f = _signs(K, f)
    n = K.shape[0]
    s2 = float(noise)
    # an output with zero prior variance (a zero input without biases) is the constant 0: it
    # contributes Φ(0) = 1/2 with noise > 0, which the jitter keeps finite
    K = K + JITTER * max(float(torch.diagonal(K).mean()), 0.0) * torch.eye(n, dtype=K.dtype)
    tau = torch.zeros(n, dtype=torch.float64)
    nu = torch.zeros(n, dtype=torch.float64)
    diag_k = torch.diagonal(K).clone()
    sigma, mu = diag_k.clone(), torch.zeros(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    log_z, previous, delta, calm, it = math.nan, math.nan, math.inf, 0, 0
    for it in range(1, max_iter + 1):
        tau_c = 1 / sigma - tau
        nu_c = mu / sigma - nu
        ok = tau_c > 0  # a site whose cavity is improper keeps its old value this sweep
        tau_c_safe = torch.where(ok, tau_c, torch.ones_like(tau_c))
        v = 1 / tau_c_safe
        _, mean, var = _tilted(nu_c * v, v, f, s2)
        tau_new = torch.clamp(1 / var - tau_c_safe, min=0.0)  # log-concave: precisions >= 0
        nu_new = mean / var - nu_c
        tau = torch.where(ok, (1 - damping) * tau + damping * tau_new, tau)
        nu = torch.where(ok, (1 - damping) * nu + damping * nu_new, nu)
        # posterior through B = I + S^1/2 K S^1/2
        sq = torch.sqrt(tau)
        L = torch.linalg.cholesky(eye + sq[:, None] * K * sq[None, :])
        V = torch.linalg.solve_triangular(L, sq[:, None] * K, upper=False)
        sigma = torch.clamp(diag_k - (V * V).sum(0), min=torch.finfo(torch.float64).tiny)
        mu = K @ nu - V.T @ (V @ nu)
        log_z = _ep_log_z(sigma, mu, tau, nu, L, f, s2)
        delta = abs(log_z - previous) if math.isfinite(previous) else math.inf
        previous = log_z
        calm = calm + 1 if delta < tol else 0
        if calm >= 2:
            break
    return log_z, EPReport(iterations=it, converged=calm >= 2, delta=delta, damping=damping,
                           tol=tol), mu


def _ep_log_z(sigma, mu, tau, nu, L, f, s2) -> float:
    tau_c = 1 / sigma - tau
    tau_c = torch.clamp(tau_c, min=torch.finfo(torch.float64).tiny)
    m_c = (mu / sigma - nu) / tau_c
    log_hat, _, _ = _tilted(m_c, 1 / tau_c, f, s2)
    # log c_i: cavity x site has mass Zhat_i (site natural parameters; tau_i = 0 is fine)
    log_c = (log_hat + 0.5 * m_c * m_c * tau_c - 0.5 * mu * mu / sigma
             - 0.5 * torch.log(sigma * tau_c))
    return float(log_c.sum() - torch.log(torch.diagonal(L)).sum() + 0.5 * (nu @ mu))


def _orthant_cov(K: Tensor, f: Tensor, noise: float) -> np.ndarray:
    """D (K + s² I + jitter) D with D = diag(f), as numpy."""
    n = K.shape[0]
    jitter = JITTER * float(torch.diagonal(K).mean()) if noise == 0 else 0.0
    C = K + (noise + jitter) * torch.eye(n, dtype=torch.float64, device=K.device)
    return (f[:, None] * C * f[None, :]).cpu().numpy()


def log_orthant_exact(K: Tensor, f: Tensor, noise: float, *, seed: int = 0) -> tuple[float, float]:
    r""":math:`\log Z` for n ≤ :data:`EXACT_MAX_N`: closed forms for n ≤ 3 (Sheppard's
    :math:`\tfrac14 + \arcsin\rho/2\pi`, and :math:`\tfrac18 + \sum_{i<j}\arcsin\rho_{ij}/4\pi`),
    otherwise Genz's randomized quasi-Monte-Carlo integration
    (``scipy.stats.multivariate_normal.cdf``), :data:`EXACT_REPLICATES` seeded replicates of
    :data:`EXACT_MAXPTS` points averaged in log space.

    Returns:
        ``(log_z, error)``: ``error`` is the standard error of ``log_z`` over the replicates
        (0 for the closed forms).
    """
    K, f = _signs(K, f)
    n = K.shape[0]
    C = _orthant_cov(K, f, noise)
    if n <= 3:
        d = np.sqrt(np.diag(C))
        R = C / d[:, None] / d[None, :]
        if n == 1:
            p = 0.5
        elif n == 2:
            p = 0.25 + math.asin(float(np.clip(R[0, 1], -1, 1))) / (2 * math.pi)
        else:
            rho = [float(np.clip(R[i, j], -1, 1)) for i, j in ((0, 1), (0, 2), (1, 2))]
            p = 0.125 + sum(math.asin(r) for r in rho) / (4 * math.pi)
        return (math.log(p) if p > 0 else -math.inf), 0.0
    from scipy.stats import multivariate_normal

    # P(D h > 0) = P(-D h < 0): the cdf at 0 of N(0, D C D) (centred, symmetric); replicates
    # with independent randomizations give the error (scipy reports none)
    rng = np.random.default_rng(seed)
    logs = np.log([multivariate_normal.cdf(np.zeros(n), mean=np.zeros(n), cov=C,
                                           allow_singular=True, maxpts=EXACT_MAXPTS,
                                           abseps=0.0, releps=0.0, rng=rng)
                   for _ in range(EXACT_REPLICATES)])
    return float(logs.mean()), float(logs.std(ddof=1) / math.sqrt(EXACT_REPLICATES))


def log_orthant_mc(
    K: Tensor, f: Tensor, noise: float, *, samples: int = 1000, seed: int = 0,
    tilt: bool = True,
) -> tuple[float, float]:
    r"""Monte-Carlo :math:`\log Z` by the GHK / separation-of-variables sampler.

    With :math:`C = D(K + s^2 I)D = LL^\top` and :math:`h = Lw`, the event :math:`h > 0` is
    :math:`w_i > a_i(w_{<i}) = -\sum_{j<i} L_{ij} w_j / L_{ii}` for every i; drawing each
    :math:`w_i` from the standard normal truncated to that half-line gives the unbiased weight
    :math:`\prod_i \Phi(-a_i)`. Variables are taken in Genz & Bretz's order (at each step the
    one with the smallest conditional probability), which cuts the variance.

    With ``tilt`` (the default) each :math:`w_i` is drawn from :math:`\mathcal N(\mu_i, 1)`
    truncated instead, :math:`\mu` from Botev (2017)'s minimax problem (solved by Newton's
    method, :func:`minimax_tilt`); the weight becomes
    :math:`\exp\psi(w;\mu) = \prod_i \Phi(\mu_i - a_i)\, e^{\mu_i^2/2 - \mu_i w_i}`, still
    unbiased, with a relative error that stays bounded as :math:`Z \to 0`. Without it the
    weights of the tiny orthant probabilities of large n are heavy-tailed, and the log of their
    mean is then biased low.

    Returns:
        ``(log_z, stderr)``: the log of the mean weight and its standard error (delta
        method: std(weights) / (mean · √samples)).
    """
    from scipy.special import log_ndtr, ndtri_exp

    K, f = _signs(K, f)
    C = _orthant_cov(K, f, noise)
    L, order = _genz_bretz_cholesky(C)
    n = len(order)
    mu = minimax_tilt(L) if tilt else np.zeros(n)
    rng = np.random.default_rng(seed)
    W = np.zeros((samples, n))
    log_w = np.zeros(samples)
    for i in range(n):
        a = -(W[:, :i] @ L[i, :i]) / L[i, i]
        m = mu[i]
        log_p = log_ndtr(m - a)  # P(N(m, 1) > a)
        u = rng.random(samples)
        # w_i - m ~ N(0,1) truncated to (a - m, inf): inverse cdf in log space (no underflow)
        W[:, i] = m - ndtri_exp(np.log(u) + log_p)
        log_w += log_p + 0.5 * m * m - m * W[:, i]
    top = log_w.max()
    w = np.exp(log_w - top)
    mean = w.mean()
    stderr = float(w.std(ddof=1) / (mean * math.sqrt(samples))) if samples > 1 else math.nan
    return float(top + math.log(mean)), stderr


def minimax_tilt(L: np.ndarray, *, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    r"""Botev (2017)'s tilt for the orthant :math:`Lw > 0`: the saddle point of

    .. math::

        \psi(x; \mu) = \sum_k \tfrac12\mu_k^2 - x_k\mu_k + \log\Phi(t_k),\qquad
        t = \mu + A x,\ A_{kj} = L_{kj}/L_{kk}\ (j < k),

    i.e. :math:`\mu - x + r = 0` and :math:`-\mu + A^\top r = 0` with
    :math:`r = \varphi(t)/\Phi(t)`, by Newton's method with backtracking on the gradient norm
    (Jacobian: :math:`r' = -r(t + r)`). Returns :math:`\mu`."""
    from scipy.special import log_ndtr

    n = L.shape[0]
    A = np.tril(L, -1) / np.diag(L)[:, None]
    eye = np.eye(n)

    def grad(mu, x):
        t = mu + A @ x
        r = np.exp(-0.5 * t * t - _LOG_SQRT_2PI - log_ndtr(t))
        return np.concatenate([mu - x + r, -mu + A.T @ r]), t, r

    mu, x = np.zeros(n), np.zeros(n)
    g, t, r = grad(mu, x)
    for _ in range(max_iter):
        norm = np.linalg.norm(g)
        if norm < tol:
            break
        D = -r * (t + r)
        J = np.block([[eye + np.diag(D), -eye + D[:, None] * A],
                      [-eye + A.T * D[None, :], (A.T * D[None, :]) @ A]])
        step = np.linalg.solve(J, -g)
        lam = 1.0
        while lam > 1e-8:
            g_new, t_new, r_new = grad(mu + lam * step[:n], x + lam * step[n:])
            if np.all(np.isfinite(g_new)) and np.linalg.norm(g_new) < norm:
                break
            lam /= 2
        mu, x = mu + lam * step[:n], x + lam * step[n:]
        g, t, r = g_new, t_new, r_new
    return mu


def _genz_bretz_cholesky(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor of C permuted in Genz & Bretz's order: at step i, the remaining variable
    with the smallest probability of its half-line (the largest expected truncation) given the
    expected values of the previous ones comes next. Returns (L, order) with
    ``L @ L.T == C[order][:, order]``."""
    from scipy.special import log_ndtr, ndtr

    C = C.copy()
    n = C.shape[0]
    order = np.arange(n)
    L = np.zeros_like(C)
    y = np.zeros(n)  # expected values of the conditioned standard normals
    for i in range(n):
        # conditional mean and sd of each remaining h_k given the ones placed so far
        m = L[i:, :i] @ y[:i]
        var = np.clip(np.diag(C)[i:] - (L[i:, :i] ** 2).sum(1), 1e-300, None)
        k = i + int(np.argmin(log_ndtr(m / np.sqrt(var))))
        if k != i:  # swap i and k everywhere
            order[[i, k]] = order[[k, i]]
            C[[i, k], :] = C[[k, i], :]
            C[:, [i, k]] = C[:, [k, i]]
            L[[i, k], :] = L[[k, i], :]
        d = C[i, i] - L[i, :i] @ L[i, :i]
        if d <= 0:
            raise ValueError("the kernel is not positive definite (after jitter); "
                             "use noise > 0")
        L[i, i] = math.sqrt(d)
        L[i + 1:, i] = (C[i + 1:, i] - L[i + 1:, :i] @ L[i, :i]) / L[i, i]
        # expected value of w_i truncated to w_i > a with a = -m_i / L_ii
        a = -(L[i, :i] @ y[:i]) / L[i, i]
        tail = max(ndtr(-a), 1e-300)
        y[i] = math.exp(-0.5 * a * a - _LOG_SQRT_2PI) / tail
    return L, order
