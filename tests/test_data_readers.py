"""Readers, writers and format detection (puregen.data): round trips and bad files."""

import gzip
import io
import os
import signal
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from puregen.data import ImageDataset, read_dataset, write_dataset
from puregen.data.cifar import write_cifar_batch
from puregen.data.folder import write_image_folder
from puregen.data.idx import find_idx_labels, write_idx, write_idx_dataset
from puregen.data.readers import detect_format
from puregen.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _images(n=12, h=7, w=5, c=3, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    assert x.std() > 0
    return x


def _labels(n=12, k=4, seed=1):
    y = np.random.default_rng(seed).integers(0, k, size=n)
    y[:k] = np.arange(k)  # every class present
    return y


def _raises(path, fn, *needles):
    """fn() must raise exactly one InputError naming `path` and mentioning each needle."""
    with pytest.raises(InputError) as ei:
        fn()
    msg = str(ei.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("c", [1, 3])
def test_npz_round_trip(tmp_path, c):
    x, y = _images(c=c), _labels()
    p = write_dataset(tmp_path / "d.npz", x, y)
    with np.load(p, allow_pickle=False) as z:
        assert sorted(z.files) == ["x", "y"]
        assert z["y"].dtype == np.int64
    ds = read_dataset(p)
    assert ds.source == str(p)
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, y)


def test_npz_without_labels_and_aliases(tmp_path):
    x = _images()
    p = write_dataset(tmp_path / "d.npz", x)
    with np.load(p) as z:
        assert z.files == ["x"]
    assert read_dataset(p).labels is None
    q = tmp_path / "alias.npz"
    np.savez(q, images=x, labels=np.arange(12, dtype=np.uint8) % 3, extra=np.zeros(2))
    ds = read_dataset(q, num_classes=3)
    np.testing.assert_array_equal(ds.images, x)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 3


def test_npz_nhw_gets_channel_axis(tmp_path):
    x = _images(c=1)[..., 0]
    p = tmp_path / "g.npz"
    np.savez(p, x=x)
    ds = read_dataset(p)
    assert ds.shape == (12, 7, 5, 1)
    np.testing.assert_array_equal(ds.images[..., 0], x)


def test_npy_round_trip(tmp_path):
    x = _images()
    p = write_dataset(tmp_path / "d.npy", x)
    ds = read_dataset(p)
    assert ds.labels is None
    np.testing.assert_array_equal(ds.images, x)
    _raises(tmp_path / "e.npy", lambda: write_dataset(tmp_path / "e.npy", x, _labels()), "cannot hold labels")


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", "a-images.idx3-ubyte"])
def test_idx_round_trip(tmp_path, name):
    x, y = _images(n=20, h=9, w=6, c=1), _labels(n=20, k=10)
    ip, lp = write_idx_dataset(tmp_path / name, x, y)
    assert lp == tmp_path / name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    raw = ip.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert find_idx_labels(ip) == lp
    ds = read_dataset(ip)
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, y)


def test_idx_labels_absent_and_mixed_compression(tmp_path):
    x, y = _images(n=5, c=1), _labels(n=5, k=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x[..., 0])
    assert read_dataset(tmp_path / "t10k-images-idx3-ubyte.gz").labels is None
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y.astype(np.uint8))  # raw labels beside gz images
    ds = read_dataset(tmp_path / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(ds.labels, y)


def test_idx_directory_split(tmp_path):
    a, b = _images(n=4, c=1, seed=1), _images(n=6, c=1, seed=2)
    write_idx_dataset(tmp_path / "train-images-idx3-ubyte.gz", a, _labels(4, 2))
    write_idx_dataset(tmp_path / "t10k-images-idx3-ubyte.gz", b, _labels(6, 2))
    assert detect_format(tmp_path) == "idx"
    np.testing.assert_array_equal(read_dataset(tmp_path).images, a)
    np.testing.assert_array_equal(read_dataset(tmp_path, split="test").images, b)


def test_cifar_batch_file_round_trip(tmp_path):
    x, y = _images(n=10, h=32, w=32), _labels(n=10, k=10)
    p = write_cifar_batch(tmp_path / "data_batch_1", x, y)
    ds = read_dataset(p)
    assert detect_format(p) == "cifar"
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, y)


