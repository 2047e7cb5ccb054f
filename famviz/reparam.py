r"""Function-preserving reparameterizations of ``nn.Linear`` and ``nn.Conv2d`` layers, and an
equivalence check.

A ReLU network computes the same function after many different changes of its weights, because
the ReLU is *positively homogeneous*: :math:`\mathrm{relu}(c\,u) = c\,\mathrm{relu}(u)` for every
:math:`c > 0` (LeakyReLU, PReLU, the identity, dropout and flatten are too). Dinh et al. (2017)
used this to show that naive sharpness measures (Hessian trace, largest eigenvalue,
:math:`\epsilon`-sharpness) can be made arbitrarily large or small without changing the
function; relative flatness (Petzka et al., 2021) is built to be invariant to these changes.
This module makes the changes, so that a measure can be computed before and after (docs/math.md §2):

* :func:`scale_layers` (T1): the layer below (weight and bias) :math:`\times\alpha`, the next
  layer's weight :math:`\div\alpha`;
* :func:`scale_neurons` (T2 for the upper layer, T3 for the lower one): row :math:`k` of a layer
  and :math:`b_k` :math:`\times c_k`, column :math:`k` of the next layer :math:`\div c_k`; for a
  Conv2d, output channel :math:`k` (its filter and bias) and the next layer's input channel
  :math:`k` (a conv's ``weight[:, k]``, or the block of a Linear's columns that channel
  :math:`k` becomes after ``Flatten``);
* :func:`shift_logits` (T5): every row :math:`w_i \to w_i + v` of the output layer;
* :func:`normalize_features`: the std canonical form, features scaled to unit std;
* :func:`max_output_change`: the check that two models compute the same function.

Every function takes layers by module *name* (``"0"``, ``"fc2"``), returns a new model (a deep
copy) and leaves the caller's model untouched: weights, ``.grad``, ``requires_grad`` flags and
train/eval modes. The returned model keeps the original's modes and ``requires_grad`` flags; its
``.grad`` fields are cleared (gradients of the old weights do not belong to the new ones).

Which layers may be paired is read off the model's ``torch.fx`` graph, so custom modules whose
``forward`` calls ``F.relu`` work as well as ``nn.Sequential``: the output of the first layer
must reach the second layer through positively homogeneous operations only (see
:data:`HOMOGENEOUS_MODULES`, :data:`HOMOGENEOUS_FUNCTIONS`, :data:`HOMOGENEOUS_METHODS`), and
must be used nowhere else. After a Conv2d, pooling (max, average, adaptive) may sit between
too: it acts within each channel, and :math:`\max(c\,u) = c\max(u)` for :math:`c > 0`.

References:
    L. Dinh, R. Pascanu, S. Bengio, Y. Bengio. *Sharp Minima Can Generalize For Deep Nets.*
    ICML 2017.

    H. Petzka, M. Kamp, L. Adilova, C. Sminchisescu, M. Boley. *Relative Flatness and
    Generalization.* NeurIPS 2021.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from famviz.batches import Inputs, OutputError, describe, logits_of
from famviz.datastream import read_batches
from famviz.objective import Objective, check_option, resolve_layer
from famviz.replica import check_model, replicate

__all__ = [
    "MIN_FEATURE_STD",
    "HOMOGENEOUS_MODULES",
    "HOMOGENEOUS_FUNCTIONS",
    "HOMOGENEOUS_METHODS",
    "consecutive_pairs",
    "scale_layers",
    "scale_neurons",
    "shift_logits",
    "feature_std",
    "normalize_features",
    "max_output_change",
]

#: features whose standard deviation is below this (dead neurons) keep scale 1 in
#: :func:`normalize_features`
MIN_FEATURE_STD = 1e-12

#: module types that may sit between two rescaled layers: positively homogeneous,
#: :math:`g(c\,u) = c\,g(u)` for :math:`c > 0`, elementwise or a reshape that keeps the last axis
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)

#: functions (as recorded in an fx graph) that may sit between two rescaled layers
HOMOGENEOUS_FUNCTIONS = frozenset(
    {
        F.relu,
        torch.relu,
        torch.relu_,  # also F.relu_
        F.leaky_relu,
        F.leaky_relu_,
        F.dropout,
        torch.flatten,
    }
)

#: tensor methods (as recorded in an fx graph) that may sit between two rescaled layers
HOMOGENEOUS_METHODS = frozenset({"relu", "relu_", "flatten"})

#: after a Conv2d, also these: they pool within a channel, so a channel-wise factor commutes
CHANNEL_HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool2d,
)

_ALLOWED_TEXT = (
    "nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Flatten, F.relu, torch.relu, "
    "F.leaky_relu, F.dropout, torch.flatten (and in-place variants)"
)


# ------------------------------------------------------------------------------ model structure


class _Tracer(fx.Tracer):
    """fx tracer that keeps every ``nn.Linear`` (subclasses too) and the homogeneous modules as
    leaves, so they appear as ``call_module`` nodes named like ``named_modules()``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Linear, *HOMOGENEOUS_MODULES)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:
        raise ValueError(
            f"could not trace the model ({type(model).__name__}) with torch.fx: "
            f"{type(exc).__name__}: {exc}. The reparameterizations read which layers follow "
            "each other from the fx graph: use nn.Sequential, or a module whose forward is "
            "fx-traceable (no Python control flow that depends on the input values)"
        ) from exc


