"""Fuzzed malformed inputs for every reader, through the command line.

Every case writes one bad input (npz, npy, IDX raw and .gz, CIFAR pickle
batches, image folders of PNG/JPEG, checkpoints = config.json +
model.safetensors) and runs ``puregen purify`` in-process.  Each must end in
one clear ``InputError``: exit code 2, stderr naming the offending file, no
traceback, within a few seconds (a hang guard, not a speed claim), within a
bounded amount of memory, and with nothing written (neither the output nor
OUT.parts).

Most cases run in this process, with ``tracemalloc`` (Python and numpy
allocations) and ``ru_maxrss`` watching memory and a timer signal guarding
against hangs.  The worst bombs (inputs that made the readers allocate
gigabytes) run in one child process under ``RLIMIT_AS`` so that a regression
cannot take the machine down; there the message must not be an
out-of-memory one.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from puregen.cli import main

REPO = Path(__file__).resolve().parent.parent

MAX_SECONDS = 5.0  # per case: a hang guard
HANG_GUARD_SECONDS = 30  # the timer signal that turns a hang into a failure
MAX_TRACED_BYTES = 256 << 20  # peak Python + numpy allocations during one case
MAX_RSS_GROWTH = 512 << 20  # growth of the process's peak RSS during one case
CHILD_EXTRA_ADDRESS_SPACE = 1536 << 20  # RLIMIT_AS of the bomb child: its size after imports + 1.5 GB

N, H, W = 4, 28, 28  # the valid images every case starts from


# ---------------------------------------------------------------- valid material


def _images(n=N, h=H, w=W, c=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _labels(n=N) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 3


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npy_raw(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy file with a header of our choosing (numpy's padding rules)."""
    h = header.encode("latin-1")
    fixed = 10 if version == (1, 0) else 12
    h = h + b" " * (63 - (fixed + len(h)) % 64) + b"\n"
    size = struct.pack("<H", len(h)) if version == (1, 0) else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes(version) + size + h + data


def _npy_header(descr="|u1", shape=(N, H, W, 1), fortran=False) -> str:
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _idx(dims, payload: bytes | None = None, code=0x08) -> bytes:
    if payload is None:
        payload = bytes(int(np.prod(dims)))
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def _idx_images() -> bytes:
    return _idx((N, H, W), _images()[..., 0].tobytes())


def _cifar_dict(images=None, labels=None) -> dict:
    images = _images(c=3, h=32, w=32) if images is None else images
    n = images.shape[0]
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in (_labels(n) if labels is None else labels)],
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, -1)),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _cifar_bytes(obj=None, protocol=2) -> bytes:
    return pickle.dumps(_cifar_dict() if obj is None else obj, protocol=protocol)


