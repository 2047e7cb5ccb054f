"""Relative flatness (Petzka, Kamp, Adilova, Sminchisescu, Boley — NeurIPS 2021).

For a feature layer with weight :math:`W \\in \\mathbb R^{d\\times m}` (rows :math:`w_s`, the
incoming weights of output neuron s):

.. math::

    \\kappa(W) = \\sum_{s,s'=1}^{d} \\langle w_s, w_{s'}\\rangle\\, \\mathrm{Tr}(H_{s,s'}),
    \\qquad H_{s,s'} = \\frac{\\partial^2 E}{\\partial w_s\\,\\partial w_{s'}},

i.e. :math:`\\kappa = \\langle WW^\\top, T\\rangle_F` with the d×d matrix of block traces
:math:`T_{ss'} = \\mathrm{Tr}(H_{s,s'})`. It is the expected second-order loss increase when the
features are perturbed multiplicatively, :math:`\\phi \\to (I + \\delta A)\\phi`, and is unchanged
by layer-wise and neuron-wise rescalings (docs/math.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._memory import DEFAULT_MEMORY_BUDGET, check_memory_budget, chunks, nbytes, rows_per_chunk
from .._progress import check_progress
from ..curvature import (
    HessianOperator,
    generator,
    hvp_progress,
    linear_pullback,
    new_seed,
    piecewise_linear_after,
    probe_rows,
    rademacher,
)
from ..objective import (
    LOSSES,
    Objective,
    ObjectiveInfo,
    check_option,
    check_seed,
    resolve_layer,
    resolve_params,
)
from ..patches import LAYER_TYPES, check_layer, per_sample_vectors, weight_shape
from ..patches import closed_form as _shared_closed_form
from ..piecewise import piecewise_linear_graph
from ..replica import shared_names
from ._base import check_count

__all__ = [
    "RelativeFlatnessResult",
    "relative_flatness",
    "METHODS",
    "VARIANTS",
    "NORMALIZATIONS",
]

METHODS = ("auto", "closed_form", "exact", "hutchinson", "hutchinson_kappa")
#: "kappa": the paper's measure; "neuronwise_max": sum_s ||w_s||^2 lambda_max(H_ss)
VARIANTS = ("kappa", "neuronwise_max")
#: None: the paper's unnormalized kappa; "m": divided by the number of input features
NORMALIZATIONS = (None, "m")
#: with method="auto", exact block traces from HVPs are used up to this many (= d*m) HVPs
AUTO_EXACT_MAX_HVPS = 4096
#: default number of Hutchinson probes (each costs d HVPs; one with "hutchinson_kappa")
DEFAULT_PROBES = 64
#: rank of "hutchinson_kappa"'s random matrices Z = AB^T/sqrt(k): on a tanh MLP, rank 16 gave
#: a spread per probe within 1.2x of a full Rademacher Z (docs/conv.md)
PROBE_RANK = 32


@dataclass(frozen=True)
class RelativeFlatnessResult:
    """κ of one Linear or Conv2d layer; ``float(result)`` is κ (÷ m when ``normalize="m"``).

    Attributes:
        value: κ, the headline number.
        block_traces: the d×d matrix :math:`T_{ss'} = \\mathrm{Tr}(H_{s,s'})` (an estimate for
            Hutchinson; for ``"hutchinson_kappa"`` an estimate of :math:`TP`, P the projection
            onto the span of :math:`WW^\\top`, which is T when W has full row rank), as float64
            numpy.
        layer: module name of the feature layer; ``shape`` its weight as a matrix (d, m)
            (a Conv2d's (out_channels, in_channels·kh·kw)).
        method: ``"closed_form"``, ``"exact"``, ``"hutchinson"`` or ``"hutchinson_kappa"``.
        variant, normalize, normalize_features: the options used.
        stderr: standard error for Hutchinson, else 0.0.
        num_hvps: Hessian-vector products used (0 for the closed form).
        seed: Hutchinson's seed, else None.
        objective: loss, number of samples, BatchNorm policy, dtype, device.
        memory_budget: the memory budget in bytes the call ran with.
    """

    value: float
    block_traces: np.ndarray = field(repr=False)
    layer: str
    shape: tuple[int, int]
    method: str
    variant: str
    normalize: str | None
    normalize_features: bool
    stderr: float
    num_hvps: int
    seed: int | None
    objective: ObjectiveInfo
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    @property
    def T(self) -> np.ndarray:
        """Alias of :attr:`block_traces`."""
        return self.block_traces

    def __float__(self) -> float:
        return self.value


def _closed_form(obj: Objective, layer: str):
    """T (d×d) and κ from the Gauss-Newton pull-back:
    :math:`T = \\frac1N\\sum_n \\|\\phi_n\\|^2 \\Delta_n\\Delta_n^\\top`. κ comes from
    :meth:`Pullback.gram_and_kappa` (a sum of non-negative terms, so float32 stays accurate and
    non-negative near zero cross-entropy, where ⟨WWᵀ, T⟩ cancels)."""
    T = kappa = None
    W = obj.params[f"{layer}.weight"].detach()
    for batch in linear_pullback(obj, [layer]):
        pb = batch[layer]
        phi2 = pb.phi.pow(2).sum(dim=1)
        t, k = pb.gram_and_kappa(W, phi2)
        T, kappa = (t, k) if T is None else (T + t, kappa + k)
    N = obj.num_samples
    return T / N, kappa / N


def _block_rows(d: int, m: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Neurons whose m×m diagonal blocks are formed at once: their blocks and one block's
    temporaries (an eigendecomposition's workspace) within ``memory_budget``."""
    return min(d, rows_per_chunk(nbytes((m, m), dtype), memory_budget, copies=2))


def _closed_form_lambda_max(obj: Objective, layer: str, memory_budget: int) -> torch.Tensor:
    """:math:`\\lambda_{\\max}(H_{ss})` for every neuron s, with
    :math:`H_{ss} = \\frac1N\\sum_n (G_n)_{ss}\\,\\phi_n\\phi_n^\\top` (m×m) from the
    pull-back: the blocks of :func:`_block_rows` neurons at a time, one pass over the data per
    group of neurons (never the d×m×m tensor)."""
    W = obj.params[f"{layer}.weight"]
    d, m = W.shape
    size = _block_rows(d, m, obj.dtype, memory_budget)
    lam = torch.empty(d, dtype=obj.dtype, device=obj.device)
    for start, stop in chunks(d, size):
        blocks = torch.zeros(stop - start, m, m, dtype=obj.dtype, device=obj.device)
        for batch in linear_pullback(obj, [layer]):
            pb = batch[layer]
            diag = pb.diag()
            for j, s in enumerate(range(start, stop)):  # one (N_b, m) temporary at a time
                blocks[j] += (pb.phi * diag[:, s:s + 1]).T @ pb.phi
        lam[start:stop] = torch.linalg.eigvalsh(blocks / obj.num_samples)[:, -1]
    return lam


def _exact(op: HessianOperator, d: int, m: int, want_lambda: bool, memory_budget: int):
    """T and (if wanted) :math:`\\lambda_{\\max}(H_{ss})` from the d·m HVPs with unit vectors
    :math:`e_{s',k}`: :math:`T_{s s'} = \\sum_k (H e_{s',k})_{s,k}`,
    :math:`(H_{ss})_{kl} = (H e_{s,l})_{s,k}`. The columns come in chunks within
    ``memory_budget`` and in order, so a neuron's block is complete after its m columns: its
    λ_max is taken and the block dropped (a few m×m blocks alive, never d×m×m)."""
    T = torch.zeros(d, d, dtype=op.dtype, device=op.device)
    lam = torch.empty(d, dtype=op.dtype, device=op.device) if want_lambda else None
    pending: dict[int, torch.Tensor] = {}
    for idx, rows in op.columns(memory_budget):
        HE = rows.reshape(len(idx), d, m)  # HE[j, s, k] = (H e_{s'_j, k_j})_{s,k}
        s_col, k_col, j = idx // m, idx % m, torch.arange(len(idx), device=op.device)
        T.index_add_(1, s_col, HE[j, :, k_col].T)  # repeated columns accumulate
        if not want_lambda:
            continue
        for s in range(int(s_col[0]), int(s_col[-1]) + 1):
            sel = s_col == s
            block = pending.setdefault(s, torch.zeros(m, m, dtype=op.dtype, device=op.device))
            block[:, k_col[sel]] = HE[j[sel], s, :].T
            if int(k_col[sel][-1]) == m - 1:  # columns come in order: the block is complete
                lam[s] = torch.linalg.eigvalsh(pending.pop(s))[-1]
    return T, lam


def _hutchinson(op: HessianOperator, d: int, m: int, probes: int, seed: int, M: torch.Tensor,
                memory_budget: int):
    """T estimated with probes shared across rows: for Rademacher :math:`z \\in \\mathbb R^m`,
    :math:`\\mathbb E[(e_s\\otimes z)^\\top H (e_{s'}\\otimes z)] = \\mathrm{Tr}(H_{s,s'})`;
    each probe costs d HVPs, made for a chunk of rows :math:`e_{s'}\\otimes z` at a time
    (:func:`probe_rows` within ``memory_budget``; never the d×(d·m) block). Returns T̂ and
    the standard error of κ̂ over probes."""
    gen = generator(seed, op.device)
    size = probe_rows(op, memory_budget)
    total = torch.zeros(d, d, dtype=op.dtype, device=op.device)
    kappas = []
    for _ in range(probes):
        z = rademacher((m,), gen, op.device, op.dtype)
        est = torch.empty(d, d, dtype=op.dtype, device=op.device)  # [s, s']
        for start, stop in chunks(d, size):
            V = torch.zeros(stop - start, d, m, dtype=op.dtype, device=op.device)
            V[torch.arange(stop - start), torch.arange(start, stop)] = z  # e_{s'} ⊗ z
            R = op.matmat(V.reshape(stop - start, d * m)).reshape(stop - start, d, m)
            est[:, start:stop] = (R @ z).T
        total += est
        kappas.append((est * M).sum())
    kappas = torch.stack(kappas)
    stderr = float(kappas.std() / math.sqrt(probes)) if probes > 1 else float("nan")
    return total / probes, stderr


def _hutchinson_kappa(op: HessianOperator, W: torch.Tensor, probes: int, seed: int,
                      memory_budget: int):
    """κ itself by Hutchinson, one HVP per probe: for a random m×m matrix Z with
    :math:`\\mathbb E[Z_{jk}Z_{j'k'}] = \\delta_{jj'}\\delta_{kk'}` and V = WZ,

    .. math::

        \\kappa = \\sum_{s,s',k} \\langle w_s, w_{s'}\\rangle H_{(s,k),(s',k)}
               = \\mathbb E\\,[\\,\\mathrm{vec}(V)^\\top H\\,\\mathrm{vec}(V)\\,],

    the trace of :math:`(W\\otimes I)^\\top H (W\\otimes I)`, positive semi-definite where H is.
    Z = AB^T/√k with Rademacher A, B (m×k, k = :data:`PROBE_RANK` at most) costs 2dmk per
    probe. Since V moves with W, the estimate with a fixed seed is unchanged by T1, T3 and T5
    exactly, as κ is. With R = HV, :math:`\\mathbb E[RZ^\\top] = TW`, so
    :math:`\\hat T = \\overline{RZ^\\top}\\,W^+` estimates :math:`TWW^+` (T when W has full
    row rank) and :math:`\\langle WW^\\top, \\hat T\\rangle = \\hat\\kappa`.
    The factors A, B of all probes are drawn first (2·probes·m·k entries); the probes V and
    their products come in chunks of :func:`probe_rows` within ``memory_budget``.
    Returns T̂, the standard error and κ̂."""
    d, m = W.shape
    k = min(m, PROBE_RANK)
    gen = generator(seed, op.device)
    A_all = rademacher((probes, m, k), gen, op.device, op.dtype)
    B_all = rademacher((probes, m, k), gen, op.device, op.dtype) / math.sqrt(k)
    kappas, RZ = [], torch.zeros(d, m, dtype=op.dtype, device=op.device)
    for start, stop in chunks(probes, probe_rows(op, memory_budget)):
        A, B = A_all[start:stop], B_all[start:stop]
        n = stop - start
        V = (W @ A) @ B.transpose(1, 2)  # (n, d, m)
        R = op.matmat(V.reshape(n, d * m)).reshape(n, d, m)
        kappas.append((V * R).sum(dim=(1, 2)))
        RZ += ((R @ B) @ A.transpose(1, 2)).sum(dim=0)  # sum of R Z^T
    kappas = torch.cat(kappas)
    stderr = float(kappas.std() / math.sqrt(probes)) if probes > 1 else float("nan")
    T = (RZ / probes) @ torch.linalg.pinv(W)
    return T, stderr, float(kappas.mean())


def _is_output_layer(obj: Objective, layer: str) -> bool:
    """True when the layer's output is the model's output (and the layer runs once)."""
    probe = obj.layer_probe(layer)
    return probe.calls == 1 and probe.is_output


def _traced_piecewise_linear(obj: Objective, layer: str) -> bool:
    """The fx-graph check, traced in the modes the evaluations run in (a forward may branch
    on ``self.training``)."""
    with obj.modes():
        return piecewise_linear_graph(obj.model, layer, obj.bn)


def relative_flatness(
    model: nn.Module,
    data,
    layer: str,
    loss="cross_entropy",
    method: str = "auto",
    *,
    variant: str = "kappa",
    normalize: str | None = None,
    normalize_features: bool = False,
    probes: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> RelativeFlatnessResult:
    """Relative flatness κ of the ``nn.Linear`` or ``nn.Conv2d`` layer ``layer`` (Petzka et
    al. 2021).

    .. math::

        \\kappa(W) = \\sum_{s,s'} \\langle w_s, w_{s'}\\rangle\\,\\mathrm{Tr}(H_{s,s'})

    With cross-entropy on the last layer :math:`\\kappa = \\frac1N\\sum_n \\|\\phi_n\\|^2
    \\mathrm{Var}_{i\\sim p_n}(w_i)` (docs/math.md §1).

    A Conv2d (``groups=1``; any stride, padding, padding mode, dilation) is a Linear map on
    unfolded patches: :math:`W` is its weight reshaped to ``(out_channels,
    in_channels·kh·kw)``, row :math:`w_s` the flattened filter of output channel :math:`s`, and
    :math:`H` the Hessian of the mean loss in that weight, the couplings between the positions
    that share it included. A Linear on ``(N, ..., F)`` inputs (tokens, sequences) is the same
    with positions = the middle axes (docs/conv.md).

    Methods:
        * ``"closed_form"``: cross-entropy or MSE when the layer is the model's output layer or
          only piecewise-linear operations follow it — in an ``nn.Sequential`` (ReLU,
          LeakyReLU, pooling, Flatten, Linear, Conv2d, ...) or, read off the torch.fx graph,
          in any traceable model (residual additions, BatchNorm with running statistics:
          every layer of a ReLU ResNet): then the layer's Hessian equals its Gauss-Newton
          block and T costs one forward and C batched backward passes, no HVP.
        * ``"exact"``: T from the d·m Hessian-vector products :math:`He_{s,k}` — any loss, any
          layer.
        * ``"hutchinson"``: T estimated from ``probes`` probes shared across rows (d HVPs each),
          with a standard error — for wide layers.
        * ``"hutchinson_kappa"``: κ estimated directly, one HVP per probe (``probes`` HVPs
          whatever d), with a standard error: :math:`\\kappa = \\mathbb E[v^\\top H v]` for
          :math:`v = \\mathrm{vec}(WZ)` with a random Z; T is estimated only on the span of
          :math:`WW^\\top`; a fixed seed gives the same estimate after T1, T3, T5 — for
          layers that are wide and deep.
        * ``"auto"``: closed form where it is exact, else exact up to
          :data:`AUTO_EXACT_MAX_HVPS` HVPs, else ``"hutchinson_kappa"`` (``probes`` HVPs).

    Args:
        model: the network (never modified).
        data: ``(X, y)`` or an iterable of batches.
        layer: module name of an ``nn.Linear`` (e.g. ``"4"``) or an ``nn.Conv2d`` with
            ``groups=1`` (others are refused).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable.
        method: see above.
        variant: ``"kappa"`` (default, the paper's measure) or ``"neuronwise_max"``:
            :math:`\\sum_s \\|w_s\\|^2 \\lambda_{\\max}(H_{s,s})` (not available with Hutchinson).
        normalize: ``None`` (the paper's κ) or ``"m"`` (divide by the number of inputs m; a
            Conv2d's in_channels·kh·kw).
        normalize_features: first bring the model to the std canonical form of docs/math.md §2
            (:func:`famviz.reparam.normalize_features` on ``data``), which makes κ equal for
            networks that differ by a rescaling of the neurons below the layer. Features that
            are constant on ``data`` (dead ReLUs, σ = 0) cannot be normalized, and their columns
            of W still count in κ: networks with such features are not identified. Linear
            layers fed by a Linear layer only.
        probes: Hutchinson probes (default :data:`DEFAULT_PROBES`).
        seed: Hutchinson's seed (drawn and recorded if None).
        dtype, device, bn: evaluation dtype (float64 for exactness), device, BatchNorm policy.
        memory_budget: bytes of vectors held at once besides the model and one batch's graph
            (default :data:`famviz.DEFAULT_MEMORY_BUDGET`): the chunks of unit vectors and
            probes of ``"exact"`` and the Hutchinson methods, and for
            ``variant="neuronwise_max"`` the m×m blocks :math:`H_{ss}` formed at once (the
            closed form makes one pass over the data per group of neurons that fits). Results
            do not depend on it.
        progress: show a progress bar of the Hessian-vector products (``tqdm.auto``;
            ``"exact"`` and the Hutchinson methods).

    Example (docs/math.md §1, one sample, φ = [1, 0], W = [[2, 0], [0, 0]]: κ = 4σ(2)(1 − σ(2))):

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)).double()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    >>> data = (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    >>> r = relative_flatness(model, data, layer="0")
    >>> round(float(r), 8), r.method
    (0.41997434, 'closed_form')
    """
    check_option("method", method, METHODS)
    check_option("variant", variant, VARIANTS)
    seed = check_seed(seed)
    probes = DEFAULT_PROBES if probes is None else check_count("probes", probes)
    memory_budget = check_memory_budget(memory_budget)
    progress = check_progress(progress)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: None, 'm'")
    module = resolve_layer(model, layer, LAYER_TYPES)
    check_layer(module, layer)
    if not isinstance(module.weight, nn.Parameter):
        raise ValueError(
            f"the weight of layer {layer!r} is computed, not a parameter (weight_norm or a "
            "parametrization); relative flatness needs the weight W itself as a parameter — "
            "remove the reparametrization first (e.g. torch.nn.utils.remove_weight_norm)"
        )
    if normalize_features and isinstance(module, nn.Conv2d):
        raise ValueError(f"normalize_features=True is implemented for Linear layers; layer "
                         f"{layer!r} is a Conv2d: call without it")
    if normalize_features:
        from ..reparam import normalize_features as _canonical

        model = _canonical(model, layer, data)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    d, m = weight_shape(module)
    weight = resolve_params(model, f"{layer}.weight")[0]  # a tied weight: its first name
    want_blocks = variant == "neuronwise_max"

    closed_ok = obj.loss_name in LOSSES and not shared_names(model) and (
        piecewise_linear_after(model, layer, bn) or _is_output_layer(obj, layer)
        or _traced_piecewise_linear(obj, layer)
    )
    if method == "closed_form" and not closed_ok:
        raise ValueError(
            f"no closed form for layer {layer!r} here: it needs loss 'cross_entropy' or 'mse' "
            "and the layer to be the output layer or followed only by piecewise-linear "
            "operations (an nn.Sequential, or a model torch.fx can trace, without hooks), with "
            "no module or parameter used twice; use method='exact' or 'hutchinson'"
        )
    if method == "auto":
        method = ("closed_form" if closed_ok
                  else "exact" if d * m <= AUTO_EXACT_MAX_HVPS else "hutchinson_kappa")
    if method in ("hutchinson", "hutchinson_kappa") and want_blocks:
        raise ValueError("variant='neuronwise_max' needs the diagonal blocks H_ss: use method "
                         "'closed_form' or 'exact'")

    W = obj.params[weight].reshape(d, m)
    M = W @ W.T
    stderr, num_hvps, used_seed, kappa, lam = 0.0, 0, None, None, None
    if method == "closed_form" and per_sample_vectors(obj, layer):
        T, kappa = _closed_form(obj, layer)  # stable near zero loss
        if want_blocks:
            lam = _closed_form_lambda_max(obj, layer, memory_budget)
    elif method == "closed_form":  # weights shared across positions (convolutions, sequences)
        if want_blocks:  # one pass over the data per group of neurons whose blocks fit
            lams = []
            for group in chunks(d, _block_rows(d, m, obj.dtype, memory_budget)):
                t, blocks = _shared_closed_form(obj, layer, True, group)
                T = t if not lams else T
                lams.append(torch.linalg.eigvalsh(blocks)[:, -1])
            lam = torch.cat(lams)
        else:
            T, _ = _shared_closed_form(obj, layer, False)
    else:
        op = HessianOperator(obj, [weight])
        used_seed = None if method == "exact" else new_seed() if seed is None else seed
        total = {"exact": d * m, "hutchinson": probes * d, "hutchinson_kappa": probes}[method]
        with hvp_progress(op, progress, total, f"relative flatness ({method})"):
            if method == "exact":
                T, lam = _exact(op, d, m, want_blocks, memory_budget)
            elif method == "hutchinson":
                T, stderr = _hutchinson(op, d, m, probes, used_seed, M, memory_budget)
            else:
                T, stderr, estimate = _hutchinson_kappa(op, W, probes, used_seed, memory_budget)
        num_hvps = op.num_hvps
    T = (T + T.T) / 2

    if method == "hutchinson_kappa":
        value = estimate  # = <M, T> up to rounding in the pseudo-inverse
    elif variant == "kappa":
        value = float(kappa if kappa is not None else (M * T).sum())
    else:
        value = float((W.pow(2).sum(dim=1) * lam).sum())
    if normalize == "m":
        value, stderr = value / m, stderr / m
    return RelativeFlatnessResult(
        value=value,
        block_traces=T.detach().cpu().double().numpy(),
        layer=layer,
        shape=(d, m),
        method=method,
        variant=variant,
        normalize=normalize,
        normalize_features=bool(normalize_features),
        stderr=stderr,
        num_hvps=num_hvps,
        seed=used_seed,
        objective=obj.info(),
        memory_budget=memory_budget,
    )
