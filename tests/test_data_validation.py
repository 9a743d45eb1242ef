"""Validation, ImageDataset and model-space conversion (puregen.data)."""

import numpy as np
import pytest
import torch

from puregen.data import ImageDataset, from_model_space, prepare_api_input, to_model_space
from puregen.data.validation import (
    check_image_shape,
    validate_float_images,
    validate_images_uint8,
    validate_labels,
)
from puregen.errors import InputError


def _u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------- validation


def test_validate_images_uint8_accepts_nhwc_and_nhw():
    x = _u8((4, 5, 6, 3))
    y = validate_images_uint8(x, "a.npz")
    assert y.shape == x.shape and np.shares_memory(x, y)  # no copy
    y = validate_images_uint8(_u8((4, 5, 6)), "a.npz")
    assert y.shape == (4, 5, 6, 1)


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((4, 5, 6, 5), "C=5"),
        ((4, 3, 8, 8), "NCHW"),
        ((10, 784), "2-D"),
        ((2, 3, 4, 5, 6), "5-D"),
        ((32, 32, 3), "single HWC image"),
        ((0, 8, 8, 3), "N=0"),
        ((2, 0, 8, 3), "zero height or width"),
    ],
)
def test_validate_images_bad_shape(shape, needle):
    with pytest.raises(InputError) as ei:
        validate_images_uint8(np.zeros(shape, np.uint8), "data/x.npz")
    msg = str(ei.value)
    assert msg.startswith("data/x.npz: ")
    assert needle in msg


def test_validate_images_bad_dtype_message():
    with pytest.raises(InputError) as ei:
        validate_images_uint8(np.zeros((2, 4, 4, 3), np.float32), "data/x.npz", name="array 'x'")
    assert str(ei.value) == "data/x.npz: array 'x' has dtype float32; images on disk must be uint8 NHWC"


def test_validate_images_not_array():
    with pytest.raises(InputError, match="must be a numpy array"):
        validate_images_uint8([[1, 2]], "src")


def test_check_image_shape_returns_nhwc():
    assert check_image_shape((2, 7, 9), "s") == (2, 7, 9, 1)
    assert check_image_shape((2, 7, 9, 3), "s") == (2, 7, 9, 3)


def test_validate_labels_ok_and_types():
    out = validate_labels(np.array([0, 1, 2], np.uint8), 3, "f", num_classes=3)
    assert out.dtype == np.int64 and out.tolist() == [0, 1, 2]
    assert validate_labels([1, 0], 2, "f").tolist() == [1, 0]
    assert validate_labels(torch.tensor([[2], [1]]), 2, "f").tolist() == [2, 1]


@pytest.mark.parametrize(
    "labels, n, k, needle",
    [
        (np.array([0, 1, 10]), 3, 10, "out of range"),
        (np.array([0, -1, 2]), 3, None, "non-negative"),
        (np.array([0, 1]), 3, None, "length 2 but there are 3 images"),
        (np.array([0.0, 1.0, 2.0]), 3, None, "dtype float64"),
        (np.array([True, False, True]), 3, None, "dtype bool"),
        (np.zeros((3, 2), np.int64), 3, None, "expected 1-D"),
    ],
)
def test_validate_labels_bad(labels, n, k, needle):
    with pytest.raises(InputError) as ei:
        validate_labels(labels, n, "data/y.npz", num_classes=k)
    assert str(ei.value).startswith("data/y.npz: ")
    assert needle in str(ei.value)


def test_validate_float_images_nan_counts():
    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 1, 0] = np.nan
    x[1, 2, 2, 0] = np.inf
    with pytest.raises(InputError) as ei:
        validate_float_images(x, "input")
    msg = str(ei.value)
    assert msg.startswith("input: ")
    assert "3 non-finite" in msg and "2 NaN" in msg and "1 Inf" in msg