def _describe(node, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "output":
        return "the model's output"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "get_attr":
        return f"attribute {node.target!r}"
    return f"{node.op} {node.target}"  # pragma: no cover - fx has no other ops


def _is_homogeneous(node: fx.Node, modules: dict[str, nn.Module],
                    channelwise: bool = False) -> bool:
    if node.op == "call_module":
        allowed = HOMOGENEOUS_MODULES + (CHANNEL_HOMOGENEOUS_MODULES if channelwise else ())
        return isinstance(modules.get(node.target), allowed)
    if node.op == "call_function":
        return node.target in HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in HOMOGENEOUS_METHODS
    return False


def _call_node(graph: fx.Graph, name: str) -> fx.Node:
    """The single ``call_module`` node of layer ``name``; refuse layers used in other ways."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    direct = [
        n.target
        for n in graph.nodes
        if n.op == "get_attr" and isinstance(n.target, str) and n.target.startswith(name + ".")
    ]
    if direct:
        raise ValueError(
            f"the parameters of layer {name!r} are also used directly in forward ({direct}); "
            "rescaling the layer would change those uses too"
        )
    if not calls:
        raise ValueError(
            f"layer {name!r} is never called as a module in the model's traced forward (it may "
            "sit inside a module torch.fx keeps whole, such as a torch.nn layer); pick layers "
            "the forward calls as modules"
        )
    if len(calls) > 1:
        raise ValueError(
            f"layer {name!r} is called {len(calls)} times in forward; a layer shared between "
            "several calls cannot be rescaled on its own"
        )
    return calls[0]


def _check_path(graph: fx.Graph, modules: dict[str, nn.Module], first: str, second: str,
                channelwise: bool = False) -> list[fx.Node]:
    """Refuse unless ``first``'s output reaches ``second`` only through homogeneous ops (and,
    with ``channelwise``, pooling); return the nodes in between."""
    a, b = _call_node(graph, first), _call_node(graph, second)
    cur, path = a, []
    while True:
        users = list(cur.users)
        if len(users) != 1:
            found = ", ".join(_describe(u, modules) for u in users) or "nothing"
            raise ValueError(
                f"layers {first!r} and {second!r} are not consecutive: the output of "
                f"{_describe(cur, modules)} is used by {len(users)} operations ({found}); it "
                f"must feed only {second!r}, through positively homogeneous operations"
            )
        nxt = users[0]
        if nxt is b:
            return path
        if not _is_homogeneous(nxt, modules, channelwise) or nxt.all_input_nodes != [cur]:
            raise ValueError(
                f"layers {first!r} and {second!r} are not consecutive: after "
                f"{_describe(cur, modules)} comes {_describe(nxt, modules)}, which is not a "
                f"positively homogeneous operation on it alone. Only these may sit between the "
                f"two layers: {_ALLOWED_TEXT}"
                + (" and, after a Conv2d, pooling layers" if channelwise else "")
            )
        path.append(nxt)
        cur = nxt


def _layer_below(graph: fx.Graph, modules: dict[str, nn.Module], layer: str) -> str:
    """Name of the Linear layer feeding ``layer`` through homogeneous operations."""
    node = _call_node(graph, layer)
    cur = node.all_input_nodes[0] if node.all_input_nodes else None
    while isinstance(cur, fx.Node) and _is_homogeneous(cur, modules) and cur.all_input_nodes:
        cur = cur.all_input_nodes[0]
    if (
        isinstance(cur, fx.Node)
        and cur.op == "call_module"
        and isinstance(modules.get(cur.target), nn.Linear)
    ):
        below = str(cur.target)
        _check_path(graph, modules, below, layer)
        return below
    raise ValueError(
        f"the input of layer {layer!r} does not come from a Linear layer through positively "
        f"homogeneous operations (found {_describe(cur, modules)}); normalize_features needs "
        f"Linear -> activation -> {layer!r} with activations among: {_ALLOWED_TEXT}"
    )


def _linear(model: nn.Module, name: str) -> nn.Linear:
    return resolve_layer(model, name, (nn.Linear,), unshared=True)


def _weight_layer(model: nn.Module, name: str) -> nn.Module:
    """A Linear or a Conv2d with groups=1, used once."""
    module = resolve_layer(model, name, (nn.Linear, nn.Conv2d), unshared=True)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"layer {name!r} is a Conv2d with groups={module.groups}; channel "
                         "rescalings are implemented for groups=1")
    return module


def _pair(model: nn.Module, first: str, second: str):
    """The two layers and the fx nodes between them, checked consecutive."""
    f, s = _weight_layer(model, first), _weight_layer(model, second)
    if f is s:
        raise ValueError(f"first and second must be two different layers, got {first!r} twice")
    if isinstance(s, nn.Conv2d) and not isinstance(f, nn.Conv2d):
        raise ValueError(f"layer {second!r} is a Conv2d fed by the Linear layer {first!r}; "
                         "rescalings pair Linear -> Linear, Conv2d -> Conv2d and Conv2d -> "
                         "(Flatten) -> Linear")
    modules = dict(model.named_modules())
    path = _check_path(_trace(model), modules, first, second,
                       channelwise=isinstance(f, nn.Conv2d))
    return f, s, path


def consecutive_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Every pair ``(first, second)`` of Linear layers that :func:`scale_layers` and
    :func:`scale_neurons` accept, in the order the forward calls the second layer.

    ``first``'s output must reach ``second`` only through positively homogeneous operations,
    each layer must be called once and share no parameter with another module.

    Raises:
        ValueError: torch.fx cannot trace the model.

    >>> from famviz import models
    >>> consecutive_pairs(models.mlp([4, 8, 8, 3], seed=0))
    [('0', '2'), ('2', '4')]
    """
    check_model(model)
    graph = _trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Linear):
            continue
        second = str(node.target)
        try:
            first = _layer_below(graph, modules, second)
            _linear(model, first)  # the pairs the dashboards rescale: Linear layers
            _linear(model, second)
        except ValueError:  # not fed by a Linear layer through homogeneous ops, or shared
            continue
        pairs.append((first, second))
    return pairs


