"""Saving and loading slices: ``.npz`` arrays plus JSON metadata, never pickle.

Files may come from someone else, so :func:`load` reads with ``allow_pickle=False`` and checks
every key and shape: a malformed or foreign file gives a clear ``ValueError``, never code
execution.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .slices import Slice1D, Slice2D

__all__ = ["save", "load", "FORMAT"]

#: written into every file; load refuses other formats
FORMAT = "famviz.slice/1"
_OPTIONAL = ("accuracy", "test_values", "test_accuracy")


def save(result: Slice1D | Slice2D, path) -> Path:
    """Write ``result`` to ``path`` (``.npz`` is appended if missing); returns the path."""
    if not isinstance(result, (Slice1D, Slice2D)):
        raise TypeError(f"can only save Slice1D or Slice2D, got {type(result).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    header = {"format": FORMAT, "kind": type(result).__name__, "centre_loss": result.centre_loss,
              "meta": result.meta}
    arrays = {"x": result.x, "values": result.values}
    if isinstance(result, Slice2D):
        arrays["y"] = result.y
    for key in _OPTIONAL:
        value = getattr(result, key)
        if value is not None:
            arrays[key] = value
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    arrays["header"] = np.array(json.dumps(header))  # a unicode array, not an object
    np.savez(path, **arrays)
    return path


def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path} is not a famviz slice file: {why}")


def load(path) -> Slice1D | Slice2D:
    """Read a file written by :func:`save`."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # np.load would otherwise try it as a pickle
        raise _bad(path, "not a readable .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _bad(path, f"not a readable .npz archive ({exc})") from exc
    except ValueError as exc:  # numpy refuses object (pickled) arrays with allow_pickle=False
        raise _bad(path, f"it holds data that would need unpickling ({exc})") from exc
    if "header" not in arrays or arrays["header"].dtype.kind != "U":
        raise _bad(path, "no JSON header")
    try:
        header = json.loads(str(arrays.pop("header")))
    except json.JSONDecodeError as exc:
        raise _bad(path, f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _bad(path, f"format {header.get('format') if isinstance(header, dict) else None!r}"
                   f", expected {FORMAT!r}")
    kind = header.get("kind")
    if kind not in ("Slice1D", "Slice2D"):
        raise _bad(path, f"unknown kind {kind!r}")
    axes = ["x"] + (["y"] if kind == "Slice2D" else [])
    missing = [k for k in axes + ["values"] if k not in arrays]
    if missing:
        raise _bad(path, f"missing arrays {missing}")
    for k, v in arrays.items():
        if v.dtype.kind != "f":
            raise _bad(path, f"array {k!r} has dtype {v.dtype}, expected floats")
    shape = tuple(len(arrays[a]) for a in axes)
    for k in ["values", *(_ for _ in _OPTIONAL if _ in arrays)]:
        if arrays[k].shape != shape:
            raise _bad(path, f"array {k!r} has shape {arrays[k].shape}, expected {shape}")
    extra = set(arrays) - set(axes) - {"values", *_OPTIONAL}
    if extra:
        raise _bad(path, f"unexpected arrays {sorted(extra)}")
    opt = {k: arrays.get(k) for k in _OPTIONAL}
    meta = header.get("meta", {})
    centre = float(header.get("centre_loss"))
    if kind == "Slice1D":
        return Slice1D(arrays["x"], arrays["values"], opt["accuracy"], opt["test_values"],
                       opt["test_accuracy"], centre, meta)
    return Slice2D(arrays["x"], arrays["y"], arrays["values"], opt["accuracy"],
                   opt["test_values"], opt["test_accuracy"], centre, meta)
