"""Atomic writers (puregen.data.writers / atomic)."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from puregen.data import ImageDataset, read_dataset, write_dataset
from puregen.data.atomic import write_npz_atomic
from puregen.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _images(n=6, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 5, 4, c), dtype=np.uint8)


def _leftovers(d: Path):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_write_npz_atomic_basic(tmp_path):
    p = write_npz_atomic(tmp_path / "sub" / "chunk_000.npz", x=_images(), idx=np.arange(6))
    with np.load(p, allow_pickle=False) as z:
        assert sorted(z.files) == ["idx", "x"]
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & 0o044, oct(mode)  # not left at mkstemp's 0600 (umask permitting)
    assert _leftovers(p.parent) == []
    with pytest.raises(InputError, match="object"):
        write_npz_atomic(tmp_path / "o.npz", x=np.array([None], dtype=object))


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    p = write_dataset(tmp_path / "d.npz", _images(seed=1))
    before = p.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(InputError, match=r"d\.npz: cannot write: disk full"):  # the path is named
        write_dataset(p, _images(seed=2))
    assert p.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_crash_mid_write_keeps_old_file(tmp_path):
    """A process killed while writing leaves the old file intact (at most a hidden temp)."""
    target = write_dataset(tmp_path / "d.npz", _images(seed=3))
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from puregen.data.atomic import write_npz_atomic
        def dying_savez(f, **arrays):
            f.write(b"PK partial")
            f.flush()
            os._exit(9)
        np.savez = dying_savez
        write_npz_atomic({str(target)!r}, x=np.zeros((2, 3, 3, 1), np.uint8))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert r.returncode == 9
    assert target.read_bytes() == before
    np.testing.assert_array_equal(read_dataset(target).images, _images(seed=3))


def test_overwrite_replaces_file(tmp_path):
    p = write_dataset(tmp_path / "d.npz", _images(seed=4))
    write_dataset(p, _images(seed=5), np.arange(6) % 2)
    ds = read_dataset(p)
    np.testing.assert_array_equal(ds.images, _images(seed=5))
    assert ds.labels is not None
    with pytest.raises(InputError, match="already exists"):
        write_dataset(p, _images(), overwrite=False)
    assert _leftovers(tmp_path) == []


def test_folder_failure_keeps_old_folder(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "out", _images(seed=6), np.array([0, 1, 0, 1, 0, 1]))
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    calls = {"n": 0}
    real_save = Image.Image.save

    def flaky_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(InputError, match=r"out: cannot write: disk full"):  # the path is named
        write_dataset(tmp_path / "out", _images(seed=7), np.array([0, 1, 2, 0, 1, 2]))
    monkeypatch.undo()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert _leftovers(tmp_path) == []
    ds = read_dataset(root)
    assert ds.num_classes == 2


def test_folder_replace_and_refusals(tmp_path):
    root = write_dataset(tmp_path / "out", _images(seed=8), np.array([0, 1, 0, 1, 0, 1]))
    write_dataset(root, _images(seed=9))  # image folder -> replaced by an unlabelled one
    assert read_dataset(root).labels is None
    assert _leftovers(tmp_path) == []
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="holds files other than images") as ei:
        write_dataset(precious, _images())
    assert str(precious) in str(ei.value)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    f = tmp_path / "plainfile"
    f.write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        write_dataset(f, _images())


def test_write_dataset_input_kinds(tmp_path):
    x = _images(c=1)
    ds = ImageDataset(x, np.arange(6) % 3, "mem", 3)
    p = write_dataset(tmp_path / "a.npz", ds)
    np.testing.assert_array_equal(read_dataset(p).labels, np.arange(6) % 3)
    q = write_dataset(tmp_path / "b.npy", torch.from_numpy(x))
    np.testing.assert_array_equal(read_dataset(q).images, x)
    with pytest.raises(InputError, match="uint8"):
        write_dataset(tmp_path / "c.npz", torch.rand(2, 4, 4, 3))
    with pytest.raises(InputError, match="dtype float32"):
        write_dataset(tmp_path / "c.npz", x.astype(np.float32))
    with pytest.raises(InputError, match="cannot tell the output format"):
        write_dataset(tmp_path / "c.bmp", x)
    idx_path = write_dataset(tmp_path / "train-images-idx3-ubyte.gz", x, np.arange(6) % 3)
    ds2 = read_dataset(idx_path)
    np.testing.assert_array_equal(ds2.images, x)
    np.testing.assert_array_equal(ds2.labels, np.arange(6) % 3)