# ----------------------------------------------------------------------------------- validation


def _real(value, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{what} must be a real number, got a tensor of shape {tuple(value.shape)} "
                f"and dtype {value.dtype}"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    return float(value)


def _positive_scalar(value, what: str) -> float:
    x = _real(value, what)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(
            f"{what} must be a finite number > 0 (positive homogeneity only holds for positive "
            f"factors), got {x!r}"
        )
    return x


def _vector(values, n: int, what: str, purpose: str, device) -> Tensor:
    if isinstance(values, Tensor):
        t = values.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(values, dtype=torch.float64, device=device)
        except Exception as exc:
            raise TypeError(
                f"{what} must be a 1-D tensor, array or sequence of numbers, got "
                f"{type(values).__name__}"
            ) from exc
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; it needs {purpose}: shape ({n},)")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{what} contains NaN or inf at indices {bad[:10]}; pass finite values")
    return t


def _scales(scales, n: int, layer: str, device) -> Tensor:
    t = _vector(scales, n, "scales", f"one factor per output neuron of {layer!r}", device)
    bad = (t <= 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"scales must all be > 0 (positive homogeneity only holds for positive factors); "
            f"got {[t[i].item() for i in bad[:10]]} at indices {bad[:10]}"
        )
    return t


# -------------------------------------------------------------------------------------- copying


