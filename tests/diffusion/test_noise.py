"""Tests for anomalydiff.diffusion.noise: vectorised OpenSimplex against the `opensimplex` package (spec D.1).

The reference is the pure-Python `opensimplex` PyPI package (test-only dependency), whose `_noise3` /
`_init` AnoDDPM's `simplex.py` ports. Everything is float64 where values are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalydiff.diffusion.noise import (
    SimplexConfig,
    build_permutation_tables,
    fractal_simplex_noise,
    gaussian_like,
    noise3,
    simplex_noise,
)

# Test-only reference (requirements.txt: opensimplex==0.4.5.1). Imported, not importorskip'ed: a missing
# reference must fail the run, not silently skip the equivalence tests.
import opensimplex  # noqa: E402
from opensimplex.internals import _init as opensimplex_init  # noqa: E402

# Small and negative seeds, the int64 extremes (LCG overflow paths) and opensimplex's default seed 3.
SEEDS = [0, 3, 1234567, -5, 2**63 - 1, -(2**63), 987654321987654321]


def _reference_points(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random points plus lattice-aligned ones (pixel / frequency values hit region boundaries exactly)."""
    uniform = rng.uniform(-40.0, 40.0, size=(count, 3))
    aligned = rng.integers(-64, 256, size=(count, 3)) / rng.choice([1, 2, 4, 8, 16, 32, 64], size=(count, 3))
    return np.concatenate([uniform, aligned])


@pytest.mark.parametrize("seed", SEEDS)
def test_permutation_tables_equal_opensimplex_init(seed: int) -> None:
    perm_ref, grad_index3_ref = opensimplex_init(seed)
    perm, grad_index = build_permutation_tables([seed])
    assert perm.shape == (1, 256) and perm.dtype == torch.int64
    np.testing.assert_array_equal(perm[0].numpy(), perm_ref)
    np.testing.assert_array_equal(grad_index[0].numpy() * 3, grad_index3_ref)  # opensimplex stores 3 * index
    assert sorted(perm[0].tolist()) == list(range(256))


def test_permutation_tables_vectorised_over_seeds_equal_one_by_one() -> None:
    perm, grad_index = build_permutation_tables(torch.tensor(SEEDS))
    for row, seed in enumerate(SEEDS):
        single_perm, single_grad = build_permutation_tables([seed])
        assert torch.equal(perm[row], single_perm[0]) and torch.equal(grad_index[row], single_grad[0])
    assert not torch.equal(perm[0], perm[1])


def test_noise3_equals_opensimplex_at_random_points_for_several_seeds() -> None:
    rng = np.random.default_rng(0)
    points = _reference_points(rng, 300)  # [P, 3]
    coords = torch.from_numpy(points)
    # One call for all seeds: the first axis of the coordinates indexes the seed.
    xyz = [coords[:, axis].expand(len(SEEDS), -1) for axis in range(3)]
    exact = noise3(*xyz, SEEDS, kernel_dtype=torch.float64)
    fast = noise3(*xyz, SEEDS)  # default float32 kernel
    assert exact.shape == fast.shape == (len(SEEDS), len(points))
    assert exact.dtype == fast.dtype == torch.float64
    for row, seed in enumerate(SEEDS):
        reference = opensimplex.OpenSimplex(seed)
        expected = np.array([reference.noise3(x, y, z) for x, y, z in points])
        np.testing.assert_allclose(exact[row].numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fast[row].numpy(), expected, rtol=0, atol=1e-6)
        assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero values


def test_noise3_equals_module_level_noise3_after_seed() -> None:
    rng = np.random.default_rng(1)
    points = _reference_points(rng, 100)
    opensimplex.seed(42)
    expected = np.array([opensimplex.noise3(x, y, z) for x, y, z in points])
    coords = torch.from_numpy(points).T[:, None, :]  # [3, 1, P]
    ours = noise3(coords[0], coords[1], coords[2], torch.tensor([42]), kernel_dtype=torch.float64)
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=0, atol=1e-12)


