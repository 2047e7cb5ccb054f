"""landscape.save / load: real slices round-trip exactly; crafted, damaged and hostile files are
refused with a ValueError that names what is wrong, in bounded memory, and nothing in them is
ever unpickled or run."""

import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import famviz as fv
from famviz import landscape as ls
from famviz.landscape.io import FORMAT, MAX_HEADER_CHARS, MAX_JSON_DEPTH

from helpers import tiny_mlp

#: peak Python/numpy memory a refusal may take (the files below declare up to 80 MB)
PEAK_LIMIT = 4 << 20


@pytest.fixture(scope="module")
def slices():
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.25, seed=0)
    data, test = (X[:60].double(), y[:60] % 5), (Xt[:30].double(), yt[:30] % 5)
    model = tiny_mlp([64, 6, 5], seed=0)
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    two = ls.slice_2d(model, data, d1, d2, span=((-1, 1), (-0.5, 1)), steps=(5, 4),
                      test_data=test)
    one = ls.slice_1d(model, data, d1, steps=5)  # accuracy, no test data
    mse = ls.slice_1d(model, (data[0], torch.zeros(60, 5, dtype=torch.float64)), d1, steps=3,
                      loss="mse")  # no accuracy at all
    return one, two, mse


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=True)
    return buf.getvalue()


def header(kind="Slice1D", centre=0.0, meta=None, **changes) -> np.ndarray:
    h = {"format": FORMAT, "kind": kind, "centre_loss": centre, "meta": meta or {}, **changes}
    return np.array(json.dumps(h))


def craft(path, members, compression=zipfile.ZIP_STORED):
    """A zip of ``members`` (name -> array or raw bytes), written without numpy's checks."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, value in members.items():
            zf.writestr(name, value if isinstance(value, bytes) else npy(value))
    return path


def good_members(**changes):
    """The members of a valid 1-D slice (x = -1, 0, 1), with ``changes`` applied (None drops)."""
    m = {"x.npy": np.array([-1.0, 0.0, 1.0]), "values.npy": np.array([2.0, 1.0, 3.0]),
         "header.npy": header(centre=1.0)}
    m.update(changes)
    return {k: v for k, v in m.items() if v is not None}


def refused(path, fragment, **kwargs):
    """load(path) raises a ValueError containing ``fragment``, with a small memory peak."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            ls.load(path, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in str(info.value), str(info.value)
    assert "is not a famviz slice file" in str(info.value)
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.1f} MiB to refuse {path}"
    return str(info.value)


def test_real_slices_round_trip_exactly(slices, tmp_path):
    for s in slices:
        back = ls.load(ls.save(s, tmp_path / type(s).__name__))
        assert type(back) is type(s)
        for key in ("x", "y", "values", "accuracy", "test_values", "test_accuracy"):
            a, b = getattr(s, key, None), getattr(back, key, None)
            assert (a is None and b is None) or (np.array_equal(a, b) and b.dtype == np.float64)
        assert back.centre_loss == s.centre_loss and back.centre_index == s.centre_index
        assert back.meta == json.loads(json.dumps(s.meta))
    one, two, mse = slices
    assert two.test_accuracy is not None and mse.accuracy is None  # every optional case seen


def test_other_valid_encodings_load(slices, tmp_path):
    """Compressed archives, Fortran order and big-endian floats are still float64 slices."""
    _, two, _ = slices
    arrays = {k: getattr(two, k) for k in ("x", "y", "values", "accuracy", "test_values",
                                            "test_accuracy")}
    arrays["values"] = np.asfortranarray(two.values)
    arrays["accuracy"] = two.accuracy.astype(">f8")
    h = {"format": FORMAT, "kind": "Slice2D", "centre_loss": two.centre_loss, "meta": {}}
    np.savez_compressed(tmp_path / "z.npz", header=np.array(json.dumps(h)), **arrays)
    back = ls.load(tmp_path / "z.npz")
    assert np.array_equal(back.values, two.values) and np.array_equal(back.accuracy, two.accuracy)
    assert back.accuracy.dtype == np.float64