def _copy(model: nn.Module) -> nn.Module:
    try:
        new = copy.deepcopy(model)
    except Exception as exc:
        raise ValueError(
            f"could not deep-copy the model ({type(exc).__name__}: {exc}); the reparameterizations "
            "return a modified copy and never change the caller's model"
        ) from exc
    for p in new.parameters():
        p.grad = None
    return new


def _assign(p: Tensor, value: Tensor) -> None:
    """Write a float64 result into parameter ``p`` in place (under no_grad), in ``p``'s dtype."""
    p.copy_(value.to(dtype=p.dtype))


def _rescale_neurons(first: nn.Module, second: nn.Module, s: Tensor, *, divide_rows: bool,
                     block: int = 1) -> None:
    """Rows (output channels) of ``first`` (and its bias) times ``s`` and the matching inputs
    of ``second`` divided by ``s`` (or the other way round with ``divide_rows``), in float64:
    columns of a Linear (``block`` consecutive ones per channel after a Flatten), input
    channels of a Conv2d."""
    s = s.to(device=first.weight.device)
    with torch.no_grad():
        w = first.weight.double()
        rows = s.reshape(-1, *[1] * (w.ndim - 1))
        _assign(first.weight, w / rows if divide_rows else w * rows)
        if first.bias is not None:
            b = first.bias.double()
            _assign(first.bias, b / s if divide_rows else b * s)
        s2 = s.to(device=second.weight.device).repeat_interleave(block)
        w2 = second.weight.double()
        cols = s2.reshape(1, -1, *[1] * (w2.ndim - 2))
        _assign(second.weight, w2 * cols if divide_rows else w2 / cols)


def _check_widths(first: nn.Linear, second: nn.Linear, a: str, b: str) -> None:
    if first.out_features != second.in_features:
        raise ValueError(
            f"layer {a!r} has {first.out_features} outputs but {b!r} has {second.in_features} "
            "inputs; per-neuron rescaling needs them to match neuron for neuron"
        )


def _flattens_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool | None:
    """True for a flatten from axis 1 on (channel-major), False for another flatten, None for
    an operation that is not a flatten."""
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten):
        m = modules[node.target]
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return None


def _channel_block(first, second, a: str, b: str, path: list[fx.Node], modules) -> int:
    """How many inputs of ``second`` each output neuron or channel of ``first`` feeds (1, or
    H·W for Conv2d -> Flatten -> Linear), checked."""
    if isinstance(first, nn.Linear):
        _check_widths(first, second, a, b)
        return 1
    flattens = [f for f in (_flattens_channels(n, modules) for n in path) if f is not None]
    c = first.out_channels
    if isinstance(second, nn.Conv2d):
        if flattens or second.in_channels != c:
            raise ValueError(f"layer {a!r} has {c} output channels but {b!r} takes "
                             f"{second.in_channels} input channels"
                             + (" after a flatten" if flattens else "")
                             + "; channel rescaling needs them to match channel for channel")
        return 1
    if flattens != [True] or second.in_features % c:
        raise ValueError(
            f"the Conv2d {a!r} feeds the Linear {b!r}: channel rescaling needs exactly one "
            f"flatten from axis 1 (nn.Flatten(), torch.flatten(x, 1)) between them and "
            f"{b!r}'s {second.in_features} inputs to be a multiple of the {c} channels"
        )
    return second.in_features // c


