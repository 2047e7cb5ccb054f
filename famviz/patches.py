r"""Layers whose weight is shared over positions, seen as Linear maps on patches, and the
Gauss-Newton pull-back of relative flatness's block traces for them.

A ``Conv2d`` with weight :math:`(d, c, k_h, k_w)` and ``groups=1`` computes, at every output
position :math:`p`, :math:`z_{n,p} = W \phi_{n,p} + b` with :math:`W` the weight reshaped to
:math:`d \times m` (:math:`m = c\,k_h k_w`, rows :math:`w_s` = flattened filters) and
:math:`\phi_{n,p} \in \mathbb R^m` the unfolded patch (``F.unfold`` of the padded input, whose
channel-major order matches ``weight.reshape(d, m)``). An ``nn.Linear`` on inputs
:math:`(N, \dots, F)` is the same with positions = the middle axes and patches = the rows.
Since :math:`z` is linear in :math:`W` and :math:`W` acts nowhere else, the weight Hessian is
:math:`H = \frac1N \sum_n J_n^\top (\partial^2 E_n / \partial z_n^2) J_n` exactly; where the loss
Hessian in :math:`z` is its Gauss-Newton part :math:`\sum_c \delta_{cn}\delta_{cn}^\top` (the
layer is the output layer, or only piecewise-linear modules follow it),

.. math::

    T_{ss'} = \mathrm{Tr}(H_{s,s'})
            = \frac1N \sum_{n,c} \sum_{p,q} \langle \phi_{n,p}, \phi_{n,q}\rangle
              \delta_{cn,s p}\, \delta_{cn,s' q}
            = \frac1N \sum_{n,c} (A_{cn} A_{cn}^\top)_{ss'},
    \qquad A_{cn} = \sum_p \delta_{cn,\cdot p}\, \phi_{n,p}^\top \in \mathbb R^{d\times m},

cross-position terms :math:`p \neq q` included (docs/conv.md). :math:`A_{cn}` is the weight
gradient of sample :math:`n` for the backpropagated factor column :math:`c`. Where there are
fewer positions :math:`P` than patch entries :math:`m` (deep layers), :math:`A_{cn}A_{cn}^\top =
\delta_{cn} K_n \delta_{cn}^\top` with the :math:`P\times P` Gram :math:`K_n` of the patches
is cheaper, and is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .curvature import pull_back
from .objective import Objective, check_finite_loss

__all__ = ["LAYER_TYPES", "check_layer", "weight_shape", "patches", "per_sample_vectors",
           "position_traces", "closed_form"]

#: layers relative flatness is defined for: a Linear (on (N, F) or (N, ..., F) inputs) and a
#: Conv2d with groups=1
LAYER_TYPES = (nn.Linear, nn.Conv2d)

#: the pull-back forms the per-sample factors A (C, n, d, m) for at most this many entries at
#: once (bounds memory: 2**24 float64 entries = 128 MiB)
MAX_FACTOR_ENTRIES = 2**24


def check_layer(module: nn.Module, name: str) -> None:
    """Refuse layers whose weight is not one d×m matrix shared over positions."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"layer {name!r} is a Conv2d with groups={module.groups}; relative flatness is "
            "implemented for groups=1 (each filter sees all input channels). A grouped or "
            "depthwise convolution is block-diagonal in its filters: measure a groups=1 layer"
        )


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d, m): the weight as a matrix, rows = output neurons or channels."""
    d = module.weight.shape[0]
    return d, module.weight[0].numel()


def patches(module: nn.Module, phi: Tensor) -> Tensor:
    """The layer's inputs as (N, positions, m): unfolded patches of a Conv2d (its padding mode,
    stride and dilation), the rows of a Linear's (N, ..., F) input."""
    if isinstance(module, nn.Conv2d):
        if phi.ndim != 4:
            raise ValueError(f"Conv2d inputs of shape {tuple(phi.shape)}: expected (N, C, H, W)")
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(phi, module._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.transpose(1, 2)  # (N, L, c*kh*kw)
    return phi.reshape(phi.shape[0], -1, phi.shape[-1])


def _outputs_by_position(module: nn.Module, g: Tensor) -> Tensor:
    """Backpropagated factors (C, N, *z.shape[1:]) -> (C, N, positions, d)."""
    C, N = g.shape[:2]
    if isinstance(module, nn.Conv2d):
        return g.reshape(C, N, g.shape[2], -1).transpose(2, 3)
    return g.reshape(C, N, -1, g.shape[-1])


def position_traces(module: nn.Module, g: Tensor, phi: Tensor, want_blocks: bool = False,
                    neurons: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
    r""":math:`\sum_{c,n} A_{cn}A_{cn}^\top` (d×d) and, if wanted, the blocks
    :math:`\sum_{c,n} A_{cn}[s]^\top A_{cn}[s]` of the neurons ``s in range(*neurons)`` (all d
    when None), shaped (neurons, m, m), with :math:`A_{cn} = \sum_p
    \delta_{cn,\cdot p}\,\phi_{n,p}^\top` — sums over the batch, not yet divided by N.

    ``g`` holds the backpropagated factor columns (C, N, *z.shape[1:]) (from
    :func:`famviz.curvature.pull_back`), ``phi`` the layer's inputs. Plain tensor algebra: the
    result is differentiable in ``g`` and ``phi`` where they carry a graph (the FAM penalty).
    Memory: at most :data:`MAX_FACTOR_ENTRIES` factor entries at once."""
    d, m = weight_shape(module)
    delta = _outputs_by_position(module, g)  # (C, N, P, d)
    phi = patches(module, phi)  # (N, P, m)
    C, N, P = delta.shape[0], delta.shape[1], delta.shape[2]
    T = torch.zeros(d, d, dtype=delta.dtype, device=delta.device)
    first, last = (0, d) if neurons is None else neurons
    blocks = (torch.zeros(last - first, m, m, dtype=delta.dtype, device=delta.device)
              if want_blocks else None)
    # A_cn A_cn^T = delta_cn K_n delta_cn^T with K_n = Phi_n Phi_n^T (P x P): cheaper when
    # there are fewer positions than patch entries (deep layers); the blocks need A itself
    gram = not want_blocks and d * P * P + d * d * P < d * P * m + d * d * m
    width = P if gram else m
    step = max(1, MAX_FACTOR_ENTRIES // max(1, C * d * max(width, P)))
    for i in range(0, N, step):
        dl, ph = delta[:, i:i + step], phi[i:i + step]
        if gram:
            K = ph @ ph.transpose(1, 2)  # (n, P, P)
            DK = torch.einsum("cnpd,npq->dcnq", dl, K).reshape(d, -1)
            T = T + DK @ dl.permute(3, 0, 1, 2).reshape(d, -1).T
            continue
        A = torch.einsum("cnpd,npm->dcnm", dl, ph)
        A2 = A.reshape(d, -1)
        T = T + A2 @ A2.T
        if want_blocks:
            A3 = A.reshape(d, -1, m)[first:last]
            blocks += A3.transpose(1, 2) @ A3
    return T, blocks


def per_sample_vectors(obj: Objective, layer: str) -> bool:
    """True when a Linear layer sees (N, features) inputs and the model gives (N, outputs), the
    case of :func:`famviz.curvature.linear_pullback`; False when the layer applies its weight
    at several positions per sample (a Conv2d, a Linear on (N, ..., F) inputs) or the output
    has more axes, which :func:`closed_form` handles (read off the objective's one-sample
    pass)."""
    if isinstance(obj.model.get_submodule(layer), nn.Conv2d):
        return False
    phi_ndim = obj.layer_probe(layer).phi_ndim
    return obj.sample_output_ndim == 2 and phi_ndim in (None, 2)


def closed_form(obj: Objective, layer: str, want_blocks: bool,
                neurons: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
    """T (d×d) and, if wanted, the diagonal blocks :math:`H_{ss}` from the Gauss-Newton
    pull-back :math:`T = \\frac1N \\sum_{n,c} A_{cn} A_{cn}^\\top`: those of the neurons
    ``range(*neurons)`` (all d when None), shaped (neurons, m, m).

    Exact only when the layer is the output layer or only piecewise-linear modules follow it,
    with loss ``"cross_entropy"`` or ``"mse"`` (callers check). Memory: the backpropagated
    factors of one batch, C × batch size × d × positions entries (C classes; for MSE on a
    hidden layer, C = the outputs per sample) — pass large data as smaller batches.
    """
    module = obj.model.get_submodule(layer)
    d, m = weight_shape(module)
    params = {n: p.detach() for n, p in obj.params.items()}
    T = torch.zeros(d, d, dtype=obj.dtype, device=obj.device)
    first, last = (0, d) if neurons is None else neurons
    blocks = (torch.zeros(last - first, m, m, dtype=obj.dtype, device=obj.device)
              if want_blocks else None)
    for X, y in obj.batches:
        with obj.capture([layer]) as cap:
            out = obj.forward(params, X)
        if not torch.isfinite(out).all():
            raise ValueError("the model's output holds NaN or inf on this data: every curvature "
                             "measure would be NaN. Check the weights, buffers and inputs")
        with torch.no_grad():
            check_finite_loss(obj.loss_fn(out, y), "the loss on a batch of data")
        flat = out.detach().reshape(len(X), -1)  # mse on (N, ...) outputs: mean over all
        z = cap[layer]["z"]
        if z is out and obj.loss_name == "mse":
            # G_n = (2/D) I: T = 2/(N D) sum_{n,p} |phi_np|^2 I, no factor columns needed
            phi = patches(module, cap[layer]["phi"].detach()).reshape(-1, m)
            scale = 2.0 / flat.shape[1]
            T += torch.eye(d, dtype=T.dtype, device=T.device) * (scale * phi.pow(2).sum())
            if want_blocks:
                blocks += (scale * phi.T @ phi)[None]
            continue
        (g,) = pull_back(out, [z], obj.loss_name)  # (C, N, *z.shape[1:])
        t, b = position_traces(module, g, cap[layer]["phi"].detach(), want_blocks, neurons)
        T += t
        if want_blocks:
            blocks += b
    N = obj.num_samples
    return T / N, (blocks / N if want_blocks else None)