def test_cifar_directory_round_trip(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    xs = [_images(n=3, h=32, w=32, seed=s) for s in range(3)]
    ys = [_labels(n=3, k=3, seed=s) for s in range(3)]
    # batch 10 must come after batch 2 (numeric order, not string order)
    for k, x, y in zip((1, 2, 10), xs, ys):
        write_cifar_batch(root / f"data_batch_{k}", x, y)
    xt = _images(n=4, h=32, w=32, seed=9)
    write_cifar_batch(root / "test_batch", xt, _labels(4, 3))
    for path in (tmp_path, root):
        ds = read_dataset(path, num_classes=10)
        np.testing.assert_array_equal(ds.images, np.concatenate(xs))
        np.testing.assert_array_equal(ds.labels, np.concatenate(ys))
    np.testing.assert_array_equal(read_dataset(tmp_path, split="test").images, xt)


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    x, y = _images(n=6, h=32, w=32), np.array([0, 99, 50, 1, 2, 98])
    write_cifar_batch(root / "train", x, y, label_key=b"fine_labels")
    write_cifar_batch(root / "test", x[:2], y[:2], label_key=b"fine_labels")
    ds = read_dataset(tmp_path, num_classes=100)
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, y)
    assert len(read_dataset(root, split="test")) == 2


@pytest.mark.parametrize("c", [1, 3])
def test_image_folder_round_trip(tmp_path, c):
    x, y = _images(c=c), _labels()
    root = write_dataset(str(tmp_path / "out") + "/", x, y)
    assert sorted(p.name for p in root.iterdir()) == ["0", "1", "2", "3"]
    assert all(f.suffix == ".png" for f in root.rglob("*") if f.is_file())
    ds = read_dataset(root)
    order = np.argsort(y, kind="stable")  # class-major, stable within class
    np.testing.assert_array_equal(ds.images, x[order])
    np.testing.assert_array_equal(ds.labels, y[order])
    assert ds.num_classes == 4 and ds.class_names == ("0", "1", "2", "3")


def test_image_folder_class_names_and_unlabelled(tmp_path):
    x, y = _images(n=6), np.array([1, 0, 2, 1, 0, 2])
    root = write_image_folder(tmp_path / "named", x, y, class_names=["cat", "dog", "emu"])
    ds = read_dataset(root)
    assert ds.class_names == ("cat", "dog", "emu")
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 2, 2])
    _raises(tmp_path / "bad", lambda: write_image_folder(tmp_path / "bad", x, y, ["dog", "cat", "emu"]), "sorted")
    flat = write_dataset(tmp_path / "flat", x)
    ds = read_dataset(flat)
    assert ds.labels is None
    np.testing.assert_array_equal(ds.images, x)


def test_image_folder_many_classes_keep_index_order(tmp_path):
    y = np.arange(12)
    ds = read_dataset(write_image_folder(tmp_path / "f", _images(n=12, h=2, w=2), y))
    assert ds.class_names[:3] == ("00", "01", "02")
    np.testing.assert_array_equal(ds.labels, y)


def test_image_folder_jpeg_and_modes(tmp_path):
    root = tmp_path / "jp"
    (root / "a").mkdir(parents=True)
    rgb = _images(n=1, h=8, w=8)[0]
    Image.fromarray(rgb).save(root / "a" / "1.JPG", quality=95)
    pal = Image.fromarray(rgb).convert("P")
    pal.save(root / "a" / "2.png")
    ds = read_dataset(root)
    assert ds.shape == (2, 8, 8, 3)
    (root / "a" / "3.png").unlink(missing_ok=True)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(root / "a" / "3.png")  # RGBA
    _raises(root / "a" / "3.png", lambda: read_dataset(root), "alpha")


@pytest.mark.parametrize("fmt", ["npz", "npy", "idx", "cifar", "folder"])
def test_explicit_format(tmp_path, fmt):
    x = _images(n=3, h=32, w=32, c=3 if fmt == "cifar" else 1)
    path = {
        "npz": tmp_path / "a.npz",
        "npy": tmp_path / "a.npy",
        "idx": tmp_path / "a-images-idx3-ubyte",
        "cifar": tmp_path / "batch",
        "folder": tmp_path / "dir",
    }[fmt]
    if fmt == "cifar":
        write_cifar_batch(path, x, [0, 1, 2])
    else:
        write_dataset(path, x)
    renamed = tmp_path / "renamed" if fmt != "folder" else path
    if fmt != "folder":
        os.replace(path, renamed)
        assert detect_format(renamed) == fmt  # by content
    np.testing.assert_array_equal(read_dataset(renamed, format=fmt).images, x)


# ------------------------------------------------------------- real dataset


def _fashion_mnist_dir():
    env = os.environ.get("PUREGEN_FASHION_MNIST")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fashion-mnist"