# ------------------------------------------------------------------------------- public functions


def scale_layers(model: nn.Module, first: str, second: str, alpha) -> nn.Module:
    r"""Layer-wise rescaling T1: ``first`` (weight and bias) times :math:`\alpha`, ``second``'s
    weight divided by :math:`\alpha`.

    With a positively homogeneous activation :math:`g` between the layers,

    .. math::

        W_2\, g(\alpha W_1 x + \alpha b_1) / \alpha + b_2 = W_2\, g(W_1 x + b_1) + b_2,
        \qquad \alpha > 0,

    so the function is unchanged while, e.g., :math:`\mathrm{Tr}(H_{W_2})` grows by
    :math:`\alpha^2` (Dinh et al., 2017). Relative flatness of ``second`` is invariant
    (Petzka et al., 2021).

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx``; never modified.
        first: name of the ``nn.Linear`` or ``nn.Conv2d`` below (e.g. ``"0"``).
        second: name of the ``nn.Linear`` or ``nn.Conv2d`` fed by ``first`` through positively
            homogeneous operations only (e.g. ``"2"``; after a Conv2d, pooling too).
        alpha: finite factor > 0.

    Returns:
        A new model (deep copy) with the rescaled weights.

    Raises:
        ValueError: unknown layer or one of another type (or a grouped conv), layers not
            consecutive, model not traceable, ``alpha`` not finite and positive.

    >>> import torch
    >>> from famviz.models import mlp
    >>> m = mlp([4, 8, 3], seed=0)
    >>> m2 = scale_layers(m, "0", "2", 10.0)
    >>> torch.allclose(m2[0].weight, 10.0 * m[0].weight)
    True
    >>> X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    >>> max_output_change(m, m2, X) < 1e-5
    True
    """
    a = _positive_scalar(alpha, "alpha")
    _pair(model, first, second)  # Linear or Conv2d layers; any channel layout: alpha is uniform
    new = _copy(model)
    modules = dict(new.named_modules())
    f, s = modules[first], modules[second]
    with torch.no_grad():
        _assign(f.weight, f.weight.double() * a)
        if f.bias is not None:
            _assign(f.bias, f.bias.double() * a)
        _assign(s.weight, s.weight.double() / a)
    return new


def scale_neurons(model: nn.Module, first: str, second: str, scales) -> nn.Module:
    r"""Per-neuron rescaling: neuron :math:`k` of ``first`` times :math:`c_k`, its outgoing
    weights in ``second`` divided by :math:`c_k`.

    .. math::

        W_1 \to \operatorname{diag}(c)\, W_1,\quad b_1 \to \operatorname{diag}(c)\, b_1,\quad
        W_2 \to W_2 \operatorname{diag}(c)^{-1},\qquad c_k > 0.

    The function is unchanged because :math:`g(c_k u) = c_k g(u)` elementwise (Dinh et al.,
    2017). For ``second`` this is T2 of docs/math.md §2, which changes relative flatness unless the
    features are first normalized (:func:`normalize_features`); for ``first`` it is the row
    rescaling T3, to which relative flatness of ``first`` is invariant (Petzka et al., 2021).

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx``; never modified.
        first: name of the ``nn.Linear`` whose neurons (rows) are scaled, or of the
            ``nn.Conv2d`` (``groups=1``) whose output channels (filters and biases) are.
        second: name of the layer fed by ``first`` through positively homogeneous operations
            only: a Linear after a Linear; after a Conv2d, a Conv2d (its input channels are
            divided) or a Linear behind one ``Flatten`` from axis 1 (the block of
            ``in_features / out_channels`` columns of channel k is divided by c_k).
        scales: 1-D tensor, array or sequence of one finite factor > 0 per output neuron or
            channel of ``first``.

    Returns:
        A new model (deep copy).

    >>> import torch
    >>> from famviz.models import mlp
    >>> m = mlp([4, 8, 3], seed=0)
    >>> m2 = scale_neurons(m, "0", "2", torch.arange(1.0, 9.0))
    >>> torch.allclose(m2[2].weight[:, 7], m[2].weight[:, 7] / 8)
    True
    >>> X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    >>> max_output_change(m, m2, X) < 1e-5
    True
    """
    f, s, path = _pair(model, first, second)
    block = _channel_block(f, s, first, second, path, dict(model.named_modules()))
    c = _scales(scales, f.weight.shape[0], first, f.weight.device)
    new = _copy(model)
    modules = dict(new.named_modules())
    _rescale_neurons(modules[first], modules[second], c, divide_rows=False, block=block)
    return new


