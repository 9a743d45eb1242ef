"""The noise contract: Philox-4x32-10 integer stream and the normal transform, pinned."""

import math

import numpy as np
import pytest
import torch

from puregen.kernels import philox

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# Golden vectors of OUR layout (counter = (block, step, i_lo, stream | i_hi << 16),
# key = seed split in two words): seed 2024, stream 3, step 5, 2 blocks.
GOLDEN_INDICES = [0, 1, 12345, (1 << 33) + 7]
GOLDEN_WORDS = [
    [[0x1C8230A2, 0x70522501, 0xCEA4748B, 0xE09DE949], [0xA8F6B072, 0xEB2A8926, 0x766667F4, 0xF6DB9D6D]],
    [[0x83244533, 0x3B49A472, 0x2D6B41E4, 0x0EB9A73F], [0x5B0FD62A, 0x074B8EBD, 0x807D2BDD, 0x20710B83]],
    [[0x2420FA1E, 0xA56111ED, 0xBAD19631, 0x4E29C7AA], [0xBE792E5A, 0x5AD7F997, 0x9835AC72, 0xD4FA9E1E]],
    [[0x2A98B0AD, 0x4E42EBCF, 0xBD80109B, 0x6B2B2008], [0xCDF2BC80, 0xFD1F916B, 0xB7D3E5A8, 0x4E2E6629]],
]
# Normals for seed 2024, stream 1 (EBM), step 0, sample shape (2, 2, 2), same indices.
GOLDEN_NORMALS = [
    [-2.467022657394409, -0.048661112785339355, 0.30373215675354004, 0.1509951800107956,
     1.1627660989761353, 0.21856649219989777, 1.6820175647735596, -0.10701429843902588],
    [-0.15614064037799835, 0.4828762412071228, 0.08789783716201782, 1.583444595336914,
     -0.7578912377357483, -0.22036702930927277, -0.40253010392189026, 1.2540749311447144],
    [1.7187914848327637, 0.9939174652099609, -1.0999332666397095, -1.471250295639038,
     1.4901021718978882, 0.4836023151874542, -0.17009969055652618, 0.1514587104320526],
    [1.5019052028656006, -0.8253316283226013, 0.11449771374464035, -0.6438039541244507,
     -1.2293027639389038, -0.8460078835487366, 0.4959542453289032, -0.19293922185897827],
]


def python_philox(ctr, key):
    """An independent Philox-4x32-10 on Python ints (key bumped before rounds 2..10)."""
    c = list(ctr)
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
            k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
    return tuple(c)


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answer_vectors(ctr, key, expected):
    got = philox.philox4x32(*map(_t, ctr), *key)
    assert tuple(int(w) for w in got) == expected
    assert python_philox(ctr, key) == expected


def test_torch_stream_matches_independent_python_on_random_counters():
    rng = np.random.default_rng(0)
    ctrs = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(200, 2), dtype=np.uint64)
    for ctr, key in zip(ctrs.tolist(), keys.tolist()):
        got = philox.philox4x32(*map(_t, ctr), *key)
        assert tuple(int(w) for w in got) == python_philox(ctr, key)


def test_golden_words_of_our_layout():
    idx = torch.tensor(GOLDEN_INDICES)
    words = philox.random_uint32(idx, seed=2024, stream=3, step=5, num_blocks=2)
    assert words.tolist() == GOLDEN_WORDS
    # and the layout, written out by hand for the large index
    i = GOLDEN_INDICES[3]
    expected = python_philox((1, 5, i & 0xFFFFFFFF, 3 | ((i >> 32) << 16)), (2024, 0))
    assert tuple(GOLDEN_WORDS[3][1]) == expected


def test_golden_normals():
    idx = torch.tensor(GOLDEN_INDICES)
    n = philox.normal_noise(idx, (2, 2, 2), seed=2024, stream=1, step=0)
    # Same formula, same float32 ops: the values are exact on this platform; a
    # few ulp of slack allows other libm builds of log/cos/sin.
    torch.testing.assert_close(n.reshape(4, -1), torch.tensor(GOLDEN_NORMALS), rtol=4e-7, atol=4e-7)


def test_box_muller_matches_float64_formula():
    idx = torch.arange(5)
    words = philox.random_uint32(idx, seed=7, stream=1, step=2, num_blocks=8)
    z = philox.box_muller(words).double()
    u = ((words >> 9).double() + 0.5) * 2.0**-23
    r = torch.sqrt(-2 * torch.log(u[..., 0::2]))
    ang = 2 * math.pi * u[..., 1::2]
    ref = torch.stack((r * torch.cos(ang), r * torch.sin(ang)), -1).reshape(z.shape)
    assert (z - ref).abs().max() < 1e-5  # float32 transcendentals vs float64


def test_uniform_strictly_inside_unit_interval():
    extremes = torch.tensor([0, 0xFFFFFFFF, 0x1FF, 0xFFFFFE00], dtype=torch.int64)
    u = philox.uint32_to_uniform(extremes)
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(torch.log(u)).all()


def test_noise_depends_only_on_index_not_batch():
    seed, stream, step = 11, philox.STREAM_EBM, 3
    full = philox.normal_noise(torch.arange(64), (1, 5, 5), seed=seed, stream=stream, step=step)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = philox.normal_noise(perm, (1, 5, 5), seed=seed, stream=stream, step=step)
    assert torch.equal(shuffled, full[perm])
    one = philox.normal_noise(torch.tensor([17]), (1, 5, 5), seed=seed, stream=stream, step=step)
    assert torch.equal(one[0], full[17])


def test_streams_steps_and_seeds_give_different_noise():
    idx = torch.arange(4)
    base = philox.normal_noise(idx, (3, 4, 4), seed=1, stream=1, step=0)
    for kw in ({"seed": 2, "stream": 1, "step": 0}, {"seed": 1, "stream": 2, "step": 0},
               {"seed": 1, "stream": 1, "step": 1}, {"seed": 1, "stream": philox.stage_stream(1, 1), "step": 0}):
        other = philox.normal_noise(idx, (3, 4, 4), **kw)
        assert not torch.allclose(base, other)


def test_noise_statistics():
    n = philox.normal_noise(torch.arange(256), (3, 32, 32), seed=0, stream=1, step=0)
    assert abs(n.mean().item()) < 0.01  # 786k samples: std of the mean ~1.1e-3
    assert abs(n.std().item() - 1.0) < 0.01
    assert abs((n.abs() > 1.96).float().mean().item() - 0.05) < 0.003


def test_out_of_range_arguments_are_refused():
    with pytest.raises(ValueError):
        philox.normal_noise(torch.tensor([-1]), (4,), seed=0, stream=1, step=0)
    with pytest.raises(ValueError):
        philox.normal_noise(torch.tensor([0]), (4,), seed=-1, stream=1, step=0)
    with pytest.raises(ValueError):
        philox.stage_stream(1, 5000)