def test_reference_points_cover_all_three_regions_and_exact_ties() -> None:
    """Guards the comparison above: the three regions of _noise3 (two tetrahedra, octahedron) all occur."""
    points = torch.from_numpy(_reference_points(np.random.default_rng(0), 300))
    x, y, z = points.unbind(dim=1)
    stretch = (x + y + z) * (-1.0 / 6)  # opensimplex STRETCH_CONSTANT3
    ins = [c + stretch - torch.floor(c + stretch) for c in (x, y, z)]
    in_sum = ins[0] + ins[1] + ins[2]
    in_low, in_high = in_sum <= 1, in_sum >= 2
    middle = ~in_low & ~in_high
    assert in_low.sum() > 20 and in_high.sum() > 20 and middle.sum() > 100
    assert (in_sum == 1).any() or (in_sum == 2).any()  # exact ties on the region boundaries occur
    assert (ins[0] == ins[1]).any()  # and ties between the scores that pick the extra vertices


def test_noise3_rejects_mismatched_seed_axis() -> None:
    with pytest.raises(ValueError, match="first dimension"):
        noise3(torch.zeros(5), torch.zeros(5), torch.zeros(5), [1, 2])
    with pytest.raises(ValueError, match="64-bit"):
        noise3(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), [2**64])
    with pytest.raises(ValueError, match="kernel_dtype"):
        noise3(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), [1], kernel_dtype=torch.float16)


def _anoddpm_reference(seed: int, t: int, height: int, width: int, config: SimplexConfig) -> np.ndarray:
    """AnoDDPM's rand_3d_fixed_T_octaves with opensimplex's noise3array ([z, y, x] output), as a loop."""
    generator = opensimplex.OpenSimplex(seed)
    y, x = np.arange(height), np.arange(width)
    noise = np.zeros((1, height, width))
    frequency, amplitude = config.frequency, 1.0
    for _ in range(config.octaves):
        noise += amplitude * generator.noise3array(x / frequency, y / frequency, np.array([t]) / frequency)
        frequency /= 2
        amplitude *= config.persistence
    return noise[0]


@pytest.mark.parametrize(
    "config", [SimplexConfig(), SimplexConfig(octaves=3, persistence=0.5, frequency=16.0)], ids=["spec", "other"]
)
def test_fractal_noise_equals_anoddpm_octave_sum_on_non_square_image(config: SimplexConfig) -> None:
    seeds = torch.tensor([[11, -7], [2**62 + 5, 123456789]])
    t = torch.tensor([0, 737])
    height, width = 7, 11  # non-square: catches a row / column swap
    exact = fractal_simplex_noise(seeds, t, height, width, config, dtype=torch.float64, kernel_dtype=torch.float64)
    fast = fractal_simplex_noise(seeds, t, height, width, config)  # defaults: float32 kernel and output
    assert exact.shape == fast.shape == (2, 2, height, width) and fast.dtype == torch.float32
    for b in range(2):
        for c in range(2):
            expected = _anoddpm_reference(int(seeds[b, c]), int(t[b]), height, width, config)
            np.testing.assert_allclose(exact[b, c].numpy(), expected, rtol=0, atol=1e-12)
            np.testing.assert_allclose(fast[b, c].numpy(), expected, rtol=0, atol=3e-6)


def test_fractal_noise_has_no_normalisation_and_single_octave_is_plain_noise3() -> None:
    seeds = torch.tensor([[5]])
    t = torch.tensor([40])
    single = fractal_simplex_noise(
        seeds, t, 6, 9, config=SimplexConfig(octaves=1), dtype=torch.float64, kernel_dtype=torch.float64
    )
    rows, cols = torch.meshgrid(
        torch.arange(6.0, dtype=torch.float64), torch.arange(9.0, dtype=torch.float64), indexing="ij"
    )
    z = torch.full((1, 6, 9), 40 / 64, dtype=torch.float64)
    direct = noise3(cols[None] / 64, rows[None] / 64, z, [5], kernel_dtype=torch.float64)
    torch.testing.assert_close(single[0], direct, rtol=0, atol=1e-12)