def shift_logits(model: nn.Module, layer: str, v, *, bias_shift: float = 0.0) -> nn.Module:
    r"""Softmax shift T5: add the same vector :math:`v` to every row of the output layer.

    .. math::

        w_i \to w_i + v,\quad b_i \to b_i + \beta
        \quad\Longrightarrow\quad
        z_i(x) \to z_i(x) + \langle v, \phi(x)\rangle + \beta,

    a shift of all logits of a sample by the same amount, so
    :math:`\mathrm{softmax}(z)` and the cross-entropy are unchanged while the logits (and an MSE
    loss on them) change. Relative flatness with softmax cross-entropy is invariant
    (Petzka et al., 2021); the simplified measure :math:`\|W\|_F^2\,\mathrm{Tr}(H_W)` is not.

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx``; never modified.
        layer: name of the output ``nn.Linear``: its output must be the model's output.
        v: 1-D tensor, array or sequence of ``in_features`` finite numbers.
        bias_shift: :math:`\beta`, added to every bias entry (needs a bias unless 0).

    Returns:
        A new model (deep copy).

    >>> import torch
    >>> from famviz.models import mlp
    >>> m = mlp([4, 8, 3], seed=0)
    >>> m2 = shift_logits(m, "2", torch.ones(8), bias_shift=0.5)
    >>> X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    >>> max_output_change(m, m2, X) > 0.1
    True
    >>> bool((m(X).softmax(1) - m2(X).softmax(1)).abs().max() < 1e-5)
    True
    """
    mod = _linear(model, layer)
    v64 = _vector(v, mod.in_features, "v", f"one entry per input of {layer!r}", mod.weight.device)
    beta = _real(bias_shift, "bias_shift")
    if not math.isfinite(beta):
        raise ValueError(f"bias_shift must be finite, got {beta!r}")
    if beta != 0.0 and mod.bias is None:
        raise ValueError(f"layer {layer!r} has no bias; bias_shift must be 0 for it")
    graph = _trace(model)
    modules = dict(model.named_modules())
    node = _call_node(graph, layer)
    users = list(node.users)
    if not (len(users) == 1 and users[0].op == "output" and users[0].args[0] is node):
        out = next(n for n in graph.nodes if n.op == "output")
        result = out.args[0]
        hint = (
            f"; the model's output layer is {result.target!r}"
            if isinstance(result, fx.Node)
            and result.op == "call_module"
            and isinstance(modules.get(result.target), nn.Linear)
            else ""
        )
        found = ", ".join(_describe(u, modules) for u in users) or "nothing"
        raise ValueError(
            f"layer {layer!r} is not the model's output layer: its output goes to {found}. "
            f"shift_logits only applies to the Linear layer whose output is the model's "
            f"output (the logits){hint}"
        )
    new = _copy(model)
    m = dict(new.named_modules())[layer]
    with torch.no_grad():
        _assign(m.weight, m.weight.double() + v64[None, :])
        if m.bias is not None and beta != 0.0:
            _assign(m.bias, m.bias.double() + beta)
    return new