def _png(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose IHDR claims another size (CRC fixed up)."""
    raw = bytearray(_png(np.zeros((1, 1), np.uint8)))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def _mkfifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def ebm_checkpoint(tmp_path_factory) -> Path:
    """A valid tiny EBM checkpoint, made the way a user makes one."""
    folder = tmp_path_factory.mktemp("ckpt") / "ebm"
    assert main(["checkpoint", "init", "ebm", "--preset", "tiny", "-o", str(folder)]) == 0
    return folder


# ------------------------------------------------------------------ the cases


@dataclass
class Case:
    input: Path  # what `purify` reads
    culprit: Path  # the file the message must name
    words: tuple[str, ...] = ()  # words the message must contain
    ebm: Path | None = None  # checkpoint folder: --method ebm --ebm DIR (else --method jpeg)


@dataclass
class Ctx:
    tmp: Path
    ckpt: Path
    extra: dict = field(default_factory=dict)

    def write(self, name: str, data: bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def valid_npz(self) -> Path:
        return self.write("valid.npz", _npz_bytes(x=_images()))

    def checkpoint(self, name="ckpt") -> Path:
        d = self.tmp / name
        shutil.copytree(self.ckpt, d)
        return d


CASES: dict[str, Callable[[Ctx], Case]] = {}  # run in this process
BOMBS: dict[str, Callable[[Ctx], Case]] = {}  # run in the RLIMIT_AS child


def case(name: str, table=CASES):
    def register(fn):
        assert name not in CASES and name not in BOMBS, name
        table[name] = fn
        return fn

    return register


def _file_case(name: str, filename: str, make: Callable[[], bytes], *words: str, table=CASES) -> None:
    def build(ctx: Ctx) -> Case:
        p = ctx.write(filename, make())
        return Case(p, p, words)

    case(name, table)(build)


def _truncations(prefix: str, filename: str, make: Callable[[], bytes], offsets, *words: str) -> None:
    for off in offsets:
        def cut(make=make, off=off) -> bytes:
            raw = make()
            return raw[: off if off >= 0 else len(raw) + off]

        label = f"m{-off}" if off < 0 else str(off)
        _file_case(f"{prefix}-truncated-at-{label}", filename, cut, *words)


# .npz ------------------------------------------------------------------------

_NPZ = lambda: _npz_bytes(x=_images(), y=_labels())  # noqa: E731
_truncations("npz", "data.npz", _NPZ, [0, 1, 10, 30, 200, -22, -1], "truncated or corrupt")
_file_case("npz-random-bytes", "data.npz", lambda: np.random.default_rng(1).bytes(4096), "truncated or corrupt")
_file_case("npz-pk-then-junk", "data.npz", lambda: b"PK\x03\x04" + b"\xff" * 200, "truncated or corrupt")
_file_case("npz-text", "data.npz", lambda: b"hello, not an archive\n", "truncated or corrupt")
_file_case("npz-float-nan", "data.npz", lambda: _npz_bytes(x=np.full((N, H, W, 1), np.nan, np.float32)), "float32")
_file_case("npz-float64-in-range", "data.npz", lambda: _npz_bytes(x=np.random.default_rng(0).random((N, H, W, 1))),
           "float64")
for _shape in [(N, H * W), (N, H, W, 5), (1, N, H, W, 1), (0, H, W, 1), (N, 0, W, 1), (), (H, W, 3)]:
    _file_case(f"npz-shape-{'x'.join(map(str, _shape)) or 'scalar'}", "data.npz",
               lambda s=_shape: _npz_bytes(x=np.zeros(s, np.uint8)))
for _label, _dtype in [("int16", "int16"), ("bool", "bool"), ("complex64", "complex64"), ("big-endian-u2", ">u2"),
                       ("unicode", "<U4"), ("structured", [("a", "u1")])]:
    _file_case(f"npz-dtype-{_label}", "data.npz", lambda d=_dtype: _npz_bytes(x=np.zeros((N, H, W, 1), d)), "dtype")
_file_case("npz-object-array", "data.npz", lambda: _npz_bytes(x=np.array([{"a": 1}] * N, dtype=object)), "pickled")
_file_case("npz-labels-count-mismatch", "data.npz", lambda: _npz_bytes(x=_images(), y=_labels(N - 1)), "length")
_file_case("npz-labels-negative", "data.npz", lambda: _npz_bytes(x=_images(), y=-_labels() - 1), "non-negative")
_file_case("npz-labels-float", "data.npz", lambda: _npz_bytes(x=_images(), y=_labels().astype(float)), "integers")
_file_case("npz-labels-2d", "data.npz", lambda: _npz_bytes(x=_images(), y=np.zeros((N, 2), np.int64)), "1-D")
_file_case("npz-both-x-and-images", "data.npz", lambda: _npz_bytes(x=_images(), images=_images()), "both")
_file_case("npz-no-image-array", "data.npz", lambda: _npz_bytes(pixels=_images()), "no image array")
_file_case("npz-member-trailing-bytes", "data.npz",
           lambda: _zip({"x.npy": _npy_bytes(_images()) + b"\0" * 7}), "7 unexpected trailing bytes")
_file_case("npz-member-not-npy", "data.npz", lambda: _zip({"x": _images().tobytes()}), "not a .npy")
_file_case("npz-member-bad-npy-header", "data.npz",
           lambda: _zip({"x.npy": _npy_raw("{'descr': '|u1', 'shape': (4,")}), "truncated or corrupt")
_file_case("npz-member-shape-beyond-data", "data.npz",
           lambda: _zip({"x.npy": _npy_raw(_npy_header(shape=(10**6, H, W, 1)), b"\0" * 100)}),
           "truncated or corrupt")


def _npz_patched(fn) -> bytes:
    raw = bytearray(_zip({"x.npy": _npy_bytes(_images())}))
    fn(raw)
    return bytes(raw)


def _set_method(raw: bytearray, method: int) -> None:
    raw[8:10] = struct.pack("<H", method)  # local header
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 10 : cd + 12] = struct.pack("<H", method)  # central directory


def _flip_payload(raw: bytearray) -> None:
    raw[200] ^= 0xFF


def _encrypted(raw: bytearray) -> None:
    raw[6] |= 1
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 8] |= 1


_file_case("npz-unsupported-compression", "data.npz", lambda: _npz_patched(lambda r: _set_method(r, 99)),
           "truncated or corrupt")
_file_case("npz-crc-mismatch", "data.npz", lambda: _npz_patched(_flip_payload), "truncated or corrupt")
_file_case("npz-encrypted-member", "data.npz", lambda: _npz_patched(_encrypted), "truncated or corrupt")


def _deflated_declares_more(ctx: Ctx) -> Case:
    raw = bytearray(_zip({"x.npy": _npy_bytes(_images())}, zipfile.ZIP_DEFLATED))
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = struct.pack("<I", 0x7FFF0000)  # uncompressed size in the central directory
    p = ctx.write("data.npz", bytes(raw))
    return Case(p, p, ("truncated or corrupt",))


case("npz-deflated-member-declares-2gb")(_deflated_declares_more)


@case("npz-fifo")
def _npz_fifo(ctx: Ctx) -> Case:
    p = _mkfifo(ctx.tmp / "data.npz")
    return Case(p, p, ("FIFO",))


@case("fifo-with-an-unknown-name")  # sniffed by content: must not block in open()
def _unknown_fifo(ctx: Ctx) -> Case:
    p = _mkfifo(ctx.tmp / "data.bin")
    return Case(p, p, ("FIFO",))


@case("npz-name-on-a-directory")
def _npz_directory(ctx: Ctx) -> Case:
    p = ctx.tmp / "data.npz"
    p.mkdir()
    return Case(p, p, ("is a directory",))


@case("npz-is-a-directory")
def _npz_dir(ctx: Ctx) -> Case:
    p = ctx.tmp / "data.npz"  # detected as an (empty) image folder
    p.mkdir()
    return Case(p, p)


# .npy ------------------------------------------------------------------------

_NPY = lambda: _npy_bytes(_images())  # noqa: E731
_truncations("npy", "data.npy", _NPY, [0, 5, 9, 40, 127, 128, 1000, -1], "truncated or corrupt")
_file_case("npy-trailing-1-byte", "data.npy", lambda: _NPY() + b"\0", "1 unexpected trailing bytes")
_file_case("npy-trailing-4096-bytes", "data.npy", lambda: _NPY() + b"\0" * 4096, "4096 unexpected trailing bytes")
_file_case("npy-bad-magic", "data.npy", lambda: b"\x93NUMPX" + _NPY()[6:], "truncated or corrupt")
_file_case("npy-version-3", "data.npy", lambda: _npy_raw(_npy_header(), _images().tobytes(), (3, 0)), "version")
_file_case("npy-version-9", "data.npy", lambda: b"\x93NUMPY\x09\x09" + _NPY()[8:], "version")
_file_case("npy-header-not-a-dict", "data.npy", lambda: _npy_raw("[1, 2, 3]"), "bad .npy header")
_file_case("npy-header-bad-descr", "data.npy", lambda: _npy_raw(_npy_header(descr="zz9")), "bad .npy header")
_file_case("npy-header-syntax-error", "data.npy", lambda: _npy_raw("{'descr': '|u1', 'shape': (4,"),
           "bad .npy header")
_file_case("npy-header-negative-dim", "data.npy", lambda: _npy_raw(_npy_header(shape=(-1, H, W, 1))),
           "negative dimension")
_file_case("npy-header-length-64k", "data.npy", lambda: b"\x93NUMPY\x01\x00\xff\xff" + b" " * 200,
           "truncated or corrupt")
_file_case("npy-v2-header-length-4gb", "data.npy", lambda: b"\x93NUMPY\x02\x00\xff\xff\xff\xff" + b" " * 200,
           "truncated or corrupt")
_file_case("npy-shape-beyond-data", "data.npy", lambda: _npy_raw(_npy_header(shape=(10**6, H, W, 1)), b"\0" * 64),
           "truncated or corrupt")
_file_case("npy-float-nan", "data.npy", lambda: _npy_bytes(np.full((N, H, W, 1), np.nan, np.float32)), "float32")
_file_case("npy-float-inf", "data.npy", lambda: _npy_bytes(np.full((N, H, W, 1), np.inf)), "float64")
_file_case("npy-int16", "data.npy", lambda: _npy_bytes(np.zeros((N, H, W, 1), np.int16)), "int16")
_file_case("npy-object", "data.npy", lambda: _npy_bytes(np.array([None] * N, dtype=object)), "pickled")
_file_case("npy-dtype-size-0", "data.npy", lambda: _npy_raw(_npy_header(descr="|V0", shape=(10**12,))), "size 0")
_file_case("npy-shape-nchw", "data.npy", lambda: _npy_bytes(np.zeros((N, 1, H, W), np.uint8)), "NCHW")
_file_case("npy-zero-images", "data.npy", lambda: _npy_bytes(np.zeros((0, H, W, 1), np.uint8)), "empty")
_file_case("npy-single-hwc-image", "data.npy", lambda: _npy_bytes(np.zeros((H, W, 3), np.uint8)), "single HWC")
_file_case("npy-holding-a-zip", "data.npy", lambda: _npz_bytes(x=_images()), ".npz archive")


@case("npy-fifo")
def _npy_fifo(ctx: Ctx) -> Case:
    p = _mkfifo(ctx.tmp / "data.npy")
    return Case(p, p, ("FIFO",))


# IDX, raw --------------------------------------------------------------------

IDX = "train-images-idx3-ubyte"
_truncations("idx", IDX, _idx_images, [0, 3, 4, 10, 16, 17, 1000, -1], "truncated")
_file_case("idx-trailing-bytes", IDX, lambda: _idx_images() + b"\0" * 3, "3 unexpected trailing bytes")
_file_case("idx-bad-magic", IDX, lambda: b"\x12\x34" + _idx_images()[2:], "bad IDX magic")
_file_case("idx-zero-ndim", IDX, lambda: b"\x00\x00\x08\x00" + _idx_images()[4:], "bad IDX magic")
_file_case("idx-dtype-float32", IDX, lambda: _idx((N, H, W), code=0x0D), "dtype code 0x0d")
_file_case("idx-dtype-unknown", IDX, lambda: _idx((N, H, W), code=0x42), "dtype code 0x42")
_file_case("idx-labels-given-as-images", IDX, lambda: _idx((N,), bytes(N)), "expected 3")
_file_case("idx-4d", IDX, lambda: _idx((N, H, W, 1)), "expected 3")
_file_case("idx-dims-beyond-file", IDX, lambda: _idx((60000, H, W), b"\0" * 100), "truncated")
_file_case("idx-zero-images", IDX, lambda: _idx((0, H, W), b""), "empty")
_file_case("idx-zero-width", IDX, lambda: _idx((N, H, 0), b""), "zero height or width")
_file_case("idx-width-3-looks-hwc", IDX, lambda: _idx((N, H, 3)), "single HWC")


def _with_labels(labels: bytes | None, *, labels_kind="file"):
    def build(ctx: Ctx) -> Case:
        images = ctx.write(IDX, _idx_images())
        lp = ctx.tmp / "train-labels-idx1-ubyte"
        if labels_kind == "dir":
            lp.mkdir()
        elif labels_kind == "fifo":
            _mkfifo(lp)
        else:
            lp.write_bytes(labels)
        return Case(images, lp)

    return build


case("idx-labels-count-mismatch")(_with_labels(_idx((N - 1,), bytes(N - 1))))
case("idx-labels-truncated")(_with_labels(_idx((N,), bytes(N))[:-2]))
case("idx-labels-bad-magic")(_with_labels(b"\x01\x02\x03\x04" + bytes(N + 4)))
case("idx-labels-3d")(_with_labels(_idx((N, 1, 1), bytes(N))))
case("idx-labels-path-is-a-directory")(_with_labels(None, labels_kind="dir"))
case("idx-labels-path-is-a-fifo")(_with_labels(None, labels_kind="fifo"))


@case("idx-images-fifo")
def _idx_fifo(ctx: Ctx) -> Case:
    p = _mkfifo(ctx.tmp / IDX)
    return Case(p, p, ("FIFO",))


# IDX, gzip -------------------------------------------------------------------

IDX_GZ = IDX + ".gz"
_GZ = lambda: gzip.compress(_idx_images(), mtime=0)  # noqa: E731
for _off in [2, 5, 10, 30, -4, -8, -12]:
    _file_case(f"idx-gz-truncated-at-{_off if _off >= 0 else 'm' + str(-_off)}", IDX_GZ,
               lambda o=_off: _GZ()[:o], "truncated")
_file_case("idx-gz-corrupt-deflate", IDX_GZ, lambda: _GZ()[:200] + b"\xff" * 40 + _GZ()[240:], "corrupt gzip")
_file_case("idx-gz-bad-method", IDX_GZ, lambda: b"\x1f\x8b\x07" + _GZ()[3:], "corrupt gzip")
_file_case("idx-gz-trailing-garbage", IDX_GZ, lambda: _GZ() + b"garbage!", "corrupt gzip")
_file_case("idx-gz-payload-trailing-bytes", IDX_GZ, lambda: gzip.compress(_idx_images() + b"\0" * 5, mtime=0),
           "5 unexpected trailing bytes")
_file_case("idx-gz-bad-magic-inside", IDX_GZ, lambda: gzip.compress(b"\x12\x34" + _idx_images()[2:], mtime=0),
           "bad IDX magic")
_file_case("idx-gz-dims-beyond-ratio", IDX_GZ, lambda: gzip.compress(_idx((2**12, 2**10, 2**10), b""), mtime=0),
           "cannot hold")


# CIFAR batches ----------------------------------------------------------------

CIFAR = "data_batch_1"
_truncations("cifar", CIFAR, _cifar_bytes, [1, 2, 50, 3000, -1], "truncated or corrupt")
_file_case("cifar-empty-file", CIFAR, lambda: b"", "empty file")
_file_case("cifar-random-after-proto", CIFAR, lambda: b"\x80\x02" + np.random.default_rng(2).bytes(300))
_file_case("cifar-text", CIFAR, lambda: b"not a pickle at all", "truncated or corrupt")


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _marker(ctx: Ctx) -> str:
    return str(ctx.tmp / "PWNED")


def _evil(name: str, make_payload: Callable[[Ctx], object], protocol: int, *words: str) -> None:
    def build(ctx: Ctx) -> Case:
        p = ctx.write(CIFAR, pickle.dumps(make_payload(ctx), protocol=protocol))
        ctx.extra["marker"] = _marker(ctx)
        return Case(p, p, ("forbidden global",) + words)

    case(name)(build)


for _proto in (2, 4):
    _evil(f"cifar-os-system-reduce-p{_proto}", lambda c: _Reduce(os.system, f"touch {_marker(c)}"), _proto, "system")
    _evil(f"cifar-eval-p{_proto}", lambda c: _Reduce(eval, f"open({_marker(c)!r}, 'w')"), _proto, "eval")
    _evil(f"cifar-system-inside-valid-batch-p{_proto}",
          lambda c: {**_cifar_dict(), b"labels": [_Reduce(os.system, f"touch {_marker(c)}")]}, _proto, "system")
_file_case("cifar-global-opcode-posix-system", CIFAR, lambda: b"\x80\x02cposix\nsystem\nU\x04trueR.",
           "forbidden global 'posix.system'")
_file_case("cifar-stack-global-builtins-exec", CIFAR,
           lambda: b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93\x8c\x01x\x85R.", "forbidden global 'builtins.exec'")
_file_case("cifar-inst-opcode", CIFAR, lambda: b"(S'true'\nios\nsystem\n.", "forbidden global 'os.system'")
_file_case("cifar-obj-opcode", CIFAR, lambda: b"\x80\x02(cos\nsystem\nU\x04trueo.", "forbidden global 'os.system'")
_file_case("cifar-getattr", CIFAR, lambda: b"\x80\x02c__builtin__\ngetattr\n.", "forbidden global")
_file_case("cifar-numpy-scalar", CIFAR,
           lambda: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [np.int64(1)]}, protocol=2),
           "forbidden global")
_file_case("cifar-codecs-rot13", CIFAR,
           lambda: b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", "_codecs.encode")
_file_case("cifar-bytes-with-argument", CIFAR, lambda: b"\x80\x02c__builtin__\nbytes\nK\x05\x85R.", "bytes()")
_file_case("cifar-persistent-id", CIFAR, lambda: b"\x80\x02U\x01xQ.", "BINPERSID")
_file_case("cifar-bytearray8", CIFAR, lambda: b"\x80\x05\x96\x01\x00\x00\x00\x00\x00\x00\x00x.", "BYTEARRAY8")
_file_case("cifar-binbytes8-declares-1tb", CIFAR, lambda: b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"xx.",
           "truncated or corrupt")
_file_case("cifar-long4-declares-4gb", CIFAR, lambda: b"\x80\x02\x8b\xff\xff\xff\x7fxx.", "truncated or corrupt")
_file_case("cifar-memo-get-unset", CIFAR, lambda: b"\x80\x02h\x05.", "memo")
_file_case("cifar-cyclic-list", CIFAR, lambda: b"\x80\x02]q\x00h\x00a.", "too deeply")
_file_case("cifar-deep-lists-1000", CIFAR, lambda: b"\x80\x02" + b"]" * 1000 + b"a" * 999 + b".", "too deeply")


def _shared(depth: int, width: int = 10) -> bytes:
    a: list = [1]
    for _ in range(depth):
        a = [a] * width
    return pickle.dumps({b"data": a, b"labels": [0]}, protocol=2)


_file_case("cifar-shared-refs-8-deep", CIFAR, lambda: _shared(8), "b'data' is a list")
_file_case("cifar-shared-refs-18-deep", CIFAR, lambda: _shared(18), "b'data' is a list")
_file_case("cifar-not-a-dict", CIFAR, lambda: pickle.dumps([1, 2, 3], protocol=2), "not a CIFAR batch dict")
_file_case("cifar-no-data", CIFAR, lambda: pickle.dumps({b"labels": [1]}, protocol=2), "no b'data'")
_file_case("cifar-data-float32", CIFAR,
           lambda: _cifar_bytes({b"data": np.full((1, 3072), np.nan, np.float32), b"labels": [1]}), "float32")
_file_case("cifar-data-3000-per-row", CIFAR,
           lambda: _cifar_bytes({b"data": np.zeros((1, 3000), np.uint8), b"labels": [1]}), "3000 values per row")
_file_case("cifar-data-1d", CIFAR, lambda: _cifar_bytes({b"data": np.zeros(3072, np.uint8), b"labels": [1]}), "shape")
_file_case("cifar-data-empty-bytes", CIFAR, lambda: _cifar_bytes({b"data": b"", b"labels": []}), "empty")
_file_case("cifar-zero-images", CIFAR, lambda: _cifar_bytes({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}),
           "empty")
_file_case("cifar-labels-count-mismatch", CIFAR, lambda: _cifar_bytes(_cifar_dict(labels=[0, 1])),
           "length 2 but there are 4 images")
_file_case("cifar-labels-negative", CIFAR, lambda: _cifar_bytes(_cifar_dict(labels=[0, 1, 2, -3])), "non-negative")
_file_case("cifar-labels-floats", CIFAR, lambda: _cifar_bytes({**_cifar_dict(), b"labels": [0.5] * 4}), "list of ints")
_file_case("cifar-labels-huge-int", CIFAR, lambda: _cifar_bytes({**_cifar_dict(), b"labels": [10**30] * 4}))
_file_case("cifar-labels-nested-lists", CIFAR, lambda: _cifar_bytes({**_cifar_dict(), b"labels": [[0]] * 4}),
           "list of ints")
_file_case("cifar-dtype-object", CIFAR, lambda: _cifar_bytes({b"data": np.array([None], dtype=object)}), "dtype")


@case("cifar-fifo")
def _cifar_fifo(ctx: Ctx) -> Case:
    p = _mkfifo(ctx.tmp / CIFAR)
    return Case(p, p, ("FIFO",))


# Parquet and WebDataset shards ------------------------------------------------------


def _parquet_bytes(**columns) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _tar_bytes(samples: list[dict]) -> bytes:
    from webdataset import TarWriter

    buf = io.BytesIO()
    w = TarWriter(buf, encoder=False)
    for s in samples:
        w.write(s)
    w.close()
    return buf.getvalue()


_PARQUET = lambda: _parquet_bytes(image=[_png(a[:, :, 0]) for a in _images()], label=_labels().tolist())  # noqa: E731
_TAR = lambda: _tar_bytes([{"__key__": f"s{i}", "png": _png(a[:, :, 0]), "cls": b"1"} for i, a in enumerate(_images())])  # noqa: E731
_truncations("parquet", "data.parquet", _PARQUET, [0, 4, 100, -8, -1], "cannot read as Parquet")
_file_case("parquet-random-bytes", "data.parquet", lambda: np.random.default_rng(1).bytes(4096), "Parquet")
_file_case("parquet-no-image-column", "data.parquet", lambda: _parquet_bytes(label=[1, 2]), "no 'image' column")
_file_case("parquet-undecodable-image", "data.parquet", lambda: _parquet_bytes(image=[b"junk"] * 2), "cannot read image")
_file_case("parquet-image-is-text", "data.parquet", lambda: _parquet_bytes(image=["a", "b"]), "encoded image bytes")
_file_case("parquet-float-labels", "data.parquet",
           lambda: _parquet_bytes(image=[_png(a[:, :, 0]) for a in _images()], label=[0.5] * N), "integer labels")
_truncations("tar", "data.tar", _TAR, [100, 700, 2000, 5200], "cannot read as a WebDataset tar")
_file_case("tar-random-bytes", "data.tar", lambda: np.random.default_rng(1).bytes(4096), "WebDataset tar")
_file_case("tar-no-image-member", "data.tar", lambda: _tar_bytes([{"__key__": "a", "txt": b"x"}]), "no image member")
_file_case("tar-bad-npy-member", "data.tar", lambda: _tar_bytes([{"__key__": "a", "npy": b"\x93NUMPY junk"}]), ".npy")
_file_case("tar-bad-cls", "data.tar", lambda: _tar_bytes([{"__key__": "a", "png": _png(_images()[0, :, :, 0]), "cls": b"cat"}]),
           "not an integer label")


# image folders ------------------------------------------------------------------

_PNG = lambda: _png(_images()[0, ..., 0])  # noqa: E731
_JPG = lambda: _jpeg(_images(c=3)[0])  # noqa: E731


def _folder(files: dict[str, bytes | Callable[[Path], None]], culprit: str, *words: str):
    def build(ctx: Ctx) -> Case:
        root = ctx.tmp / "imgs"
        root.mkdir()
        for name, data in files.items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            if callable(data):
                data(p)
            else:
                p.write_bytes(data)
        return Case(root, root / culprit if culprit else root, words)

    return build


for _off in [8, 33, 60, 200]:
    case(f"folder-png-truncated-at-{_off}")(
        _folder({"a/0.png": _PNG(), "a/1.png": _PNG()[:_off]}, "a/1.png", "cannot read image"))
for _off in [2, 100, 400]:
    case(f"folder-jpeg-truncated-at-{_off}")(
        _folder({"a/0.jpg": _JPG(), "a/1.jpg": _JPG()[:_off]}, "a/1.jpg", "cannot read image"))
case("folder-png-is-text")(_folder({"a/0.png": _PNG(), "a/1.png": b"not a png"}, "a/1.png", "cannot read image"))
case("folder-png-empty-file")(_folder({"0.png": b""}, "0.png", "cannot read image"))
case("folder-jpeg-bad-markers")(_folder({"0.jpg": b"\xff\xd8" + b"\xff\x00" * 50}, "0.jpg", "cannot read image"))
case("folder-png-ihdr-100000x100000")(_folder({"0.png": _png_with_size(100000, 100000)}, "0.png"))
case("folder-png-ihdr-20000x20000")(_folder({"0.png": _png_with_size(20000, 20000)}, "0.png"))
case("folder-png-rgba")(_folder({"0.png": _png(np.zeros((H, W, 4), np.uint8))}, "0.png", "alpha"))
case("folder-png-la")(_folder({"0.png": _png(np.zeros((H, W, 2), np.uint8))}, "0.png", "alpha"))
case("folder-png-16-bit")(_folder({"0.png": _png(np.zeros((H, W), np.uint16))}, "0.png", "mode"))


def _cmyk_jpeg(p: Path) -> None:
    Image.new("CMYK", (W, H)).save(p, format="JPEG")


def _palette_with_transparency(p: Path) -> None:
    Image.fromarray(_images(c=3)[0]).convert("P").save(p, format="PNG", transparency=0)


case("folder-jpeg-cmyk")(_folder({"0.jpg": _cmyk_jpeg}, "0.jpg", "mode CMYK"))
case("folder-png-palette-transparency")(_folder({"0.png": _palette_with_transparency}, "0.png", "transparency"))
case("folder-size-mismatch")(
    _folder({"a/0.png": _PNG(), "a/1.png": _png(np.zeros((H, W + 1), np.uint8))}, "a/1.png", "same size"))
case("folder-mode-mismatch")(
    _folder({"a/0.png": _PNG(), "a/1.png": _png(np.zeros((H, W, 3), np.uint8))}, "a/1.png", "same size and mode"))
case("folder-stray-text-file")(_folder({"a/0.png": _PNG(), "a/notes.txt": b"x"}, "a/notes.txt", "not a .png"))
case("folder-nested-folder")(_folder({"a/0.png": _PNG(), "a/deeper/1.png": _PNG()}, "a/deeper", "nested folder"))
case("folder-images-beside-classes")(_folder({"a/0.png": _PNG(), "1.png": _PNG()}, "", "loose files"))
case("folder-empty")(_folder({}, "", "no images"))
case("folder-fifo-png-in-root")(_folder({"0.png": _PNG(), "1.png": _mkfifo}, "1.png", "FIFO"))
case("folder-fifo-png-in-class")(_folder({"a/0.png": _PNG(), "b/1.png": _mkfifo}, "b/1.png", "FIFO"))
case("folder-broken-symlink-png")(
    _folder({"0.png": _PNG(), "1.png": lambda p: p.symlink_to(p.parent / "gone.png")}, "1.png", "no such file"))


# checkpoints: a folder with config.json + model.safetensors (input: a valid .npz) ------------


def _ckpt_case(name: str, edit: Callable[[Path], None], culprit: str, *words: str, table=CASES) -> None:
    def build(ctx: Ctx) -> Case:
        d = ctx.checkpoint()
        edit(d)
        return Case(ctx.valid_npz(), d / culprit, words, ebm=d)

    case(name, table)(build)


def _config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if k in ("puregen_format", "model_type", "config"):
                cfg[k] = v
            else:
                cfg["config"][k] = v
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _config_text(text: str | bytes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (d / "config.json").write_bytes(data)

    return edit


_UNET = {
    "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 16, "norm_num_groups": 8,
}

_ckpt_case("ckpt-config-truncated", lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:30]),
           "config.json", "invalid JSON")
_ckpt_case("ckpt-config-empty", _config_text(""), "config.json", "invalid JSON")
_ckpt_case("ckpt-config-not-utf8", _config_text(b"\xff\xfe{}"), "config.json")
_ckpt_case("ckpt-config-a-list", _config_text("[1, 2]"), "config.json", "JSON object")
_ckpt_case("ckpt-config-nested-100000", _config_text("[" * 100000 + "]" * 100000), "config.json", "nested")
_ckpt_case("ckpt-config-nested-40-objects", _config_text('{"a": ' * 40 + "1" + "}" * 40), "config.json", "nested")
_ckpt_case("ckpt-config-int-of-5000-digits", _config_text('{"puregen_format": ' + "9" * 5000 + "}"), "config.json",
           "invalid JSON")
for _v, _label in [(10**6, "1e6"), (10**30, "1e30"), (True, "true"), (16.5, "float"), ("16", "string"),
                   (0, "zero"), (-16, "negative"), (None, "null"), ([16], "list")]:
    _ckpt_case(f"ckpt-ebm-nf-{_label}", _config(nf=_v), "config.json", "nf")
_ckpt_case("ckpt-ebm-nf-infinity", _config_text('{"puregen_format": 1, "model_type": "ebm", '
                                                '"config": {"in_channels": 1, "nf": Infinity}}'), "config.json", "nf")
_ckpt_case("ckpt-ebm-nf-nan", _config_text('{"puregen_format": 1, "model_type": "ebm", '
                                           '"config": {"in_channels": 1, "nf": NaN}}'), "config.json", "nf")
_ckpt_case("ckpt-ebm-in-channels-1000", _config(in_channels=1000), "config.json", "in_channels")
_ckpt_case("ckpt-ebm-missing-nf", _config(config={"in_channels": 1}), "config.json", "missing nf")
_ckpt_case("ckpt-ebm-config-a-list", _config(config=[1, 2]), "config.json", "JSON object")
_ckpt_case("ckpt-ebm-width-mismatch", _config(nf=32), "model.safetensors", "shape mismatch")
_ckpt_case("ckpt-puregen-format-2", _config(puregen_format=2), "config.json", "puregen_format")
_ckpt_case("ckpt-puregen-format-true", _config(puregen_format=True), "config.json", "puregen_format")
_ckpt_case("ckpt-model-type-unknown", _config(model_type="gan"), "config.json", "unknown model_type")
_ckpt_case("ckpt-model-type-a-list", _config(model_type=[1]), "config.json", "unknown model_type")
_ckpt_case("ckpt-unet-layers-1e6", _config(model_type="unet", config={**_UNET, "layers_per_block": 10**6}),
           "config.json", "layers_per_block")
_ckpt_case("ckpt-unet-channels-1e9", _config(model_type="unet", config={**_UNET, "block_out_channels": [10**9] * 3}),
           "config.json", "block_out_channels")
_ckpt_case("ckpt-unet-100-levels", _config(model_type="unet", config={**_UNET, "block_out_channels": [16] * 100}),
           "config.json", "block_out_channels")
_ckpt_case("ckpt-unet-holds-ebm-weights", _config(model_type="unet", config=_UNET), "")
_ckpt_case("ckpt-classifier-num-classes-1e9",
           _config(model_type="classifier", config={"arch": "small-cnn", "in_channels": 1, "num_classes": 10**9}),
           "config.json", "num_classes")


def _rm(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _replace_with(name: str, kind: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()
        if kind == "dir":
            (d / name).mkdir()
        else:
            _mkfifo(d / name)

    return edit


_ckpt_case("ckpt-config-missing", _rm("config.json"), "config.json", "not found")
_ckpt_case("ckpt-config-is-a-directory", _replace_with("config.json", "dir"), "config.json", "directory")
_ckpt_case("ckpt-config-fifo", _replace_with("config.json", "fifo"), "config.json", "FIFO")
_ckpt_case("ckpt-weights-missing", _rm("model.safetensors"), "model.safetensors", "not found")
_ckpt_case("ckpt-weights-is-a-directory", _replace_with("model.safetensors", "dir"), "model.safetensors", "directory")
_ckpt_case("ckpt-weights-fifo", _replace_with("model.safetensors", "fifo"), "model.safetensors", "FIFO")


def _weights(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        w = d / "model.safetensors"
        w.write_bytes(fn(w.read_bytes()))

    return edit


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header, data: bytes) -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h)) + h + data


def _edit_header(fn: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        header, data = _header(raw)
        fn(header)
        return _with_header(header, data)

    return edit


def _set_entry(key: str, **changes):
    def fn(header: dict) -> None:
        header[key].update(changes)

    return fn


for _off in [0, 4, 8, 100, -1]:
    _ckpt_case(f"ckpt-weights-truncated-at-{_off if _off >= 0 else 'm1'}",
               _weights(lambda r, o=_off: r[: o if o >= 0 else len(r) + o]), "model.safetensors",
               "truncated or corrupt")
_ckpt_case("ckpt-weights-header-length-huge", _weights(lambda r: struct.pack("<Q", 1 << 62) + r[8:]),
           "model.safetensors", "truncated or corrupt")
_ckpt_case("ckpt-weights-header-not-json", _weights(lambda r: _with_header(b"{not json" + b" " * 20, b"")),
           "model.safetensors", "truncated or corrupt")
_ckpt_case("ckpt-weights-header-a-list", _weights(lambda r: _with_header([1, 2], b"")), "model.safetensors",
           "truncated or corrupt")
_ckpt_case("ckpt-weights-header-nested", _weights(lambda r: _with_header(b"[" * 100000 + b"]" * 100000, b"")),
           "model.safetensors", "truncated or corrupt")
_ckpt_case("ckpt-weights-shape-negative", _weights(_edit_header(_set_entry("l5.weight", shape=[-1, 16]))),
           "model.safetensors", "truncated or corrupt")
_ckpt_case("ckpt-weights-shape-huge", _weights(_edit_header(_set_entry("l5.weight", shape=[10**12, 16]))),
           "model.safetensors", "shape mismatch")
_ckpt_case("ckpt-weights-offsets-beyond-file",
           _weights(_edit_header(_set_entry("l5.weight", data_offsets=[0, 1 << 40]))), "model.safetensors",
           "truncated or corrupt")
_ckpt_case("ckpt-weights-dtype-bogus", _weights(_edit_header(_set_entry("l5.weight", dtype="Q99"))),
           "model.safetensors", "truncated or corrupt")
_ckpt_case("ckpt-weights-missing-key", _weights(_edit_header(lambda h: h.pop("l5.weight"))), "model.safetensors",
           "missing")


def _save_state(d: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, str(d / "model.safetensors"))


def _state_edit(fn) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"))
        fn(state)
        _save_state(d, state)

    return edit


def _nan(state):
    state["l5.weight"][0, 0] = float("nan")


def _int_weights(state):
    state["l5.weight"] = state["l5.weight"].to(__import__("torch").int32)


def _extra_key(state):
    state["extra.weight"] = state["l5.weight"].clone()


_ckpt_case("ckpt-weights-nan", _state_edit(_nan), "model.safetensors", "NaN")
_ckpt_case("ckpt-weights-int32", _state_edit(_int_weights), "model.safetensors", "dtype")
_ckpt_case("ckpt-weights-unexpected-key", _state_edit(_extra_key), "model.safetensors", "unexpected")


def _hub_layout(nf_first: int) -> Callable[[Path], None]:
    """The hub layout (no puregen_format): the architecture is read off block1.c1.weight's shape."""

    def edit(d: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"))
        state["block1.c1.weight"] = torch.zeros(nf_first, 1, 3, 3)
        _save_state(d, state)
        (d / "config.json").write_text(json.dumps({"architectures": ["EBM"]}))

    return edit


def _hub_without_block1(d: Path) -> None:
    _hub_layout(16)(d)
    _state_edit(lambda state: state.pop("block1.c1.weight"))(d)


_ckpt_case("ckpt-hub-width-1e5", _hub_layout(100000), "model.safetensors", "nf")
_ckpt_case("ckpt-hub-without-block1", _hub_without_block1, "model.safetensors", "not an EBM checkpoint")


# The worst bombs: each made a reader take gigabytes; run under RLIMIT_AS in a child process. --------


_file_case("bomb-cifar-memo-long-binput-9-bytes", CIFAR, lambda: b"\x80\x02Nr\x00\x00\x00\x10.", "memo", table=BOMBS)
_file_case("bomb-cifar-memo-text-put", CIFAR, lambda: b"\x80\x02Np1000000000\n.", "memo", table=BOMBS)


def _codecs_copies(ctx: Ctx) -> Case:
    """One 1 MB string memoised once, `_codecs.encode`d 3000 times (3 GB of bytes)."""
    big = b"a" * (1 << 20)
    body = b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(big)) + big
    body += b"q\x01X\x06\x00\x00\x00latin1q\x02"
    body += b"](" + b"h\x00h\x01h\x02\x86R" * 3000 + b"e."
    p = ctx.write(CIFAR, body)
    return Case(p, p, ("more data than the file holds",))


def _array_copies(ctx: Ctx) -> Case:
    """One 1 MB array state memoised once, BUILT into 3000 arrays (3 GB of copies)."""
    n = 1 << 20
    dtype = (b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    body = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02U\x01bq\x03"
    body += b"(K\x01J" + struct.pack("<i", n) + b"\x85" + dtype + b"\x89T" + struct.pack("<I", n) + bytes(n)
    body += b"tq\x04"
    body += b"](" + b"h\x00h\x01h\x02h\x03\x87Rh\x04b" * 3000 + b"e."
    p = ctx.write(CIFAR, body)
    return Case(p, p, ("more data than the file holds",))


case("bomb-cifar-codecs-copies-3gb", BOMBS)(_codecs_copies)
case("bomb-cifar-array-copies-3gb", BOMBS)(_array_copies)
_file_case("bomb-cifar-bytes-10gb", CIFAR, lambda: b"\x80\x02c__builtin__\nbytes\n\x8a\x05\x00\x00\x00\x00\x02\x85R.",
           "bytes()", table=BOMBS)


def _gz_zeros_64mb() -> bytes:
    return gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)


def _idx_gz_2gb(ctx: Ctx) -> Case:
    """A 2 MB multi-member .gz: a valid small IDX header, then 2 GB of zeros."""
    zeros = _gz_zeros_64mb()
    p = ctx.write(IDX_GZ, gzip.compress(_idx_images(), mtime=0) + zeros * 32)
    return Case(p, p, ("unexpected trailing bytes",))


def _idx_gz_declares_4gb(ctx: Ctx) -> Case:
    """A 2 MB .gz whose header declares 4 GB (it holds 2 GB)."""
    zeros = _gz_zeros_64mb()
    p = ctx.write(IDX_GZ, gzip.compress(_idx((2**12, 2**10, 2**10), b""), mtime=0) + zeros * 32)
    return Case(p, p, ("cannot hold",))


case("bomb-idx-gz-2mb-of-2gb-zeros", BOMBS)(_idx_gz_2gb)
case("bomb-idx-gz-declares-4gb", BOMBS)(_idx_gz_declares_4gb)
_file_case("bomb-idx-declares-2-pow-93", IDX, lambda: _idx((2**31, 2**31, 2**31), b"\0" * 100), "limit",
           table=BOMBS)
_file_case("bomb-idx-declares-4gb", IDX, lambda: _idx((2**12, 2**10, 2**10), b"\0" * 100), "truncated",
           table=BOMBS)
_file_case("bomb-npy-declares-2-pow-60", "data.npy", lambda: _npy_raw(_npy_header(shape=(2**20, 2**20, 2**20, 1))),
           "limit", table=BOMBS)
_file_case("bomb-npy-declares-4gb", "data.npy", lambda: _npy_raw(_npy_header(shape=(2**12, 2**10, 2**10, 1))),
           "truncated", table=BOMBS)
_file_case("bomb-npz-member-declares-2-pow-60", "data.npz",
           lambda: _zip({"x.npy": _npy_raw(_npy_header(shape=(2**20, 2**20, 2**20, 1)))}), "limit", table=BOMBS)
_file_case("bomb-npz-member-declares-4gb", "data.npz",
           lambda: _zip({"x.npy": _npy_raw(_npy_header(shape=(2**12, 2**10, 2**10, 1)))}), "truncated", table=BOMBS)
_ckpt_case("bomb-ckpt-ebm-nf-20000", _config(nf=20000), "config.json", "nf", table=BOMBS)
_ckpt_case("bomb-ckpt-ebm-nf-8192", _config(nf=8192), "model.safetensors", "shape mismatch", table=BOMBS)
_ckpt_case("bomb-ckpt-hub-width-8000", _hub_layout(8000), "model.safetensors", "shape mismatch", table=BOMBS)
_ckpt_case("bomb-ckpt-unet-8192-wide",
           _config(model_type="unet", config={**_UNET, "block_out_channels": [8192] * 3, "norm_num_groups": 32,
                                              "layers_per_block": 4}), "", "holds a DDPM", table=BOMBS)


# -------------------------------------------------------------------- running


class _Hang(BaseException):
    """Raised by the timer signal; a BaseException so that the CLI's `except Exception` lets it through."""


def _argv(c: Case, out: Path) -> list[str]:
    argv = ["purify", str(c.input), "-o", str(out), "--no-progress"]
    if c.ebm is not None:
        return argv + ["--method", "ebm", "--ebm", str(c.ebm)]
    return argv + ["--method", "jpeg"]


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _written(out: Path) -> list[str]:
    return [str(p) for p in (out, Path(f"{out}.parts"), Path(f"{out}.manifest.json")) if p.exists()]


def _check_message(name: str, c: Case, rc: int, err: str) -> None:
    assert rc == 2, f"{name}: exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err, f"{name}: traceback in stderr:\n{err}"
    assert err.startswith("puregen: error: "), err
    assert str(c.culprit) in err, f"{name}: stderr does not name {c.culprit}:\n{err}"
    for word in c.words:
        assert word in err, f"{name}: {word!r} not in stderr:\n{err}"


@pytest.fixture(scope="module")
def warm(ebm_checkpoint, tmp_path_factory):
    """One failing run first, so that lazy imports are not charged to the first case."""
    d = tmp_path_factory.mktemp("warm")
    np.savez(d / "ok.npz", x=_images())
    main(["purify", str(d / "missing.npz"), "-o", str(d / "o.npz"), "--method", "jpeg", "--no-progress"])
    main(["purify", str(d / "ok.npz"), "-o", str(d / "o.npz"), "--method", "ebm", "--ebm", str(d / "nope")])
    Image.open(io.BytesIO(_PNG())).load()
    return ebm_checkpoint


@pytest.fixture
def hang_guard():
    def fire(signum, frame):
        raise _Hang(f"no answer within {HANG_GUARD_SECONDS} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, HANG_GUARD_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_one_clear_error(name, tmp_path, warm, hang_guard, capsys):
    ctx = Ctx(tmp_path, warm)
    c = CASES[name](ctx)
    out = tmp_path / "out" / "purified.npz"
    out.parent.mkdir()
    argv = _argv(c, out)
    capsys.readouterr()
    rss_before = _maxrss_bytes()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        seconds = time.perf_counter() - started
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss_growth = _maxrss_bytes() - rss_before
    err = capsys.readouterr().err
    _check_message(name, c, rc, err)
    assert seconds < MAX_SECONDS, f"{name}: took {seconds:.1f} s"
    assert traced_peak < MAX_TRACED_BYTES, f"{name}: allocated {traced_peak >> 20} MiB"
    assert rss_growth < MAX_RSS_GROWTH, f"{name}: peak RSS grew by {rss_growth >> 20} MiB"
    assert not _written(out), f"{name}: wrote {_written(out)}"
    if "marker" in ctx.extra:
        assert not Path(ctx.extra["marker"]).exists(), f"{name}: the pickle ran code"


_CHILD = r"""
import io, json, resource, signal, sys, time
import puregen.api, puregen.engine.factory  # imports first: the limit is on what the cases add
from puregen.cli import main

spec = json.load(open(sys.argv[1]))
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
limit = size + spec["extra"]
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

def fire(signum, frame):
    raise TimeoutError("hang guard")

signal.signal(signal.SIGALRM, fire)
results = {}
for name, argv in spec["cases"].items():
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    signal.alarm(spec["guard"])
    t = time.perf_counter()
    try:
        rc = main(argv)
    except BaseException as e:
        rc = f"raised {type(e).__name__}: {e}"
    finally:
        seconds = time.perf_counter() - t
        signal.alarm(0)
        sys.stderr = old
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss
    results[name] = {"rc": rc, "err": err.getvalue(), "seconds": seconds, "rss_growth": growth}
json.dump({"limit": limit, "results": results}, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory, warm):
    if not sys.platform.startswith("linux"):
        pytest.skip("the bomb child reads its address-space size from /proc (Linux)")
    root = tmp_path_factory.mktemp("bombs")
    cases, argvs = {}, {}
    for name in sorted(BOMBS):
        d = root / name
        d.mkdir()
        c = BOMBS[name](Ctx(d, warm))
        out = d / "out" / "purified.npz"
        out.parent.mkdir()
        cases[name] = (c, out)
        argvs[name] = _argv(c, out)
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": argvs, "extra": CHILD_EXTRA_ADDRESS_SPACE, "guard": HANG_GUARD_SECONDS}))
    result_file = root / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec), str(result_file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and result_file.exists(), f"bomb child failed ({proc.returncode}):\n{proc.stderr}"
    return cases, json.loads(result_file.read_text())["results"]


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_size_bomb_is_refused_within_bounds(name, bomb_results):
    cases, results = bomb_results
    c, out = cases[name]
    r = results[name]
    _check_message(name, c, r["rc"], r["err"])
    assert "out of memory" not in r["err"] and "MemoryError" not in r["err"], f"{name}: {r['err']}"
    assert r["seconds"] < MAX_SECONDS, f"{name}: took {r['seconds']:.1f} s"
    assert r["rss_growth"] < MAX_RSS_GROWTH, f"{name}: peak RSS grew by {r['rss_growth'] >> 20} MiB"
    assert not _written(out), f"{name}: wrote {_written(out)}"


def test_every_format_is_fuzzed():
    names = set(CASES) | set(BOMBS)
    for prefix in ("npz-", "npy-", "idx-", "idx-gz-", "cifar-", "folder-", "ckpt-", "parquet-", "tar-", "bomb-"):
        assert sum(n.startswith(prefix) for n in names) >= 5, prefix