def test_fashion_mnist_test_set():
    d = _fashion_mnist_dir()
    path = d / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"Fashion-MNIST not found at {path} (set PUREGEN_FASHION_MNIST to its directory)")
    ds = read_dataset(path, num_classes=10)
    assert ds.shape == (10000, 28, 28, 1)
    assert ds.images.dtype == np.uint8 and ds.images.std() > 10
    assert ds.labels.shape == (10000,)
    np.testing.assert_array_equal(np.unique(ds.labels), np.arange(10))
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))


# ---------------------------------------------------------------- bad inputs


def test_missing_path_and_unknown_format(tmp_path):
    _raises(tmp_path / "nope.npz", lambda: read_dataset(tmp_path / "nope.npz"), "no such file")
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a dataset\n")
    _raises(p, lambda: read_dataset(p), "unknown dataset format")
    _raises(p, lambda: read_dataset(p, format="tiff"), "unknown format")


def test_npz_float_array(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, x=np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32))
    msg = _raises(p, lambda: read_dataset(p))
    assert msg == f"{p}: array 'x' has dtype float32; images on disk must be uint8 NHWC"


def test_npy_float_and_truncated(tmp_path):
    p = tmp_path / "f.npy"
    np.save(p, np.zeros((2, 4, 4, 1), np.float64))
    assert _raises(p, lambda: read_dataset(p)) == f"{p}: array has dtype float64; images on disk must be uint8 NHWC"
    q = write_dataset(tmp_path / "g.npy", _images(n=40))
    q.write_bytes(q.read_bytes()[:-100])
    _raises(q, lambda: read_dataset(q), "truncated or corrupt")


@pytest.mark.parametrize("shape", [(4, 8, 8, 5), (4, 64)])
def test_npz_wrong_shape(tmp_path, shape):
    p = tmp_path / "s.npz"
    np.savez(p, x=np.zeros(shape, np.uint8))
    _raises(p, lambda: read_dataset(p), "shape")


