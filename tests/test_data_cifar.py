"""CIFAR batches: restricted unpickling (no code runs from a pickle) and the real file format."""

import builtins
import contextlib
import io
import os
import pickle
import signal
import struct
import time
import tracemalloc

import numpy as np
import pytest

from puregen.data import read_dataset
from puregen.data.cifar import ALLOWED_GLOBALS, load_cifar_batch, restricted_load, write_cifar_batch
from puregen.errors import InputError


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _globals_in(raw: bytes) -> set:
    """(module, name) pairs a pickle asks find_class for (loaded with the normal, trusted unpickler)."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(raw), encoding="bytes").load()
    return seen


# ------------------------------------------------ a batch as CIFAR's were written


def _s(b: bytes) -> bytes:  # Python 2 str: SHORT_BINSTRING / BINSTRING
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_cifar_pickle(images: np.ndarray, labels, *, code=b"u1", flags=0, data=None, cls=b"numpy\nndarray") -> bytes:
    """Protocol-2 bytes like Python 2 cPickle wrote for CIFAR-10 (numpy.core paths, str keys).

    The keyword arguments forge hostile variants (dtype code / flags, payload, class).
    """
    n = images.shape[0]
    if data is None:
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, 3072)).tobytes()
    dtype = (
        b"cnumpy\ndtype\n" + _s(code) + _int(0) + _int(1) + b"\x87R"
        + b"(" + _int(3) + _s(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(flags) + b"tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"c" + cls + b"\n" + _int(0) + b"\x85" + _s(b"b") + b"\x87R"
        + b"(" + _int(1) + _int(n) + _int(3072) + b"\x86" + dtype + b"\x89" + _s(data) + b"tb"
    )
    labels_list = b"](" + b"".join(_int(int(v)) for v in labels) + b"e"
    names = b"](" + b"".join(_s(f"img_{i}.png".encode()) for i in range(n)) + b"e"
    return (
        b"\x80\x02}("
        + _s(b"batch_label") + _s(b"training batch 1 of 5")
        + _s(b"labels") + labels_list
        + _s(b"data") + array
        + _s(b"filenames") + names
        + b"u."
    )


def test_python2_format_batch_loads(tmp_path):
    x = _images(7)
    y = [3, 1, 4, 1, 5, 9, 2]
    raw = _py2_cifar_pickle(x, y)
    assert _globals_in(raw) == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}
    p = tmp_path / "data_batch_1"
    p.write_bytes(raw)
    images, labels = load_cifar_batch(p)
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == y
    # the plain unpickler agrees (the bytes are a valid pickle of the CIFAR dict)
    ref = pickle.loads(raw, encoding="bytes")
    assert ref[b"labels"] == y and ref[b"data"].shape == (7, 3072)


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_writer_protocols_load(tmp_path, protocol):
    x, y = _images(4, seed=protocol), [0, 9, 5, 5]
    p = write_cifar_batch(tmp_path / f"b{protocol}", x, y, protocol=protocol)
    assert _globals_in(p.read_bytes()) <= set(ALLOWED_GLOBALS)
    images, labels = load_cifar_batch(p)
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == y


def test_channel_planes_layout(tmp_path):
    """Row = R plane, G plane, B plane, each 32x32 row-major."""
    x = np.zeros((1, 32, 32, 3), np.uint8)
    x[0, 2, 5] = [10, 20, 30]
    p = write_cifar_batch(tmp_path / "b", x, [0])
    data = pickle.loads(p.read_bytes(), encoding="bytes")[b"data"][0]
    assert data[0 * 1024 + 2 * 32 + 5] == 10
    assert data[1 * 1024 + 2 * 32 + 5] == 20
    assert data[2 * 1024 + 2 * 32 + 5] == 30


def test_allow_list_is_exactly_this():
    assert set(ALLOWED_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("__builtin__", "bytes"),  # Python 3 pickles b'' as bytes() at protocol 2
        ("builtins", "bytes"),
    }


# ------------------------------------------------------------ malicious pickles


def test_forged_dtype_flags_are_ignored(tmp_path):
    """numpy's own dtype.__setstate__ would trust these flags (63 = 'has object refs' etc.);
    the stand-ins never hand pickled state to numpy's C code."""
    x = _images(2)
    p = tmp_path / "data_batch_1"
    p.write_bytes(_py2_cifar_pickle(x, [0, 1], flags=63))
    images, _ = load_cifar_batch(p)
    np.testing.assert_array_equal(images, x)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"code": b"O8"}, "dtype b'O8'"),
        ({"code": b"V3072"}, "dtype b'V3072'"),
        ({"data": b"\0" * 100}, "100 data bytes"),
        ({"cls": b"numpy\ndtype"}, "class"),
        ({"cls": b"os\nsystem"}, "forbidden global 'os.system'"),
    ],
)
def test_forged_arrays_refused(tmp_path, kwargs, needle):
    p = tmp_path / "data_batch_1"
    p.write_bytes(_py2_cifar_pickle(_images(2), [0, 1], **kwargs))
    with pytest.raises(InputError) as ei:
        load_cifar_batch(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)