def feature_std(model: nn.Module, layer: str, data) -> Tensor:
    r"""Standard deviation of each input feature of ``layer`` over ``data``.

    .. math::

        \sigma_k = \sqrt{\frac{1}{N} \sum_{n=1}^N \big(\phi_k(x_n) - \bar\phi_k\big)^2},
        \qquad \bar\phi_k = \frac{1}{N}\sum_{n=1}^N \phi_k(x_n),

    the population std (``unbiased=False``) of :math:`\phi = ` the input of ``layer``, evaluated
    in float64 with dropout off and BatchNorm in eval mode; batches are merged exactly (Chan's
    update). Inputs with more than two axes count every position as a sample.

    Args:
        model: any ``nn.Module``; never modified.
        layer: name of an ``nn.Linear`` layer.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches.

    Returns:
        float64 tensor of shape ``(in_features,)`` on the model's device.

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 1))
    >>> X = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    >>> feature_std(m, "0", (X, torch.zeros(2))).tolist()
    [1.0, 0.0]
    """
    mod = resolve_layer(model, layer, (nn.Linear,))
    obj = Objective(model, data, loss=None, dtype=torch.float64)
    width = mod.in_features
    count = 0
    mean = torch.zeros(width, dtype=torch.float64, device=obj.device)
    m2 = torch.zeros_like(mean)
    with torch.no_grad(), obj.capture([layer]) as captured:
        for X, _ in obj.batches:
            obj.forward(obj.params, X)
            if "phi" not in captured[layer]:
                raise ValueError(f"layer {layer!r} was not called in the model's forward")
            phi = captured[layer].pop("phi").detach().to(torch.float64).reshape(-1, width)
            nb = phi.shape[0]
            if nb == 0:
                continue
            bmean = phi.mean(0)
            bm2 = ((phi - bmean) ** 2).sum(0)
            total = count + nb
            delta = bmean - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + bm2 + delta**2 * (count * nb / total)
            count = total
    return (m2 / count).sqrt()


def normalize_features(model: nn.Module, layer: str, data) -> nn.Module:
    r"""The std canonical form: rescale the neurons below ``layer`` so its features have unit
    standard deviation on ``data``.

    With ``below`` the Linear layer whose output feeds ``layer`` through a positively homogeneous
    activation and :math:`\sigma_k` = :func:`feature_std` of feature :math:`k`,

    .. math::

        w^{\text{below}}_k \to w^{\text{below}}_k / \sigma_k,\quad
        b^{\text{below}}_k \to b^{\text{below}}_k / \sigma_k,\quad
        W_{:,k} \to \sigma_k W_{:,k},

    which preserves the function and maps all networks that differ by a per-neuron rescaling
    (T2 of docs/math.md §2, Dinh et al., 2017) to the same weights of ``layer``: after it, relative
    flatness (Petzka et al., 2021) no longer depends on that rescaling. Features with
    :math:`\sigma_k <` :data:`MIN_FEATURE_STD` (dead neurons) keep scale 1.

    Args:
        model: any ``nn.Module`` traceable by ``torch.fx``; never modified.
        layer: name of the ``nn.Linear`` whose input features are normalized.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches (e.g. the training set).

    Returns:
        A new model (deep copy).

    >>> import torch
    >>> from famviz.models import mlp
    >>> m = mlp([4, 8, 3], seed=0)
    >>> X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    >>> data = (X, torch.zeros(64, dtype=torch.long))
    >>> m2 = normalize_features(m, "2", data)
    >>> s = feature_std(m2, "2", data)
    >>> bool(((s - 1).abs() < 1e-5)[s > 0].all())
    True
    >>> max_output_change(m, m2, X) < 1e-5
    True
    """
    resolve_layer(model, layer, (nn.Linear,))
    graph = _trace(model)
    below = _layer_below(graph, dict(model.named_modules()), layer)
    f, s = _linear(model, below), _linear(model, layer)
    _check_widths(f, s, below, layer)
    sigma = feature_std(model, layer, data)
    sigma = torch.where(sigma < MIN_FEATURE_STD, torch.ones_like(sigma), sigma)
    new = _copy(model)
    modules = dict(new.named_modules())
    _rescale_neurons(modules[below], modules[layer], sigma, divide_rows=True)
    return new


