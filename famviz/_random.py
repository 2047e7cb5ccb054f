"""Private randomness: exact integer seeds, private ``torch.Generator`` streams, and dropout that
draws from such a stream instead of torch's process-wide generator.

famviz never reads from or reseeds torch's global RNG (``torch.manual_seed`` state): a call
with a seed gives the same result whatever else the process draws, also when two calls run at
once in different threads. Everything random here comes from a ``torch.Generator`` owned by the
call.

* :func:`check_seed` accepts exact Python integers in ``[0, 2**64)`` (the range of
  ``torch.Generator.manual_seed``) and nothing else: a float would round (2**60 and 2**60 + 1
  are the same float), a bool is a mistake, a negative seed would alias ``seed + 2**64``.
* :func:`derive_seed` gives independent streams for the parts of one computation (batch order,
  dropout, ...) from one seed, by hashing, without float arithmetic or overflow.
* :func:`seed_dropout` turns the dropout modules of a (private) model into versions that draw
  their masks from a given generator; :func:`unseed_dropout` undoes it.
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
from torch import Tensor, nn

__all__ = [
    "SEED_LIMIT",
    "check_seed",
    "derive_seed",
    "make_generator",
    "SEEDED_DROPOUT",
    "SeededDropout",
    "seed_dropout",
    "unseed_dropout",
    "global_rng_state",
]

#: seeds are integers in [0, SEED_LIMIT): what ``torch.Generator.manual_seed`` takes exactly
SEED_LIMIT = 2**64


def check_seed(name: str, seed) -> int:
    """``seed`` as an exact Python int in ``[0, 2**64)``, else a clear error.

    Accepts ``int`` and integer types such as ``numpy.int64``; refuses bools, floats (which
    round: ``float(2**60 + 1) == 2**60``), negative numbers and numbers from ``2**64`` on.

    >>> check_seed("seed", 2**60 + 1) - 2**60
    1
    >>> check_seed("seed", 1.0)
    Traceback (most recent call last):
    ...
    TypeError: seed must be an integer in [0, 2**64), got float 1.0; pass int(seed) if it is \
a whole number
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        hint = ("; pass int(seed) if it is a whole number"
                if isinstance(seed, float) and math.isfinite(seed) else "")
        raise TypeError(f"{name} must be an integer in [0, 2**64), got "
                        f"{type(seed).__name__} {seed!r}{hint}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64) (torch generators take 64-bit seeds), "
                         f"got {seed}; reduce it, e.g. {name} % 2**64")
    return seed