class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


class _Codecs:
    def __reduce__(self):
        import _codecs

        return (_codecs.encode, ("touch", "rot13"))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["system", "eval", "system_inside_valid_batch", "codecs"])
def test_malicious_pickle_refused_without_side_effect(tmp_path, attack, protocol):
    marker = tmp_path / "MARKER"
    if attack == "system":
        payload = _System(f"touch {marker}")
    elif attack == "eval":
        payload = _Eval(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    elif attack == "codecs":
        payload = _Codecs()
    else:
        payload = {
            b"batch_label": b"x",
            b"data": np.zeros((1, 3072), np.uint8),
            b"labels": [_System(f"touch {marker}")],
        }
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(InputError) as ei:
        read_dataset(p)
    msg = str(ei.value)
    assert str(p) in msg
    if attack == "codecs":
        assert "_codecs.encode" in msg
    else:
        assert "forbidden global" in msg
        assert ("system'" in msg) if "system" in attack else ("eval'" in msg)
    assert not marker.exists()


def test_numpy_scalar_global_refused(tmp_path):
    # numpy integer labels pickle through numpy.core.multiarray.scalar: not on the allow list
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [np.int64(1)]}, protocol=2))
    with pytest.raises(InputError, match="forbidden global 'numpy._core.multiarray.scalar'"):
        read_dataset(p, format="cifar")


def test_protocol5_frombuffer_refused(tmp_path):
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}, protocol=5))
    # protocol 5 stores the array as an in-band bytearray for numpy's _frombuffer: both refused
    with pytest.raises(InputError, match="opcode BYTEARRAY8|forbidden global 'numpy._core.numeric._frombuffer'"):
        read_dataset(p, format="cifar")


# ----------------------------------------------------------------- bad batches


def test_truncated_and_garbage_batches(tmp_path):
    good = write_cifar_batch(tmp_path / "good", _images(5), [0, 1, 2, 3, 4])
    raw = good.read_bytes()
    cut = tmp_path / "data_batch_1"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as ei:
        read_dataset(cut)
    assert str(cut) in str(ei.value)
    rng = np.random.default_rng(0)
    for i in range(20):
        junk = tmp_path / f"data_batch_{i + 2}"
        junk.write_bytes(b"\x80\x02" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
        with pytest.raises(InputError) as ei:
            read_dataset(junk)
        assert str(junk) in str(ei.value)


@pytest.mark.parametrize(
    "obj, needle",
    [
        ([1, 2, 3], "not a CIFAR batch dict"),
        ({b"labels": [1]}, "no b'data'"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [1]}, "dtype float32"),
        ({b"data": np.zeros((1, 3000), np.uint8), b"labels": [1]}, "3000 values per row"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "length 1 but there are 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, -1]}, "non-negative"),
    ],
)
def test_bad_batch_content(tmp_path, obj, needle):
    p = tmp_path / "test_batch"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InputError) as ei:
        read_dataset(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_labels_out_of_range_with_num_classes(tmp_path):
    p = write_cifar_batch(tmp_path / "test_batch", _images(3), [0, 10, 2])
    with pytest.raises(InputError, match="out of range"):
        read_dataset(p, num_classes=10)


# ------------------------------------------- bounded work for small hostile files


def _nested_shared(depth: int, width: int = 10) -> bytes:
    """A pickle of a few hundred bytes whose tree unfolding has width**depth leaves."""
    a: list = [1]
    for _ in range(depth):
        a = [a] * width
    return pickle.dumps({b"data": a, b"labels": [0]}, protocol=2)


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """A regression fails (TimeoutError) instead of hanging the suite."""
    def hang(signum, frame):
        raise TimeoutError(what)

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("depth", [8, 18])
def test_shared_references_are_walked_once(tmp_path, depth):
    # 8 deep took 159 s and 18 deep never ended: every path to a shared list was walked
    p = tmp_path / "data_batch_1"
    p.write_bytes(_nested_shared(depth))
    assert p.stat().st_size < 600

    started = time.perf_counter()
    with _deadline(30, "the shared references are still being walked"):
        with pytest.raises(InputError, match="b'data' is a list") as ei:
            load_cifar_batch(p)
    assert time.perf_counter() - started < 5
    assert str(p) in str(ei.value)


def test_shared_objects_stay_shared_and_valid_batches_still_load(tmp_path):
    x, y = _images(3), [1, 2, 0]
    obj = {b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(3, -1)), b"labels": y, b"fine_labels": y,
           b"extra": [[y, y], [y, y]]}
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    loaded = restricted_load(p)
    assert loaded[b"labels"] is loaded[b"fine_labels"] and loaded[b"extra"][0] is not None
    images, labels = load_cifar_batch(p)
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == y


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"\x80\x02Nr\x00\x00\x00\x10.", "memo entry 268435456"),  # 9 bytes that took 2.2 GB
        (b"\x80\x02Np1000000000\n.", "memo entry 1000000000"),
        (b"\x80\x02h\x05.", "memo entry 5, which it never stored"),
    ],
)
def test_memo_indices_are_bounded(tmp_path, raw, needle):
    p = tmp_path / "data_batch_1"
    p.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=needle) as ei:
            load_cifar_batch(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in str(ei.value)
    assert peak < 16 << 20


def test_memoised_data_is_not_copied_over_and_over(tmp_path):
    """A string stored once and passed to _codecs.encode 400 times (or an array state BUILT 400 times)
    would make 400 copies: the stand-ins' output is charged to a budget of a few times the file's size."""
    big = b"a" * (64 << 10)
    codecs = (b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(big)) + big
              + b"q\x01X\x06\x00\x00\x00latin1q\x02](" + b"h\x00h\x01h\x02\x86R" * 400 + b"e.")
    dtype = b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    arrays = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02U\x01bq\x03"
              + b"(K\x01J" + struct.pack("<i", len(big)) + b"\x85" + dtype + b"\x89T" + struct.pack("<I", len(big))
              + big + b"tq\x04](" + b"h\x00h\x01h\x02h\x03\x87Rh\x04b" * 400 + b"e.")
    for i, raw in enumerate((codecs, arrays)):
        p = tmp_path / f"data_batch_{i + 1}"
        p.write_bytes(raw)
        with pytest.raises(InputError, match="more data than the file holds") as ei:
            load_cifar_batch(p)
        assert str(p) in str(ei.value)