def _bomb(path, zeros, shape, lie=None):
    """x = (-1, 0, 1) and a deflated ``values.npy`` whose npy header declares ``shape`` and
    which holds ``zeros`` bytes of zeros (about 1000x smaller compressed). With ``lie`` the zip
    directory claims that the member has ``lie`` bytes."""
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False,
                                               "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy(np.array([-1.0, 0.0, 1.0])))
        zf.writestr("header.npy", npy(header(centre=0.0)))
        with zf.open("values.npy", "w") as f:
            f.write(hdr.getvalue())
            for _ in range(zeros >> 20):
                f.write(bytes(1 << 20))
    if lie is not None:  # the uncompressed size, in the local header and the central directory
        raw = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            struct.pack_into("<L", raw, zf.getinfo("values.npy").header_offset + 22, lie)
        i = raw.find(b"PK\x01\x02")
        while i >= 0:
            n = struct.unpack_from("<H", raw, i + 28)[0]
            if raw[i + 46 : i + 46 + n] == b"values.npy":
                struct.pack_into("<L", raw, i + 24, lie)
            i = raw.find(b"PK\x01\x02", i + 4)
        path.write_bytes(bytes(raw))
    return path


def test_zip_bombs_are_refused_before_decompression(tmp_path):
    zeros = 80 << 20  # 80 MiB of zeros, about 80 KiB on disk
    bomb = _bomb(tmp_path / "bomb.npz", zeros, (zeros // 8,))
    assert bomb.stat().st_size < 200_000
    refused(bomb, "array 'values' has shape (10485760,), the axes give (3,)")
    refused(bomb, "members declare 80.0 MiB uncompressed, more than max_bytes=1.0 MiB",
            max_bytes=1 << 20)
    # the directory claims 3 floats, as the npy header does: decompression stops there
    liar = _bomb(tmp_path / "liar.npz", zeros, (3,), lie=len(npy(np.zeros(3))))
    refused(liar, "a member is damaged")


def test_huge_declared_shapes_are_refused_from_the_headers(tmp_path):
    for name, shape in [("values.npy", (10**6, 10**6)), ("x.npy", (10**12,))]:
        hdr = io.BytesIO()
        np.lib.format.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False,
                                                   "shape": shape})
        path = craft(tmp_path / f"huge_{name}.npz",
                     good_members(**{name: hdr.getvalue() + bytes(24)}))
        refused(path, f"member {name!r} declares shape {shape}")