def derive_seed(seed: int, label: str) -> int:
    """An independent 64-bit seed for the part ``label`` of a computation seeded by ``seed``
    (BLAKE2b of both: different labels or seeds give unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_generator(seed: int, device) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded with ``seed`` (checked by
    :func:`check_seed`)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(check_seed("seed", seed))
    return gen


def global_rng_state(device) -> list[Tensor]:
    """The state of torch's global generator(s) that work on ``device`` would use: the CPU
    generator, and the current one of a CUDA device. Only read (to detect draws)."""
    device = torch.device(device)
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


# ------------------------------------------------------------------------- seeded dropout

#: SELU's scale × alpha: alpha dropout keeps a SELU network's mean and variance with it
_ALPHA = 1.7580993408473766


def _noise_shape(x: Tensor, kind: str) -> tuple[int, ...]:
    """Shape of the mask as torch's functional dropout draws it: elementwise, or one value
    per channel (``(N, C, 1, ...)``; ``(C, 1, ...)`` for an unbatched input of Dropout1d/3d)."""
    if kind == "element":
        return tuple(x.shape)
    unbatched = {"feature1d": 2, "feature3d": 4}.get(kind)
    if x.ndim == unbatched:
        return (x.shape[0],) + (1,) * (x.ndim - 1)
    if x.ndim < 2:
        raise ValueError(f"channel-wise dropout needs an input with a channel dimension, got "
                         f"shape {tuple(x.shape)}")
    return (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)


def _seeded_forward(self, x: Tensor) -> Tensor:
    """The dropout of the original module, with the mask drawn from ``self.generator``:
    train mode → a Bernoulli(1 − p) mask scaled by 1/(1 − p) (alpha dropout: the affine map
    that keeps SELU's mean and variance); eval mode or p = 0 → the identity; p = 1 → zeros."""
    if not self.training or self.p == 0:
        return x
    if self.p == 1:
        return x.mul_(0) if self.inplace else x * 0
    noise = torch.empty(_noise_shape(x, self._famviz_kind), dtype=x.dtype, device=x.device)
    noise.bernoulli_(1 - self.p, generator=self.generator)
    if not self._famviz_alpha:
        noise.div_(1 - self.p)
        return x.mul_(noise) if self.inplace else x * noise
    a = 1.0 / math.sqrt((_ALPHA**2 * self.p + 1) * (1 - self.p))
    b = (noise - 1) * (_ALPHA * a) + _ALPHA * a * self.p
    noise = noise * a
    return x.mul_(noise).add_(b) if self.inplace else x * noise + b


def _seeded_class(base: type[nn.Module], kind: str, alpha: bool) -> type[nn.Module]:
    """A subclass of ``base`` (so every ``isinstance`` check still holds) whose forward is
    :func:`_seeded_forward`."""
    return type(f"Seeded{base.__name__}", (base,), {
        "forward": _seeded_forward,
        "_famviz_kind": kind,
        "_famviz_alpha": alpha,
        "__module__": __name__,
        "__doc__": f"{base.__name__} drawing its mask from ``self.generator`` "
                   "(see :func:`famviz._random.seed_dropout`).",
    })


#: torch dropout module → its seeded version (exact types only: a subclass may have its own
#: forward, which famviz leaves alone)
SEEDED_DROPOUT: dict[type, type] = {
    nn.Dropout: _seeded_class(nn.Dropout, "element", False),
    nn.Dropout1d: _seeded_class(nn.Dropout1d, "feature1d", False),
    nn.Dropout2d: _seeded_class(nn.Dropout2d, "feature", False),
    nn.Dropout3d: _seeded_class(nn.Dropout3d, "feature3d", False),
    nn.AlphaDropout: _seeded_class(nn.AlphaDropout, "element", True),
    nn.FeatureAlphaDropout: _seeded_class(nn.FeatureAlphaDropout, "feature", True),
}
_ORIGINAL = {seeded: base for base, seeded in SEEDED_DROPOUT.items()}
#: the seeded ``nn.Dropout`` (``SeededDropout(p)`` then ``module.generator = gen`` by hand, or
#: :func:`seed_dropout` on a whole model)
SeededDropout = SEEDED_DROPOUT[nn.Dropout]


def seed_dropout(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Make every ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` and
    ``FeatureAlphaDropout`` module of ``model`` draw its masks from ``generator``, in place;
    returns their names. The semantics are torch's (same mask shapes, scaling and modes);
    only the source of the random bits changes. Meant for a private copy of a model (famviz
    never changes the caller's); :func:`unseed_dropout` restores the original classes.

    Dropout that does not go through these modules — ``torch.nn.functional.dropout`` called in
    a custom ``forward``, or a subclass with its own ``forward`` — still draws from torch's
    global RNG: callers detect it by comparing :func:`global_rng_state` around a forward pass.
    """
    names = []
    for name, module in model.named_modules():
        seeded = SEEDED_DROPOUT.get(type(module))
        if seeded is not None:
            module.__class__ = seeded
            module.generator = generator
            names.append(name)
    return names


def unseed_dropout(model: nn.Module) -> None:
    """Undo :func:`seed_dropout`: the original dropout classes, no generator attribute."""
    for module in model.modules():
        base = _ORIGINAL.get(type(module))
        if base is not None:
            module.__class__ = base
            del module.generator