def test_validate_float_images_range_reports_min_max():
    x = np.linspace(-0.25, 1.5, 2 * 4 * 4 * 3, dtype=np.float64).reshape(2, 4, 4, 3)
    with pytest.raises(InputError) as ei:
        validate_float_images(x, "input")
    assert "min -0.25" in str(ei.value) and "max 1.5" in str(ei.value)


def test_validate_float_images_torch():
    t = torch.rand(2, 4, 4, 3)
    assert validate_float_images(t, "input").shape == (2, 4, 4, 3)
    t[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="1 NaN"):
        validate_float_images(t, "input")
    with pytest.raises(InputError, match="max 255"):
        validate_float_images(torch.full((1, 2, 2, 1), 255.0, dtype=torch.float16), "input")


# --------------------------------------------------------------- ImageDataset


def test_image_dataset_helpers():
    ds = ImageDataset(_u8((5, 6, 7, 3)), np.arange(5) % 2, "mem", 2)
    assert len(ds) == 5
    assert ds.shape == (5, 6, 7, 3)
    assert ds.image_shape == (6, 7, 3)
    assert (ds.height, ds.width, ds.channels) == (6, 7, 3)
    assert ds.labels.dtype == np.int64
    assert "mem" in repr(ds)


def test_image_dataset_validates():
    with pytest.raises(InputError, match="mem: labels must be in"):
        ImageDataset(_u8((3, 4, 4, 1)), [0, 1, 2], "mem", 2)
    with pytest.raises(InputError, match="mem: labels has length"):
        ImageDataset(_u8((3, 4, 4, 1)), [0, 1], "mem")
    with pytest.raises(InputError, match="mem: images has dtype"):
        ImageDataset(np.zeros((3, 4, 4, 1), np.int16), None, "mem")
    ds = ImageDataset(_u8((3, 4, 4)), None, "mem")
    assert ds.shape == (3, 4, 4, 1) and ds.labels is None
    ds = ImageDataset(_u8((2, 4, 4, 3)), [0, 1], "mem", class_names=("a", "b"))
    assert ds.num_classes == 2


# --------------------------------------------------------------- conversion


def test_uint8_round_trip_exact_all_levels():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(2, axis=0)
    x = np.concatenate([x, x, x], axis=3).copy()
    x[1] = x[1, ::-1]
    m = to_model_space(x)
    assert m.dtype == torch.float32 and m.shape == (2, 3, 16, 16)
    assert m.min().item() == -1.0 and m.max().item() == 1.0
    back = from_model_space(m)
    assert back.dtype == torch.uint8 and back.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(back.numpy(), x)


