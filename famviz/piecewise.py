"""Is a layer followed only by piecewise-linear operations? Read off the model's torch.fx graph.

When everything between a layer's output :math:`z` and the model's output is piecewise linear in
:math:`z` (ReLU, pooling, BatchNorm with running statistics, Linear and conv layers, residual
additions, reshapes, multiplication by something that does not depend on :math:`z`), the second
derivative of the output in :math:`z` vanishes almost everywhere, so the Hessian of a
cross-entropy or MSE loss in the layer's weight equals its Gauss-Newton block and the closed
forms of relative flatness are exact. :func:`famviz.curvature.piecewise_linear_after` proves this
for ``nn.Sequential`` stacks; :func:`piecewise_linear_graph` proves it for any fx-traceable model,
such as a ResNet whose blocks add a shortcut. Anything it does not recognize makes it answer
False (the caller then uses Hessian-vector products), never a wrong True.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .curvature import PIECEWISE_LINEAR

__all__ = ["piecewise_linear_graph"]

#: parameter-holding or adaptive modules that are (piecewise) linear in their input
_MODULES: tuple[type[nn.Module], ...] = PIECEWISE_LINEAR + (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.ReLU6, nn.Hardtanh, nn.PReLU,
    nn.ZeroPad2d,
)
#: functions linear or piecewise linear in all their tensor arguments
_FUNCTIONS = frozenset({
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos,
    operator.getitem, torch.add, torch.sub, torch.cat, torch.stack, torch.flatten,
    torch.relu, torch.relu_, F.relu, F.relu_, F.leaky_relu, F.relu6, F.hardtanh,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.mean, torch.sum,
})
#: functions linear in their first argument when only it depends on the layer
_SCALINGS = frozenset({operator.mul, operator.imul, torch.mul, operator.truediv, torch.div})
#: tensor methods that are (piecewise) linear
_METHODS = frozenset({
    "relu", "relu_", "flatten", "view", "reshape", "mean", "sum", "permute", "transpose",
    "contiguous", "squeeze", "unsqueeze", "add", "add_", "sub", "sub_", "neg", "clone",
    "__getitem__",
})
#: tensor methods whose result does not depend on the values (shapes)
_SHAPES = frozenset({"size", "dim"})
#: attributes read with getattr (``z.shape[0]``) that do not depend on the values
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def _args(node: fx.Node) -> list:
    flat: list = []
    fx.node.map_arg((node.args, node.kwargs), flat.append)
    return flat


def _linear_step(node: fx.Node, dep: set, modules: dict, bn: str) -> bool:
    if node.op == "output":
        return True
    if node.op == "call_module":
        allowed = _MODULES + ((nn.modules.batchnorm._BatchNorm,) if bn == "eval" else ())
        return isinstance(modules.get(node.target), allowed)
    if node.op == "call_function" and node.target in _SCALINGS:
        first, rest = node.args[0], list(node.args[1:]) + list(node.kwargs.values())
        commutes = node.target in (operator.mul, operator.imul, torch.mul)
        deps = [a for a in [first, *rest] if isinstance(a, fx.Node) and a in dep]
        # z * c, c * z, z / c: linear in z when c does not depend on it
        return len(deps) == 1 and (deps[0] is first or commutes)
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    if node.op == "call_method":
        return node.target in _METHODS
    return False


def piecewise_linear_graph(model: nn.Module, layer: str, bn: str = "eval") -> bool:
    """True when ``layer`` is called once in ``model``'s fx graph and every operation between
    its output and the model's output is piecewise linear in that output (see the module
    docstring); False when the model cannot be traced, uses hooks, or anything is unknown."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False  # hooks are not in the fx graph: they might do anything
    try:
        graph = fx.Tracer().trace(model)
    except Exception:  # not traceable (control flow on values, ...): no proof
        return False
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    direct = [n for n in graph.nodes
              if n.op == "get_attr" and str(n.target).startswith(layer + ".")]
    if len(calls) != 1 or direct:
        return False
    dep = {calls[0]}
    reached_output = False
    for node in graph.nodes:
        if node in dep or not any(isinstance(a, fx.Node) and a in dep for a in _args(node)):
            continue
        if (node.op == "call_method" and node.target in _SHAPES) or (
                node.op == "call_function" and node.target is builtins.getattr
                and node.args[1] in _SHAPE_ATTRIBUTES):
            continue  # a shape, not a value of z
        if not _linear_step(node, dep, modules, bn):
            return False
        reached_output |= node.op == "output"
        dep.add(node)
    return reached_output