CASES = {
    # archive level
    "foreign member": (good_members(**{"evil.py": b"import os"}), "unexpected member 'evil.py'"),
    "nested member": (good_members(**{"x/../values.npy": b""}), "unexpected member"),
    "no header": (good_members(**{"header.npy": None}), "no JSON header"),
    "numpy's pickle": (good_members(**{"values.npy": np.array([object()] * 3)}),
                       "would need unpickling"),
    "non-npy member": (good_members(**{"values.npy": b"just some text, no npy magic"}),
                       "member 'values.npy' is not a .npy array"),
    "pickle as member": (good_members(**{"values.npy": pickle.dumps([1.0, 2.0, 3.0])}),
                         "member 'values.npy' is not a .npy array"),
    "truncated member": (good_members(**{"values.npy": npy(np.array([2.0, 1.0, 3.0]))[:-5]}),
                         "member 'values.npy' declares shape (3,)"),
    "truncated npy header": (good_members(**{"values.npy": npy(np.zeros(3))[:40]}),
                             "truncated inside its npy header"),
    "bad npy header": (good_members(**{"values.npy": npy(np.zeros(3)).replace(b"'<f8'",
                                                                              b"__import__")}),
                       "invalid npy header"),
    "npy version 3": (good_members(**{"values.npy": npy(np.zeros(3)).replace(b"\x01\x00v",
                                                                             b"\x03\x00v", 1)}),
                      "npy format version 3"),
    "float32": (good_members(**{"values.npy": np.zeros(3, np.float32)}), "expected float64"),
    "ints": (good_members(**{"x.npy": np.array([-1, 0, 1])}), "expected float64"),
    "structured": (good_members(**{"values.npy": np.zeros(3, [("a", "<f8")])}),
                   "structured dtype"),
    "3-D array": (good_members(**{"values.npy": np.zeros((3, 1, 1))}),
                  "expected at most 2 dimension(s)"),
    "header not text": (good_members(**{"header.npy": np.zeros(3)}),
                        "the header has dtype float64"),
    # the JSON header
    "not JSON": (good_members(**{"header.npy": np.array("{format: famviz")}),
                 "the header is not JSON"),
    "deep JSON": (good_members(**{"header.npy": np.array("[" * 100_000 + "]" * 100_000)}),
                  f"nested deeper than {MAX_JSON_DEPTH}"),
    "deep meta": (good_members(**{"header.npy": header(meta={"a": json.loads(
        "[" * 40 + "]" * 40)})}), "nested deeper"),
    "long header": (good_members(**{"header.npy": np.array(" " * (MAX_HEADER_CHARS + 1))}),
                    "characters, more than"),
    "JSON list": (good_members(**{"header.npy": np.array("[1, 2]")}),
                  "the JSON header is a list, expected an object"),
    "other format": (good_members(**{"header.npy": header(format="famviz.slice/0")}),
                     "format 'famviz.slice/0'"),
    "unknown kind": (good_members(**{"header.npy": header(kind="Slice3D")}),
                     "unknown kind 'Slice3D'"),
    "missing key": (good_members(**{"header.npy": np.array(json.dumps(
        {"format": FORMAT, "kind": "Slice1D", "meta": {}}))}), "lacks ['centre_loss']"),
    "extra key": (good_members(**{"header.npy": header(centre=1.0, code="import os")}),
                  "unexpected keys ['code']"),
    "meta not a dict": (good_members(**{"header.npy": header(centre=1.0, meta=[1, 2])}),
                        "meta must be a dict, got list"),
    "meta a string": (good_members(**{"header.npy": header(centre=1.0, meta="x")}),
                      "meta must be a dict, got str"),
    "centre a string": (good_members(**{"header.npy": header(centre="1.0")}),
                        "centre_loss must be a number"),
    "centre elsewhere": (good_members(**{"header.npy": header(centre=2.0)}),
                         "centre_loss 2.0 differs from the value at the centre 1.0"),
    # arrays against the kind and each other
    "missing values": (good_members(**{"values.npy": None}), "missing arrays ['values']"),
    "y in a 1-D slice": (good_members(**{"y.npy": np.array([0.0, 1.0])}),
                         "a Slice1D has no array(s) ['y']"),
    "shape mismatch": (good_members(**{"values.npy": np.zeros(4)}),
                       "array 'values' has shape (4,), the axes give (3,)"),
    "2-D axis": (good_members(**{"x.npy": np.zeros((3, 1))}), "axis 'x' has shape (3, 1)"),
    "axis without 0": (good_members(**{"x.npy": np.array([0.5, 1.0, 1.5])}),
                       "axis 'x' does not contain 0"),
    "NaN axis": (good_members(**{"x.npy": np.array([-1.0, 0.0, np.nan])}),
                 "axis 'x' contains NaN or inf"),
    "axis backwards": (good_members(**{"x.npy": np.array([1.0, 0.0, -1.0])}),
                       "axis 'x' is not strictly increasing"),
    "one-point axis": (good_members(**{"x.npy": np.array([0.0]), "values.npy": np.ones(1)}),
                       "at least 2 points"),
    "accuracy above 1": (good_members(**{"accuracy.npy": np.array([0.5, 2.0, 0.0])}),
                         "array 'accuracy' has values outside [0, 1]"),
    "test accuracy alone": (good_members(**{"test_accuracy.npy": np.zeros(3)}),
                            "test_accuracy without accuracy and test_values"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_files_are_refused(case, tmp_path):
    members, fragment = CASES[case]
    refused(craft(tmp_path / "f.npz", members), fragment)


def test_archive_level_refusals(tmp_path):
    dup = tmp_path / "dup.npz"
    with pytest.warns(UserWarning, match="Duplicate name"):
        craft(dup, good_members())
        with zipfile.ZipFile(dup, "a") as zf:
            zf.writestr("x.npy", npy(np.zeros(3)))
    refused(dup, "member 'x.npy' appears twice")
    many = tmp_path / "many.npz"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(many, "w") as zf:
        for _ in range(1000):
            zf.writestr("x.npy", b"")
    refused(many, "its zip directory lists 1000 members")
    bz = craft(tmp_path / "bz.npz", good_members(), zipfile.ZIP_BZIP2)
    refused(bz, "zip compression method 12")
    good = craft(tmp_path / "good.npz", good_members())
    assert ls.load(good).centre_loss == 1.0
    half = tmp_path / "half.npz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(half, "not a readable .npz archive")
    refused(good, "more than max_bytes=0.0 MiB", max_bytes=100)
    (tmp_path / "text.npz").write_text("not a zip")
    refused(tmp_path / "text.npz", "not a readable .npz archive")
    (tmp_path / "empty.npz").write_bytes(b"")
    refused(tmp_path / "empty.npz", "not a readable .npz archive")
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": [0.0]}))
    refused(tmp_path / "pickle.npz", "not a readable .npz archive")


def test_special_paths_are_refused_without_reading(tmp_path):
    refused("/dev/zero", "'zero' does not end in .npz")
    zero = tmp_path / "zero.npz"
    zero.symlink_to("/dev/zero")
    refused(zero, "not a regular file")
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # and does not wait for a writer
    (tmp_path / "dir.npz").mkdir()
    refused(tmp_path / "dir.npz", "it is a directory")
    good = craft(tmp_path / "good.npz", good_members())
    renamed = tmp_path / "good.txt"
    renamed.write_bytes(good.read_bytes())
    refused(renamed, "'good.txt' does not end in .npz; famviz slice files are .npz")
    with pytest.raises(FileNotFoundError):
        ls.load(tmp_path / "nothing.npz")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        ls.load(3)
    with pytest.raises(TypeError, match="max_bytes must be an int number of bytes"):
        ls.load(good, max_bytes=1.5e9)
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        ls.load(good, max_bytes=0)


def test_save_writes_only_what_load_accepts(slices, tmp_path):
    one, two, _ = slices
    with pytest.raises(ValueError, match="cannot save this Slice1D: axis 'x' does not contain 0"):
        ls.save(ls.Slice1D(one.x + 5, one.values, None, None, None, one.centre_loss),
                tmp_path / "a")
    with pytest.raises(TypeError, match="meta must be JSON-serializable"):
        ls.save(ls.Slice1D(one.x, one.values, None, None, None, one.centre_loss,
                           {"model": torch.nn.Linear(1, 1)}), tmp_path / "b")
    with pytest.raises(ValueError, match="nested deeper"):
        ls.save(ls.Slice1D(one.x, one.values, None, None, None, one.centre_loss,
                           {"a": json.loads("[" * 40 + "]" * 40)}), tmp_path / "c")
    with pytest.raises(ValueError, match="array 'values' has shape"):
        ls.save(ls.Slice2D(two.x, two.y, two.values.T, None, None, None, two.centre_loss),
                tmp_path / "d")
    with pytest.raises(TypeError, match="can only save Slice1D or Slice2D"):
        ls.save(two.values, tmp_path / "e")
    assert not list(tmp_path.iterdir())  # nothing written by a refused save