def test_to_model_space_values_and_layout():
    x = np.zeros((1, 2, 3, 3), np.uint8)
    x[0, 1, 2] = [0, 255, 51]
    m = to_model_space(x)
    assert m.is_contiguous()
    assert m[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    f = to_model_space(np.full((1, 2, 2, 1), 0.25, np.float64))
    assert f.dtype == torch.float32
    assert torch.allclose(f, torch.full((1, 1, 2, 2), -0.5))


def test_read_only_numpy_input(recwarn):
    x = _u8((2, 4, 4, 3))
    x.setflags(write=False)
    back = from_model_space(to_model_space(x))
    np.testing.assert_array_equal(back.numpy(), x)
    assert not [w for w in recwarn if "writable" in str(w.message)]


def test_from_model_space_clamps():
    x = torch.tensor([-1.01, -5.0, -1e9, 1.01, 7.0, float("inf"), float("-inf")]).reshape(1, 1, 1, 7)
    out = from_model_space(x).flatten().tolist()
    assert out == [0, 0, 0, 255, 255, 255, 0]


def test_from_model_space_rounds_not_truncates():
    levels = torch.arange(0, 255, dtype=torch.float64)
    for frac, offset in [(0.3, 0), (0.7, 1), (0.49, 0), (0.51, 1)]:
        v = ((levels + frac) / 127.5 - 1.0).to(torch.float32).reshape(1, 1, 1, -1)
        got = from_model_space(v).flatten().to(torch.int64)
        assert torch.equal(got, levels.to(torch.int64) + offset), frac
    # half a level above 0: truncation gives 0, rounding of 0.6 levels gives 1
    assert from_model_space(torch.full((1, 1, 1, 1), -1.0 + 0.6 / 127.5)).item() == 1


def test_from_model_space_nan_is_internal_error():
    with pytest.raises(RuntimeError, match="NaN"):
        from_model_space(torch.full((1, 1, 2, 2), float("nan")))


def test_to_model_space_bad_inputs():
    with pytest.raises(InputError, match=r"input: float images contain 3 non-finite values \(3 NaN\)"):
        to_model_space(np.full((1, 2, 2, 3), np.nan, np.float32)[:, :1, :1])
    with pytest.raises(InputError, match=r"input: float images must lie in \[0, 1\]; found min 0, max 2"):
        to_model_space(np.array([0.0, 2.0], np.float32).reshape(1, 1, 2, 1))
    with pytest.raises(InputError, match="dtype int64"):
        to_model_space(np.zeros((1, 2, 2, 1), np.int64))
    with pytest.raises(InputError, match="C=5"):
        to_model_space(torch.zeros((1, 2, 2, 5), dtype=torch.uint8))
    with pytest.raises(InputError, match="got list"):
        to_model_space([[0]])


@pytest.mark.parametrize("kind", ["numpy_u8", "numpy_f", "numpy_f64", "torch_u8", "torch_f", "torch_f16"])
def test_prepare_api_input_same_kind_out(kind):
    u8 = _u8((3, 5, 4, 3), seed=1)
    inputs = {
        "numpy_u8": u8,
        "numpy_f": u8.astype(np.float32) / 255,
        "numpy_f64": u8.astype(np.float64) / 255,
        "torch_u8": torch.from_numpy(u8),
        "torch_f": torch.from_numpy(u8).float() / 255,
        "torch_f16": (torch.from_numpy(u8).float() / 255).half(),
    }
    x = inputs[kind]
    m, restore = prepare_api_input(x)
    assert m.dtype == torch.float32 and m.shape == (3, 3, 5, 4)
    out = restore(from_model_space(m))
    if kind == "numpy_u8":
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, u8)
    elif kind.startswith("numpy"):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_array_equal(out, u8.astype(np.float32) / np.float32(255))
    elif kind == "torch_u8":
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
        assert out.device == x.device
        np.testing.assert_array_equal(out.numpy(), u8)
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.device == x.device
        np.testing.assert_array_equal(out.numpy(), u8.astype(np.float32) / np.float32(255))


def test_float_results_identical_whatever_the_kind():
    rng = np.random.default_rng(3)
    engine_out = torch.from_numpy(rng.uniform(-1.2, 1.2, size=(2, 1, 4, 4)).astype(np.float32))
    u8 = from_model_space(engine_out)
    a = prepare_api_input(np.zeros((2, 4, 4, 1), np.float32))[1](u8)
    b = prepare_api_input(torch.zeros((2, 4, 4, 1), dtype=torch.float64))[1](u8).numpy()
    c = prepare_api_input(np.zeros((2, 4, 4, 1), np.uint8))[1](u8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c.astype(np.float32) / np.float32(255))


def test_prepare_api_input_nhw_restores_nhw():
    x = _u8((2, 6, 6))
    m, restore = prepare_api_input(x)
    assert m.shape == (2, 1, 6, 6)
    out = restore(from_model_space(m))
    assert out.shape == (2, 6, 6)
    np.testing.assert_array_equal(out, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_tensor_stays_on_device():
    x = torch.rand(2, 4, 4, 3, device="cuda")
    m, restore = prepare_api_input(x)
    assert m.device == x.device
    out = restore(from_model_space(m))
    assert out.device == x.device and out.dtype == torch.float32
