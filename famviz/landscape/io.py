"""Saving and loading slices: ``.npz`` arrays plus a JSON header, never pickle.

Files may come from someone else, so :func:`load` trusts nothing in them. It never unpickles
and never runs code; it reads only regular files; it checks the zip directory (member names,
count, sizes, compression) and every ``.npy`` header (dtype, shape, declared length) before any
array data is read or decompressed, so a zip bomb or a huge declared shape is refused having
read a few kilobytes; the JSON header is size- and depth-limited; the axes, shapes and metadata
must be exactly what :func:`save` writes. Anything else is a ``ValueError`` that says which part
of the file is wrong.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .slices import DEFAULT_MEMORY_BUDGET, Slice1D, Slice2D

__all__ = ["save", "load", "FORMAT", "DEFAULT_MAX_BYTES", "MAX_HEADER_CHARS", "MAX_JSON_DEPTH"]

#: written into every file; load refuses other formats
FORMAT = "famviz.slice/1"
#: default cap on the uncompressed size of a file's members (as much as slice_2d's results may
#: take under its default memory budget)
DEFAULT_MAX_BYTES = DEFAULT_MEMORY_BUDGET
#: the JSON header's longest length (characters) and deepest nesting; save writes far less
MAX_HEADER_CHARS = 1 << 20
MAX_JSON_DEPTH = 32

_AXES = {"Slice1D": ("x",), "Slice2D": ("x", "y")}
#: arrays on the grid: values always, the others when the slice has them
_GRIDS = ("values", "accuracy", "test_values", "test_accuracy")
_HEADER_KEYS = ("format", "kind", "centre_loss", "meta")
_MEMBERS = {f"{k}.npy" for k in ("header", "x", "y", *_GRIDS)}
#: numpy writes ``.npy`` headers of under 200 bytes for these arrays
_MAX_NPY_HEADER = 4096
#: zip bookkeeping (local headers, central directory) of at most len(_MEMBERS) members
_MAX_ZIP_DIRECTORY = 1 << 16
_ZIP_END = struct.Struct("<4s4H2LH")  # end of central directory record
_NPY_MAGIC = b"\x93NUMPY"


class _Bad(ValueError):
    """Raised inside load; re-raised with the path in front."""


# ------------------------------------------------------------------------------ the contract


def _check_slice(kind: str, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Everything :func:`save` guarantees about a slice; raises :class:`_Bad` otherwise.

    ``arrays`` holds the axes and the grid arrays present (float64).
    """
    if not isinstance(header.get("meta"), dict):
        raise _Bad(f"meta must be a dict, got {type(header.get('meta')).__name__}")
    centre = header.get("centre_loss")
    if isinstance(centre, bool) or not isinstance(centre, (int, float)):
        raise _Bad(f"centre_loss must be a number, got {centre!r}")
    axes = _AXES[kind]
    for a in axes:
        v = arrays[a]
        if v.ndim != 1 or len(v) < 2:
            raise _Bad(f"axis {a!r} must be 1-D with at least 2 points, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise _Bad(f"axis {a!r} contains NaN or inf")
        if not (np.diff(v) > 0).all():
            raise _Bad(f"axis {a!r} is not strictly increasing")
        if not (v == 0).any():
            raise _Bad(f"axis {a!r} does not contain 0, the unperturbed model (the centre)")
    shape = tuple(len(arrays[a]) for a in axes)
    for k in _GRIDS:
        if k in arrays and arrays[k].shape != shape:
            raise _Bad(f"array {k!r} has shape {arrays[k].shape}, the axes give {shape}")
    for k in ("accuracy", "test_accuracy"):
        if k in arrays and ((arrays[k] < 0) | (arrays[k] > 1)).any():
            raise _Bad(f"array {k!r} has values outside [0, 1]")
    has = {k for k in _GRIDS if k in arrays}
    if "test_accuracy" in has and not {"accuracy", "test_values"} <= has:
        raise _Bad("test_accuracy without accuracy and test_values")
    if {"accuracy", "test_values"} <= has and "test_accuracy" not in has:
        raise _Bad("accuracy and test_values without test_accuracy")
    at_centre = arrays["values"][tuple(int(np.flatnonzero(arrays[a] == 0)[0]) for a in axes)]
    if not (float(at_centre) == centre or (math.isnan(at_centre) and math.isnan(centre))):
        raise _Bad(f"centre_loss {centre!r} differs from the value at the centre "
                   f"{float(at_centre)!r}")


def _json_depth(text: str) -> int:
    """Deepest nesting of ``[`` and ``{`` outside JSON strings, without parsing."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    steps = (1 if c in "[{" else -1 for c in re.sub(r"[^\[\]{}]", "", outside))
    return max(itertools.accumulate(steps, initial=0))


# ------------------------------------------------------------------------------------- save


def save(result: Slice1D | Slice2D, path) -> Path:
    """Write ``result`` to ``path`` (``.npz`` is appended if missing); returns the path.

    The file holds float64 arrays (``x``, ``y`` for a 2-D slice, ``values`` and whichever of
    ``accuracy``, ``test_values``, ``test_accuracy`` the slice has) and a JSON header with the
    format, the kind, ``centre_loss`` and ``meta``. It is checked against what :func:`load`
    accepts before anything is written (a file over :data:`DEFAULT_MAX_BYTES` is read back
    with ``load(path, max_bytes=...)``).

    Raises:
        TypeError: ``result`` is not a slice, ``path`` not a path, or ``meta`` not JSON.
        ValueError: the slice breaks the contract :func:`load` checks (an axis without 0,
            mismatched shapes, ...).
    """
    if not isinstance(result, (Slice1D, Slice2D)):
        raise TypeError(f"can only save Slice1D or Slice2D, got {type(result).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    kind = "Slice2D" if isinstance(result, Slice2D) else "Slice1D"
    header = {"format": FORMAT, "kind": kind, "centre_loss": result.centre_loss,
              "meta": result.meta}
    arrays = {a: getattr(result, a) for a in (*_AXES[kind], *_GRIDS)}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if v is not None}
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot save: centre_loss and meta must be JSON-serializable ({exc})"
                        ) from exc
    if len(text) > MAX_HEADER_CHARS or _json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"cannot save: the JSON header (meta) is longer than "
                         f"{MAX_HEADER_CHARS} characters or nested deeper than {MAX_JSON_DEPTH}")
    try:
        _check_slice(kind, json.loads(text), arrays)
    except _Bad as exc:
        raise ValueError(f"cannot save this {kind}: {exc}") from None
    arrays["header"] = np.array(text)  # a unicode array, not an object
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------- load


def _open_regular(path: Path, max_bytes: int):
    """Open ``path`` for reading if it is a regular file of plausible size."""
    if path.suffix != ".npz":
        raise _Bad(f"the name {path.name!r} does not end in .npz; famviz slice files are "
                   ".npz (save appends it)")
    if path.is_dir():
        raise _Bad("it is a directory")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; checked on the open file itself
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad("it is not a regular file (a device, pipe or socket)")
        if st.st_size > max_bytes + _MAX_ZIP_DIRECTORY:
            raise _Bad(f"it is {st.st_size / 2**20:.1f} MiB, more than "
                       f"max_bytes={max_bytes / 2**20:.1f} MiB; pass a larger max_bytes= if "
                       "you trust the file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, st.st_size


def _check_zip_end(f, size: int) -> None:
    """Refuse archives whose central directory is too large to be a slice file, before
    zipfile parses it."""
    tail_len = min(size, _ZIP_END.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or i + _ZIP_END.size > len(tail):
        raise _Bad("not a readable .npz archive (no zip directory)")
    _, _, _, _, entries, cd_size, _, _ = _ZIP_END.unpack_from(tail, i)
    if entries > len(_MEMBERS) or cd_size > _MAX_ZIP_DIRECTORY:
        raise _Bad(f"its zip directory lists {entries} members in {cd_size} bytes; a slice "
                   f"file has at most {len(_MEMBERS)}")
    f.seek(0)


def _check_directory(zf: zipfile.ZipFile, max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    if "header.npy" not in zf.namelist():
        raise _Bad("no JSON header (member 'header.npy'): not written by famviz.landscape.save")
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        if name not in _MEMBERS:
            raise _Bad(f"unexpected member {name!r}; a slice file holds only "
                       f"{sorted(_MEMBERS)}")
        if name in infos:
            raise _Bad(f"member {name!r} appears twice")
        if info.flag_bits & 0x1:
            raise _Bad(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Bad(f"member {name!r} uses zip compression method {info.compress_type}; "
                       "only stored or deflated members are read")
        infos[name] = info
    total = sum(i.file_size for i in infos.values())
    if total > max_bytes:
        raise _Bad(f"its members declare {total / 2**20:.1f} MiB uncompressed, more than "
                   f"max_bytes={max_bytes / 2**20:.1f} MiB; pass a larger max_bytes= if you "
                   "trust the file")
    return infos


def _read_npy_header(fp, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and the header's length in bytes of the ``.npy`` in ``fp``,
    having read only the header."""
    start = fp.read(10)
    if len(start) < 10 or start[:6] != _NPY_MAGIC:
        raise _Bad(f"member {name!r} is not a .npy array (no npy header)")
    major = start[6]
    if major == 1:
        (hlen,), used = struct.unpack("<H", start[8:10]), 10
    elif major == 2:
        more = fp.read(2)
        if len(more) < 2:
            raise _Bad(f"member {name!r} is truncated inside its npy header")
        (hlen,), used = struct.unpack("<I", start[8:10] + more), 12
    else:
        raise _Bad(f"member {name!r} has npy format version {major}; only 1 and 2 are read")
    if hlen > _MAX_NPY_HEADER:
        raise _Bad(f"member {name!r} has an npy header of {hlen} bytes, more than "
                   f"{_MAX_NPY_HEADER}")
    text = fp.read(hlen)
    if len(text) < hlen:
        raise _Bad(f"member {name!r} is truncated inside its npy header")
    reader = (np.lib.format.read_array_header_1_0 if major == 1
              else np.lib.format.read_array_header_2_0)
    try:  # numpy parses the header dict with ast.literal_eval: no code runs
        shape, fortran, dtype = reader(io.BytesIO(start[8:used] + text),
                                       max_header_size=_MAX_NPY_HEADER)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
        raise _Bad(f"member {name!r} has an invalid npy header ({exc})") from None
    return tuple(shape), bool(fortran), dtype, used + hlen


def _read_member(zf, info, name: str, expect_kind: str, max_ndim: int
                 ) -> tuple[zipfile.ZipExtFile, tuple[int, ...], bool, np.dtype]:
    """Open a member and check its npy header against the zip directory; returns the open
    member positioned at its data."""
    fp = zf.open(info)
    shape, fortran, dtype, used = _read_npy_header(fp, name)
    if dtype.hasobject:
        raise _Bad(f"member {name!r} holds Python objects that would need unpickling; slice "
                   "files hold float64 arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _Bad(f"member {name!r} has the structured dtype {dtype}; slice files hold "
                   "float64 arrays")
    if expect_kind == "f" and not (dtype.kind == "f" and dtype.itemsize == 8):
        raise _Bad(f"array {name[:-4]!r} has dtype {dtype}, expected float64")
    if expect_kind == "U" and dtype.kind != "U":
        raise _Bad(f"the header has dtype {dtype}, expected a unicode string")
    if len(shape) > max_ndim or any(not isinstance(n, int) or n < 0 for n in shape):
        raise _Bad(f"member {name!r} has shape {shape}; expected at most {max_ndim} "
                   "dimension(s)")
    nbytes = math.prod(shape) * dtype.itemsize
    if used + nbytes != info.file_size:
        raise _Bad(f"member {name!r} declares shape {shape} of {dtype} ({nbytes} bytes of "
                   f"data) but the archive says it holds {info.file_size - used}: it is "
                   "truncated or inconsistent")
    return fp, shape, fortran, dtype


def _read_data(fp, name: str, shape, fortran: bool, dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    data = fp.read(nbytes)
    if len(data) != nbytes or fp.read(1):  # the extra read also makes zipfile check the CRC
        raise _Bad(f"member {name!r} is truncated or longer than its header says")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_header(member, max_chars: int) -> dict:
    fp, shape, fortran, dtype = member
    if dtype.itemsize // 4 > max_chars:
        raise _Bad(f"the JSON header has {dtype.itemsize // 4} characters, more than "
                   f"{max_chars}")
    raw = _read_data(fp, "header.npy", shape, fortran, dtype)
    try:
        text = str(raw[()])
    except (ValueError, UnicodeError) as exc:
        raise _Bad(f"the header is not valid text ({exc})") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise _Bad(f"the JSON header is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _Bad(f"the JSON header is a {type(header).__name__}, expected an object")
    if header.get("format") != FORMAT:
        raise _Bad(f"format {header.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing:
        raise _Bad(f"the JSON header lacks {missing}")
    extra = sorted(set(header) - set(_HEADER_KEYS))
    if extra:
        raise _Bad(f"the JSON header has unexpected keys {extra}")
    if header["kind"] not in _AXES:
        raise _Bad(f"unknown kind {header['kind']!r}; expected 'Slice1D' or 'Slice2D'")
    return header


def load(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Slice1D | Slice2D:
    """Read a slice written by :func:`save`, safely, from a file that may be hostile.

    Args:
        path: a ``.npz`` file.
        max_bytes: the most bytes the file's members may hold uncompressed (and the file on
            disk, give or take its zip directory); larger files are refused before they are
            read.

    Raises:
        ValueError: the file is not a famviz slice file: not a regular ``.npz`` file, too large,
            an unexpected or damaged member, a dtype or shape other than :func:`save` writes,
            a bad JSON header, an axis without 0, ... The message names the part.
        FileNotFoundError: no such file.
        TypeError: ``path`` is not a path or ``max_bytes`` not an int (ValueError if < 1).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int number of bytes, got {max_bytes!r}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    path = Path(path)
    try:
        f, size = _open_regular(path, max_bytes)
        with f:
            _check_zip_end(f, size)
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
                    struct.error, NotImplementedError) as exc:
                raise _Bad(f"not a readable .npz archive ({exc})") from None
            with zf:
                return _load_members(zf, max_bytes)
    except _Bad as exc:
        raise ValueError(f"{path} is not a famviz slice file: {exc}") from None
    except (zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error) as exc:
        raise ValueError(f"{path} is not a famviz slice file: a member is damaged ({exc})"
                         ) from None


def _load_members(zf: zipfile.ZipFile, max_bytes: int) -> Slice1D | Slice2D:
    infos = _check_directory(zf, max_bytes)
    opened = {}
    try:
        # every npy header first, checked against the zip directory before any data is read
        for name, info in infos.items():
            is_header = name == "header.npy"
            opened[name[:-4]] = _read_member(zf, info, name, "U" if is_header else "f",
                                             0 if is_header else 2)
        header = _read_header(opened.pop("header"), MAX_HEADER_CHARS)
        kind = header["kind"]
        axes = _AXES[kind]
        extra = sorted(set(opened) - {*axes, *_GRIDS})
        if extra:
            raise _Bad(f"a {kind} has no array(s) {extra}")
        missing = [k for k in (*axes, "values") if k not in opened]
        if missing:
            raise _Bad(f"missing arrays {missing}")
        for a in axes:
            if len(opened[a][1]) != 1:
                raise _Bad(f"axis {a!r} has shape {opened[a][1]}, expected 1-D")
        grid = tuple(opened[a][1][0] for a in axes)
        for key, (_, shape, _, _) in opened.items():
            if key in _GRIDS and shape != grid:
                raise _Bad(f"array {key!r} has shape {shape}, the axes give {grid}")
        arrays = {key: _read_data(fp, f"{key}.npy", shape, fortran, dtype).astype(np.float64)
                  for key, (fp, shape, fortran, dtype) in opened.items()}
    finally:
        for fp, *_ in opened.values():
            fp.close()
    _check_slice(kind, header, arrays)
    opt = {k: arrays.get(k) for k in _GRIDS[1:]}
    centre = float(header["centre_loss"])
    if kind == "Slice1D":
        return Slice1D(arrays["x"], arrays["values"], opt["accuracy"], opt["test_values"],
                       opt["test_accuracy"], centre, header["meta"])
    return Slice2D(arrays["x"], arrays["y"], arrays["values"], opt["accuracy"],
                   opt["test_values"], opt["test_accuracy"], centre, header["meta"])