def test_npz_truncated_and_random_bytes(tmp_path):
    good = write_dataset(tmp_path / "good.npz", _images(n=50), _labels(n=50))
    raw = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(raw[: len(raw) // 2])
    _raises(cut, lambda: read_dataset(cut), "truncated or corrupt")
    rnd = tmp_path / "rnd.npz"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(rnd, lambda: read_dataset(rnd), "truncated or corrupt")
    # corrupt payload behind an intact zip directory
    bad = bytearray(raw)
    mid = len(bad) // 2
    bad[mid : mid + 64] = bytes(64)
    flip = tmp_path / "flip.npz"
    flip.write_bytes(bytes(bad))
    _raises(flip, lambda: read_dataset(flip), "truncated or corrupt")


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "o.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object))
    _raises(p, lambda: read_dataset(p), "pickled")


def test_npz_labels_problems(tmp_path):
    x = _images(n=6)
    p = tmp_path / "l.npz"
    np.savez(p, x=x, y=np.array([0, 1, 2, 3, 4, 12]))
    _raises(p, lambda: read_dataset(p, num_classes=10), "out of range", "array 'y'")
    q = tmp_path / "m.npz"
    np.savez(q, x=x, y=np.array([0, 1, 2]))
    _raises(q, lambda: read_dataset(q), "length 3 but there are 6 images")
    r = tmp_path / "n.npz"
    np.savez(r, images=x, x=x)
    _raises(r, lambda: read_dataset(r), "both")
    s = tmp_path / "k.npz"
    np.savez(s, pixels=x)
    _raises(s, lambda: read_dataset(s), "no image array", "'pixels'")


def test_idx_truncated(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    write_idx(p, _images(n=4, c=1)[..., 0])
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    _raises(p, lambda: read_dataset(p), "truncated")
    p.write_bytes(raw[:10])
    _raises(p, lambda: read_dataset(p), "truncated")
    g = tmp_path / "y-images-idx3-ubyte.gz"
    g.write_bytes(gzip.compress(raw)[:-20])
    _raises(g, lambda: read_dataset(g), "truncated or corrupt gzip")


def test_idx_trailing_bytes(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    write_idx(p, _images(n=4, c=1)[..., 0])
    p.write_bytes(p.read_bytes() + b"\0\0\0")
    _raises(p, lambda: read_dataset(p), "3 unexpected trailing bytes")


def test_idx_wrong_magic(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte"
    write_idx(p, _images(n=4, c=1)[..., 0])
    raw = p.read_bytes()
    p.write_bytes(b"\x12\x34" + raw[2:])
    _raises(p, lambda: read_dataset(p), "bad IDX magic number 0x12340803")
    p.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    _raises(p, lambda: read_dataset(p), "dtype code 0x0d")
    # a labels file given as images: 1-D, magic 0x00000801
    write_idx(p, np.arange(5, dtype=np.uint8))
    _raises(p, lambda: read_dataset(p), "expected 3")


def test_idx_label_count_mismatch(tmp_path):
    ip, lp = write_idx_dataset(tmp_path / "a-images-idx3-ubyte", _images(n=5, c=1), _labels(5, 2))
    write_idx(lp, np.zeros(4, np.uint8))
    _raises(lp, lambda: read_dataset(ip), "4 labels")
    write_idx(lp, np.array([0, 1, 2, 3, 9], np.uint8))
    _raises(lp, lambda: read_dataset(ip, num_classes=5), "out of range")


def test_folder_corrupt_image(tmp_path):
    root = write_image_folder(tmp_path / "f", _images(n=6), _labels(n=6, k=2))
    victim = sorted((root / "1").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    _raises(victim, lambda: read_dataset(root), "cannot read image")
    victim.write_bytes(b"this is not a png")
    _raises(victim, lambda: read_dataset(root), "cannot read image")


def test_folder_size_mode_mismatch_and_strays(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    Image.fromarray(_images(n=1, h=8, w=8)[0]).save(root / "a" / "1.png")
    Image.fromarray(_images(n=1, h=8, w=9)[0]).save(root / "a" / "2.png")
    _raises(root / "a" / "2.png", lambda: read_dataset(root), "same size and mode")
    Image.fromarray(_images(n=1, h=8, w=8, c=1)[0, ..., 0]).save(root / "a" / "2.png")
    _raises(root / "a" / "2.png", lambda: read_dataset(root), "same size and mode")
    (root / "a" / "2.png").unlink()
    (root / "a" / "notes.txt").write_text("x")
    _raises(root / "a" / "notes.txt", lambda: read_dataset(root), "not a .png")
    (root / "a" / "notes.txt").unlink()
    (root / ".DS_Store").write_text("ignored")
    assert len(read_dataset(root)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(empty, lambda: read_dataset(empty), "no images")


def test_dataset_source_names_file(tmp_path):
    p = write_dataset(tmp_path / "d.npz", _images(), _labels())
    assert isinstance(read_dataset(p), ImageDataset)
    _raises(p, lambda: read_dataset(p, num_classes=2), "out of range")
    _raises(p, lambda: read_dataset(p, split="train"), "split")


# ------------------------------------------- bounded reading, special files, trailing bytes


def _traced(fn):
    """fn() must raise InputError; returns (message, peak traced bytes, seconds)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InputError) as ei:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(ei.value), peak, time.perf_counter() - started


def _idx_header(dims) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def test_idx_gz_decompression_stops_after_the_declared_size(tmp_path):
    # a small .gz holding a valid header and then far more zeros than it declares (multi-member:
    # 256 MiB here, 2 GB in the report that took 4.3 GB and 36 s)
    zeros = gzip.compress(bytes(32 << 20), compresslevel=9, mtime=0)
    p = tmp_path / "x-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_header((4, 7, 5)) + bytes(140), mtime=0) + zeros * 8)
    assert p.stat().st_size < 1 << 20
    msg, peak, seconds = _traced(lambda: read_dataset(p))
    assert str(p) in msg and "more than 1048576 unexpected trailing bytes" in msg, msg
    assert peak < 16 << 20 and seconds < 5


def test_idx_gz_header_checked_before_decompressing(tmp_path):
    zeros = gzip.compress(bytes(32 << 20), compresslevel=9, mtime=0)
    p = tmp_path / "x-images-idx3-ubyte.gz"
    # declares 4 GiB; deflate cannot expand this file (~250 KB) to that
    p.write_bytes(gzip.compress(_idx_header((4096, 1024, 1024)), mtime=0) + zeros * 8)
    msg, peak, seconds = _traced(lambda: read_dataset(p))
    assert str(p) in msg and "cannot hold" in msg, msg
    assert peak < 4 << 20 and seconds < 2


def test_declared_sizes_checked_against_the_limit(tmp_path, monkeypatch):
    from puregen.data import validation

    x = _images(n=4, c=1)
    files = [
        write_idx(tmp_path / "a-images-idx3-ubyte", x[..., 0]),
        write_idx(tmp_path / "b-images-idx3-ubyte.gz", x[..., 0]),
        write_dataset(tmp_path / "c.npz", x),
        write_dataset(tmp_path / "d.npy", x),
        write_cifar_batch(tmp_path / "data_batch_1", _images(n=4, h=32, w=32), [0, 1, 2, 3]),
        write_image_folder(tmp_path / "f", _images(n=4, h=8, w=8)),
    ]
    for f in files:
        read_dataset(f)
    monkeypatch.setattr(validation, "MAX_INPUT_BYTES", 100)
    for f in files:
        _raises(f, lambda: read_dataset(f), "PUREGEN_MAX_INPUT_BYTES")
    monkeypatch.setenv("PUREGEN_MAX_INPUT_BYTES", str(1 << 30))
    for f in files:
        read_dataset(f)
    monkeypatch.setenv("PUREGEN_MAX_INPUT_BYTES", "lots")
    with pytest.raises(InputError, match="PUREGEN_MAX_INPUT_BYTES"):
        read_dataset(files[0])


def _npy_with_header(header: str, data: bytes = b"") -> bytes:
    h = header.encode("latin-1")
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


@pytest.mark.parametrize("shape", [(10**6, 28, 28, 1), (2**20, 2**20, 2**20, 1)])
def test_npy_and_npz_shapes_checked_before_reading(tmp_path, shape):
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    p = tmp_path / "d.npy"
    p.write_bytes(_npy_with_header(header, b"\0" * 64))
    q = tmp_path / "d.npz"
    with zipfile.ZipFile(q, "w") as z:
        z.writestr("x.npy", _npy_with_header(header, b"\0" * 64))
    for f in (p, q):
        msg, peak, _ = _traced(lambda: read_dataset(f))
        assert str(f) in msg and ("truncated or corrupt" in msg or "PUREGEN_MAX_INPUT_BYTES" in msg), msg
        assert peak < 4 << 20, peak


def test_npy_header_length_checked_before_reading(tmp_path):
    p = tmp_path / "d.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00\xff\xff\xff\xff" + b" " * 100)
    msg, peak, _ = _traced(lambda: read_dataset(p))
    assert str(p) in msg and "header of 4294967295 bytes" in msg
    assert peak < 4 << 20


def test_npy_trailing_bytes(tmp_path):
    # silently accepted before: np.load stops reading where the array ends
    p = write_dataset(tmp_path / "d.npy", _images())
    p.write_bytes(p.read_bytes() + b"\0" * 5)
    _raises(p, lambda: read_dataset(p), "5 unexpected trailing bytes")
    q = tmp_path / "d.npz"
    buf = io.BytesIO()
    np.save(buf, _images())
    with zipfile.ZipFile(q, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 3)
    _raises(q, lambda: read_dataset(q), "3 unexpected trailing bytes", "'x.npy'")


def test_npy_fortran_order_and_big_endian_labels_still_read(tmp_path):
    x = np.asfortranarray(_images())
    p = tmp_path / "f.npy"
    np.save(p, x)
    np.testing.assert_array_equal(read_dataset(p).images, x)
    q = tmp_path / "b.npz"
    np.savez_compressed(q, x=_images(), y=_labels().astype(">i4"))
    ds = read_dataset(q)
    np.testing.assert_array_equal(ds.labels, _labels())


def test_idx_labels_path_that_is_not_a_file_is_an_error(tmp_path):
    ip, lp = write_idx_dataset(tmp_path / "a-images-idx3-ubyte", _images(n=5, c=1), _labels(5, 2))
    lp.unlink()
    lp.mkdir()  # the labels were dropped without a word
    _raises(lp, lambda: read_dataset(ip), "is a directory", "labels")
    if hasattr(os, "mkfifo"):
        lp.rmdir()
        os.mkfifo(lp)
        _raises(lp, lambda: read_dataset(ip), "not a regular file")


@pytest.fixture
def hang_guard():
    def fire(signum, frame):
        raise TimeoutError("the reader blocked")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_are_refused_not_waited_on(tmp_path, hang_guard):
    root = write_image_folder(tmp_path / "f", _images(n=4), _labels(n=4, k=2))
    fifo = root / "1" / "zz.png"
    os.mkfifo(fifo)
    _raises(fifo, lambda: read_dataset(root), "FIFO")
    loose = write_image_folder(tmp_path / "g", _images(n=2))
    os.mkfifo(loose / "zz.png")
    _raises(loose / "zz.png", lambda: read_dataset(loose), "FIFO")
    for name in ("d.npz", "d.npy", "t-images-idx3-ubyte", "t-images-idx3-ubyte.gz", "test_batch"):
        p = tmp_path / name
        os.mkfifo(p)
        _raises(p, lambda: read_dataset(p), "FIFO")


def test_folder_broken_symlink_is_named(tmp_path):
    root = write_image_folder(tmp_path / "f", _images(n=2))
    (root / "zz.png").symlink_to(tmp_path / "gone.png")
    _raises(root / "zz.png", lambda: read_dataset(root), "no such file")