def test_simplex_noise_shape_dtype_and_device() -> None:
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 500, 999])
    noise = simplex_noise((3, 2, 8, 16), t, generator=generator)
    assert noise.shape == (3, 2, 8, 16) and noise.dtype == torch.float32 and noise.device == t.device
    noise64 = simplex_noise((3, 2, 8, 16), t, generator=generator, dtype=torch.float64, device="cpu")
    assert noise64.dtype == torch.float64 and noise64.device.type == "cpu"
    assert torch.isfinite(noise).all() and torch.isfinite(noise64).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_simplex_noise_on_cuda_equals_cpu() -> None:
    t = torch.tensor([10, 20])
    seeds = torch.tensor([[1], [2]])
    cpu = fractal_simplex_noise(seeds, t, 16, 16, dtype=torch.float64, kernel_dtype=torch.float64)
    cuda = fractal_simplex_noise(seeds, t.cuda(), 16, 16, dtype=torch.float64, kernel_dtype=torch.float64)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-12)


def test_simplex_noise_is_deterministic_given_generator_and_draws_fresh_seeds() -> None:
    t = torch.tensor([100, 100])
    first = simplex_noise((2, 2, 16, 16), t, generator=torch.Generator().manual_seed(7))
    again = simplex_noise((2, 2, 16, 16), t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # The seeds are torch.randint draws over the non-negative int64 range from the same generator.
    seeds = torch.randint(0, 2**63 - 1, (2, 2), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, fractal_simplex_noise(seeds, t, 16, 16), rtol=0, atol=0)
    # The generator advances: a second call gives different noise.
    generator = torch.Generator().manual_seed(7)
    simplex_noise((2, 2, 16, 16), t, generator=generator)
    assert not torch.allclose(simplex_noise((2, 2, 16, 16), t, generator=generator), first)


def test_samples_and_channels_get_different_noise() -> None:
    t = torch.full((4,), 250)
    noise = simplex_noise((4, 2, 32, 32), t, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    flat = noise.reshape(8, -1)
    correlation = torch.corrcoef(flat)
    off_diagonal = correlation[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.8  # same t, different seeds: unrelated fields
    assert (flat.std(dim=1) > 0.1).all()


def test_each_sample_depends_only_on_its_own_seed_and_timestep() -> None:
    seeds = torch.tensor([[21, 22], [31, 32], [41, 42]])
    t = torch.tensor([5, 600, 999])
    batch = fractal_simplex_noise(seeds, t, 12, 12, dtype=torch.float64)
    for b in range(3):
        alone = fractal_simplex_noise(seeds[b : b + 1], t[b : b + 1], 12, 12, dtype=torch.float64)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=0, atol=1e-12)


def test_fractal_noise_is_smooth_in_space_and_time_and_has_the_measured_std() -> None:
    seeds = torch.randint(0, 2**62, (8, 1), generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1))
    noise = fractal_simplex_noise(seeds, t, 64, 64, dtype=torch.float64)

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    assert correlation(noise[..., :, 1:], noise[..., :, :-1]) > 0.9  # horizontal neighbours
    assert correlation(noise[..., 1:, :], noise[..., :-1, :]) > 0.9  # vertical neighbours
    next_step = fractal_simplex_noise(seeds, t + 1, 64, 64, dtype=torch.float64)
    assert correlation(noise, next_step) > 0.9  # the third coordinate is the timestep
    # Not normalised: pooled std about 0.49 at 64x64 (measured over many seeds, see the benchmark).
    assert 0.3 < float(noise.std()) < 0.7
    # White noise for contrast: neighbouring correlation near 0.
    white = gaussian_like(noise, generator=torch.Generator().manual_seed(0))
    assert abs(correlation(white[..., :, 1:], white[..., :, :-1])) < 0.1


def test_invalid_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"t must be a LongTensor"):
        simplex_noise((2, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t must be a LongTensor"):
        simplex_noise((2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        simplex_noise((2, 8, 8), torch.tensor([1, 2]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="octaves"):
        SimplexConfig(octaves=0)
    with pytest.raises(ValueError, match="frequency"):
        SimplexConfig(frequency=0.0)


def test_gaussian_like_matches_randn_with_the_same_generator() -> None:
    x = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    eps = gaussian_like(x, generator=torch.Generator().manual_seed(4))
    expected = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert eps.shape == x.shape and eps.dtype == x.dtype and eps.device == x.device
    assert torch.equal(eps, expected)
    assert gaussian_like(x.float()).dtype == torch.float32
