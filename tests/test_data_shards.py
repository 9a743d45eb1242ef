"""Sharded inputs and outputs: Parquet files and WebDataset tars, read as one dataset and written back shard for shard."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from webdataset import TarWriter

from puregen.api import load_purifier, purify_dataset
from puregen.data import read_dataset, write_dataset
from puregen.data.readers import detect_format
from puregen.errors import InputError

from .conftest import smooth_images

ROWS = [(0, 3), (3, 10), (10, 14)]  # three shards, uneven
N = ROWS[-1][1]


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data():
    return smooth_images(N, seed=5), np.arange(N) % 4


def _parquet_shards(root, images, labels, raw=False):
    root.mkdir()
    for k, (s, e) in enumerate(ROWS):
        if raw:
            flat = images[s:e].reshape(e - s, -1)
            image = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.uint8()), flat.shape[1])
        else:
            image = pa.array([_png(a) for a in images[s:e]], pa.binary())
        table = pa.table({"id": [f"row{i}" for i in range(s, e)], "image": image, "label": labels[s:e].tolist(),
                          "score": [i / 7 for i in range(s, e)]})
        if raw:
            table = table.replace_schema_metadata({"puregen.image_shape": "28,28,1", "origin": "test"})
        pq.write_table(table, root / f"train-{k:05d}.parquet")
    return root


def _tar_shards(root, images, labels, ext="png"):
    root.mkdir()
    for k, (s, e) in enumerate(ROWS):
        with open(root / f"shard-{k:06d}.tar", "wb") as f:
            w = TarWriter(f, encoder=False)
            for i in range(s, e):
                w.write({"__key__": f"sample{i:04d}", ext: _png(images[i]) if ext == "png" else _npy(images[i]),
                         "cls": str(labels[i]).encode(), "json": b'{"i": %d}' % i, "txt": f"caption {i}".encode()})
            w.close()
    return root


def _tar_samples(path):
    """{key: {ext: bytes}} of a tar shard, read with tarfile (not the code under test)."""
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _reference(tmp_path, images, labels, purifier, **job):
    ref = tmp_path / "ref.npz"
    write_dataset(tmp_path / "ref_in.npz", images, labels)
    purify_dataset(tmp_path / "ref_in.npz", ref, purifier=purifier, progress=False, **job)
    return read_dataset(ref).images


def _purifier(tiny_models, method):
    ebm, unet = tiny_models
    options = {"ebm": dict(steps=2), "jpeg": {}}[method]
    return load_purifier(method, ebm=ebm, ddpm=unet, preset="tiny", micro_batch=8, threads=2, **options)


def test_read_folder_glob_and_file(tmp_path, data):
    images, labels = data
    root = _parquet_shards(tmp_path / "pq", images, labels)
    tars = _tar_shards(tmp_path / "wds", images, labels)
    for path, fmt in ((root, "parquet"), (str(root / "train-*.parquet"), "parquet"), (tars, "webdataset"),
                      (str(tars / "shard-*.tar"), "webdataset"), (str(tars / "shard-{000000..000002}.tar"), "webdataset")):
        assert detect_format(path) == fmt
        ds = read_dataset(path)
        assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
        assert [(s.start, s.stop) for s in ds.shards.shards] == ROWS
        assert len(ds.files) == 3
    with pytest.raises(InputError, match="shard-000003.tar: named by the pattern"):
        read_dataset(str(tars / "shard-{000000..000003}.tar"), format="webdataset")
    one = read_dataset(root / "train-00001.parquet")
    assert np.array_equal(one.images, images[3:10]) and one.shards.shards[0].name == "train-00001.parquet"


@pytest.mark.parametrize("method", ["jpeg", "ebm"])
def test_parquet_output_keeps_shards_and_columns(tmp_path, data, tiny_models, method):
    images, labels = data
    root = _parquet_shards(tmp_path / "pq", images, labels)
    p = _purifier(tiny_models, method)
    out = tmp_path / "out.parquet"
    purify_dataset(root, out, purifier=p, seed=3, chunk_size=4, progress=False)
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in root.iterdir())
    for f in root.iterdir():
        before, after = pq.read_table(f), pq.read_table(out / f.name)
        assert after.num_rows == before.num_rows and after.schema.names == before.schema.names
        assert after.drop_columns(["image"]).equals(before.drop_columns(["image"]))
    got = read_dataset(out)
    assert np.array_equal(got.labels, labels)
    assert np.array_equal(got.images, _reference(tmp_path, images, labels, p, seed=3, chunk_size=4))


def test_raw_parquet_stays_raw(tmp_path, data, tiny_models):
    images, labels = data
    root = _parquet_shards(tmp_path / "pq", images, labels, raw=True)
    assert np.array_equal(read_dataset(root).images, images)
    p = _purifier(tiny_models, "jpeg")
    purify_dataset(root, tmp_path / "out.parquet", purifier=p, progress=False)
    after = pq.read_table(tmp_path / "out.parquet" / "train-00002.parquet")
    assert pa.types.is_fixed_size_list(after.schema.field("image").type)
    assert after.schema.metadata[b"origin"] == b"test"
    assert np.array_equal(read_dataset(tmp_path / "out.parquet").images, _reference(tmp_path, images, labels, p))


@pytest.mark.parametrize("method,ext", [("jpeg", "png"), ("ebm", "png"), ("jpeg", "npy")])
def test_webdataset_output_keeps_shards_keys_and_members(tmp_path, data, tiny_models, method, ext):
    images, labels = data
    root = _tar_shards(tmp_path / "wds", images, labels, ext)
    p = _purifier(tiny_models, method)
    out = tmp_path / "out.wds"
    purify_dataset(root, out, purifier=p, seed=3, chunk_size=4, progress=False)
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in root.iterdir())
    for f in root.iterdir():
        before, after = _tar_samples(f), _tar_samples(out / f.name)
        assert list(after) == list(before)  # same keys, same order
        for key in before:
            assert set(after[key]) == set(before[key])
            for member in ("cls", "json", "txt"):
                assert after[key][member] == before[key][member]
    got = read_dataset(out)
    assert np.array_equal(got.labels, labels)
    assert np.array_equal(got.images, _reference(tmp_path, images, labels, p, seed=3, chunk_size=4))


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_killed_and_resumed_job_gives_the_same_bytes(tmp_path, data, tiny_models, fmt):
    from puregen.engine.pipeline import run_job

    images, labels = data
    root = (_parquet_shards if fmt == "parquet" else _tar_shards)(tmp_path / "in", images, labels)
    p = _purifier(tiny_models, "ebm")
    whole, resumed = tmp_path / f"whole.{fmt}", tmp_path / f"resumed.{fmt}"
    purify_dataset(root, whole, purifier=p, chunk_size=4, progress=False)

    def stop_after_first(_k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(root, resumed, p, chunk_size=4, progress=False, on_chunk=stop_after_first)
    assert not resumed.exists()
    manifest = purify_dataset(root, resumed, purifier=p, chunk_size=4, resume=True, progress=False)
    assert manifest["timing"]["images_this_run"] == N - 4
    for f in whole.iterdir():
        assert (resumed / f.name).read_bytes() == f.read_bytes()


def test_limit_writes_the_shards_it_purified(tmp_path, data, tiny_models):
    images, labels = data
    root = _parquet_shards(tmp_path / "pq", images, labels)
    purify_dataset(root, tmp_path / "out.parquet", purifier=_purifier(tiny_models, "jpeg"), limit=5, progress=False)
    assert [pq.read_table(f).num_rows for f in sorted((tmp_path / "out.parquet").iterdir())] == [3, 2]


def _corrupt(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    "kind,match",
    [
        ("no_image_column", "no 'image' column"),
        ("undecodable", "cannot read image"),
        ("shapes_differ", "every shard must hold images of one shape"),
        ("truncated_parquet", "cannot read as Parquet"),
        ("truncated_tar", "cannot read as a WebDataset tar"),
        ("tar_without_image", "no image member"),
    ],
)
def test_bad_shards_name_the_file_and_write_nothing(tmp_path, data, tiny_models, kind, match):
    images, labels = data
    if kind in ("truncated_tar", "tar_without_image"):
        root = _tar_shards(tmp_path / "in", images, labels)
        bad = root / "shard-000001.tar"
        if kind == "truncated_tar":
            _corrupt(bad)
        else:
            with open(bad, "wb") as f:
                w = TarWriter(f, encoder=False)
                w.write({"__key__": "x", "txt": b"no image"})
                w.close()
        out = tmp_path / "out.wds"
    else:
        root = _parquet_shards(tmp_path / "in", images, labels)
        bad = root / "train-00001.parquet"
        if kind == "no_image_column":
            pq.write_table(pa.table({"label": [1, 2]}), bad)
        elif kind == "undecodable":
            pq.write_table(pa.table({"image": [b"not an image"], "label": [0]}), bad)
        elif kind == "shapes_differ":
            pq.write_table(pa.table({"image": [_png(smooth_images(1, 20, 20)[0])], "label": [0]}), bad)
        else:
            _corrupt(bad)
        out = tmp_path / "out.parquet"
    with pytest.raises(InputError, match=match) as err:
        purify_dataset(root, out, purifier=_purifier(tiny_models, "jpeg"), progress=False)
    assert bad.name in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_sharded_output_needs_an_input_of_its_format(tmp_path, data, tiny_models):
    images, labels = data
    write_dataset(tmp_path / "in.npz", images, labels)
    tars = _tar_shards(tmp_path / "wds", images, labels)
    p = _purifier(tiny_models, "jpeg")
    with pytest.raises(InputError, match="rebuilds the shards of a parquet input"):
        purify_dataset(tmp_path / "in.npz", tmp_path / "out.parquet", purifier=p, progress=False)
    with pytest.raises(InputError, match="rebuilds the shards of a parquet input"):
        purify_dataset(tars, tmp_path / "out.parquet", purifier=p, progress=False)
    assert not (tmp_path / "out.parquet").exists()
    purify_dataset(tars, tmp_path / "out.npz", purifier=p, progress=False)  # shards to one .npz is fine
    assert np.array_equal(read_dataset(tmp_path / "out.npz").labels, labels)


@pytest.mark.parametrize("kind", ["binary", "list"])
def test_raw_pixels_as_bytes_or_lists_keep_their_type(tmp_path, kind):
    images = smooth_images(5, 8, 6, 3)
    flat = images.reshape(5, -1)
    column = (pa.array([r.tobytes() for r in flat], pa.binary()) if kind == "binary"
              else pa.array([r.tolist() for r in flat], pa.list_(pa.uint8())))
    table = pa.table({"image": column, "k": list(range(5))}).replace_schema_metadata({"puregen.image_shape": "[8, 6, 3]"})
    pq.write_table(table, tmp_path / "one.parquet")
    ds = read_dataset(tmp_path / "one.parquet")
    assert np.array_equal(ds.images, images)
    write_dataset(tmp_path / "out.parquet", ds)
    after = pq.read_table(tmp_path / "out.parquet" / "one.parquet")
    assert after.schema.field("image").type == column.type and after.column("k").to_pylist() == list(range(5))
    assert np.array_equal(read_dataset(tmp_path / "out.parquet").images, images)