def _inputs(X) -> list:
    if isinstance(X, (Tensor, Inputs)):
        xs = [X]
    elif hasattr(X, "__array__") and not isinstance(X, (tuple, list)):
        xs = [torch.as_tensor(X)]
    else:
        xs = [b[0] for b in read_batches(X)]
    for x in xs:
        if len(x) == 0 if isinstance(x, Inputs) else x.numel() == 0:
            raise ValueError("X is empty: pass at least one sample")
    return xs


def _run(model: nn.Module, x) -> Tensor:
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next((b for b in model.buffers() if b.is_floating_point()), None)
    if ref is not None:
        x = (x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else None)
             if isinstance(x, Tensor) else x.to(dtype=ref.dtype, device=ref.device))
    try:
        out = model(x) if isinstance(x, Tensor) else x.call(model)
    except OutputError:
        raise
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"X: the model cannot evaluate {describe(x)}: {exc}") from exc
    return logits_of(out)


#: what :func:`max_output_change` compares
COMPARE = ("outputs", "probabilities")


def max_output_change(model_a: nn.Module, model_b: nn.Module, X, compare: str = "outputs"
                      ) -> float:
    r"""Largest absolute difference between the outputs of two models on the same inputs.

    .. math::

        \max_{n, i} \big| f_a(x_n)_i - f_b(x_n)_i \big|

    Evaluated under ``torch.no_grad()`` on famviz-owned replicas of both models in eval mode
    (dropout off, BatchNorm running statistics); the models themselves are only read. Floating
    inputs are cast to each model's parameter dtype; the difference is taken in float64.

    With ``compare="probabilities"`` the softmax of each output is compared instead: what a
    softmax classifier preserves under a shift of every logit (T5), which moves the logits.

    Args:
        model_a, model_b: the two models (e.g. a model and its reparameterization).
        X: input tensor (or array), :class:`famviz.batches.Inputs`, or famviz ``data`` (one
            batch or an iterable of batches, in any form of :mod:`famviz.batches`).
        compare: ``"outputs"`` (default) or ``"probabilities"`` (softmax over the last axis).

    Returns:
        The maximum as a Python float.

    Raises:
        ValueError: the outputs differ in shape, or one holds NaN or inf (no finite difference).

    >>> import torch
    >>> from famviz.models import mlp
    >>> m = mlp([4, 8, 3], seed=0)
    >>> max_output_change(m, m, torch.zeros(2, 4))
    0.0
    """
    check_model(model_a, "model_a"), check_model(model_b, "model_b")
    check_option("compare", compare, COMPARE)
    xs = _inputs(X)
    a, b = replicate(model_a).eval(), replicate(model_b).eval()
    worst = 0.0
    with torch.no_grad():
        for x in xs:
            ya, yb = _run(a, x), _run(b, x)
            if ya.shape != yb.shape:
                raise ValueError(
                    f"the models' outputs differ in shape: {tuple(ya.shape)} vs {tuple(yb.shape)}"
                )
            for which, out in (("model_a", ya), ("model_b", yb)):
                if out.is_floating_point() and not torch.isfinite(out).all():
                    raise ValueError(f"{which}'s output contains NaN or inf on these inputs: "
                                     "there is no finite difference to report")
            if compare == "probabilities":
                ya, yb = torch.softmax(ya.double(), dim=-1), torch.softmax(yb.double(), dim=-1)
            worst = max(worst, (ya.double() - yb.double().to(ya.device)).abs().max().item())
    return worst