def test_cycles_and_deep_nesting_refused(tmp_path):
    raws = [b"\x80\x02]q\x00h\x00a.", b"\x80\x02" + b"]" * 1000 + b"a" * 999 + b".",
            b"\x80\x02" + b"]" * 30 + b"a" * 29 + b"."]
    for i, raw in enumerate(raws):
        p = tmp_path / f"data_batch_{i + 1}"
        p.write_bytes(raw)
        with pytest.raises(InputError, match="too deeply"):
            load_cifar_batch(p)


def test_too_many_objects_refused(tmp_path, monkeypatch):
    import puregen.data.cifar as cifar

    monkeypatch.setattr(cifar, "MAX_NODES", 1000)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": [[i] for i in range(2000)]}, protocol=2))
    with pytest.raises(InputError, match="too many objects"):
        load_cifar_batch(p)


def test_empty_bytes_value_loads(tmp_path):
    # Python 3 pickles b'' at protocol 2 as __builtin__.bytes(): it was refused as a forbidden global
    x = _images(2)
    obj = {b"batch_label": b"", b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(2, -1)),
           b"labels": [0, 1], b"filenames": [b"", b"b.png"]}
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    images, labels = load_cifar_batch(p)
    np.testing.assert_array_equal(images, x)


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, "images are empty (N=0"),
        ({b"data": b"", b"labels": []}, "b'data' is empty"),
        ({b"data": [], b"labels": []}, "b'data' is empty"),
    ],
)
def test_empty_batches_say_so(tmp_path, obj, needle):
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InputError) as ei:
        read_dataset(p)
    msg = str(ei.value)
    assert str(p) in msg and needle in msg and "forbidden" not in msg


def test_bytes_with_an_argument_refused(tmp_path):
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02c__builtin__\nbytes\n\x8a\x05\x00\x00\x00\x00\x02\x85R.")  # bytes(8 GiB)
    with pytest.raises(InputError, match=r"bytes\(\) with 1 argument"):
        load_cifar_batch(p)


def test_fifo_batch_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    p = tmp_path / "data_batch_1"
    os.mkfifo(p)

    with _deadline(10, "the reader waits on the FIFO"):
        with pytest.raises(InputError, match="FIFO") as ei:
            read_dataset(p)
    assert str(p) in str(ei.value)
