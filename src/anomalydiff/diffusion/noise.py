"""Noise sources for the diffusion forward process: Gaussian and fractal 3-D OpenSimplex (AnoDDPM "(S)").

Spec D.1 (AnoDDPM simplex variant): the noise ``n`` replacing ``eps`` in training and sampling is

    n(u, v) = sum_{o=0}^{N-1} gamma^o * S3(u / (f / 2^o), v / (f / 2^o), t / (f / 2^o))

with ``N = octaves = 6``, ``gamma = persistence = 0.8``, ``f = frequency = 64``, ``S3`` the OpenSimplex 3-D
noise with a fresh random seed per sample and channel, and the third coordinate the training timestep ``t``.
It is **not** normalised to unit variance.

``S3`` here is the algorithm of the ``opensimplex`` PyPI package (Kurt Spencer's OpenSimplex, 2014, as
ported in ``opensimplex/internals.py::_noise3``, which AnoDDPM's ``simplex.py`` also ports), written as
vectorised torch over every (point, seed) at once: the package itself is pure Python and needs numba to be
usable. The seed -> permutation table mapping (``opensimplex.internals._init``) is reproduced exactly and
vectorised over seeds, so ``noise3(x, y, z, seeds, kernel_dtype=torch.float64)[s]`` equals
``opensimplex.OpenSimplex(seeds[s]).noise3(x, y, z)`` to float64 rounding; the default float32 kernel is
about twice as fast and within ~4e-7 per octave (cells and branch decisions stay float64 either way).
Speed (2 shared CPU cores): ~0.1-0.25 s per ``[16, 1, 64, 64]`` fractal tensor, against ~9 s for the
pure-Python package (``benchmarks/simplex_speed.py``).

Pixel layout follows AnoDDPM's ``rand_3d_fixed_T_octaves`` (``noise3array`` returns ``[z, y, x]``): for an
``[H, W]`` image the first OpenSimplex coordinate is the column index ``w`` (``u``), the second the row
index ``h`` (``v``), so ``n[b, c, h, w] = sum_o gamma^o S3_{seed[b,c]}(w / f_o, h / f_o, t_b / f_o)`` with
``f_o = f / 2^o``.

Naming (architecture.md): ``t`` training timestep ``[B]`` (long), ``x0`` / ``xt`` / ``eps`` as elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "SimplexConfig",
    "build_permutation_tables",
    "fractal_simplex_noise",
    "gaussian_like",
    "noise3",
    "simplex_noise",
]

# OpenSimplex 3-D constants (opensimplex/constants.py).
_STRETCH_3 = -1.0 / 6  # (1 / sqrt(3 + 1) - 1) / 3: skews a point onto the simplectic honeycomb
_SQUISH_3 = 1.0 / 3  # (sqrt(3 + 1) - 1) / 3: un-skews a lattice point back to real space
_NORM_3 = 103.0  # scales the summed kernel contributions to roughly [-1, 1]
# 24 gradients (x, y, z) towards the vertices of a skewed rhombicuboctahedron (GRADIENTS3).
_GRADIENTS_3 = (
    (-11, 4, 4), (-4, 11, 4), (-4, 4, 11),
    (11, 4, 4), (4, 11, 4), (4, 4, 11),
    (-11, -4, 4), (-4, -11, 4), (-4, -4, 11),
    (11, -4, 4), (4, -11, 4), (4, -4, 11),
    (-11, 4, -4), (-4, 11, -4), (-4, 4, -11),
    (11, 4, -4), (4, 11, -4), (4, 4, -11),
    (-11, -4, -4), (-4, -11, -4), (-4, -4, -11),
    (11, -4, -4), (4, -11, -4), (4, -4, -11),
)  # fmt: skip
# 64-bit LCG of opensimplex's seeding (Knuth's MMIX constants).
_LCG_MULTIPLIER = 6364136223846793005
_LCG_INCREMENT = 1442695040888963407
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Vertices of the tetrahedron at (0,0,0), the one at (1,1,1) and the octahedron, in slot order.
_LOW_VERTICES = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0), (0, 0, 0))  # last two unused
_HIGH_VERTICES = ((1, 1, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (0, 0, 0), (0, 0, 0))  # last two unused
_MIDDLE_VERTICES = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1))
# Offset of an unused vertex slot on every axis: |d| > 4 there, so its weight max(2 - |d|^2, 0)^4 is 0.
_FAR_OFFSET = 3
# Points per vectorised pass: bounds memory (8 vertex slots x chunk x 8 bytes per temporary, ~1 MB).
_CHUNK_POINTS = 16384


@dataclass(frozen=True)
class SimplexConfig:
    """Fractal OpenSimplex noise of AnoDDPM (spec D.1)."""

    octaves: int = 6  # N: number of octaves summed (spec D.1; AnoDDPM generate_simplex_noise octave=6)
    persistence: float = 0.8  # gamma: amplitude ratio between octaves (spec D.1; AnoDDPM persistence=0.8)
    frequency: float = 64.0  # f: coordinates of octave o divided by f / 2^o (spec D.1; AnoDDPM frequency=64)

    def __post_init__(self) -> None:
        if self.octaves < 1:
            raise ValueError(f"SimplexConfig.octaves must be >= 1, got {self.octaves}; spec D.1 uses 6.")
        if self.frequency <= 0:
            raise ValueError(f"SimplexConfig.frequency must be > 0, got {self.frequency}; spec D.1 uses 64.")


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise with the shape, dtype and device of ``x`` (AnoDDPM "(G)", spec D.1).

    Args:
        x: Any tensor ``[...]``; only its shape, dtype and device are used.
        generator: Optional torch generator; when it lives on another device than ``x`` the noise is drawn
            on the generator's device and moved, so a CPU generator gives the same numbers everywhere.

    Returns:
        ``eps ~ N(0, I)`` of shape ``x.shape``, dtype ``x.dtype``, on ``x.device``.
    """
    draw_device = x.device if generator is None else generator.device
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=draw_device)
    return eps.to(x.device)


# ----------------------------------------------------------------------------------------------------------
# Seeds -> permutation tables (opensimplex.internals._init, vectorised over seeds)
# ----------------------------------------------------------------------------------------------------------
def _as_int64_seeds(seeds: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Seeds as a 1-D ``np.int64`` array; raises if a seed does not fit in a signed 64-bit integer."""
    if isinstance(seeds, torch.Tensor):
        if seeds.is_floating_point() or seeds.is_complex():
            raise TypeError(f"seeds must be an integer tensor, got dtype {seeds.dtype}; pass a LongTensor.")
        return seeds.detach().to("cpu", torch.int64).reshape(-1).numpy()
    values = [int(s) for s in np.asarray(seeds, dtype=object).reshape(-1)]
    bad = [s for s in values if not _INT64_MIN <= s <= _INT64_MAX]
    if bad:
        raise ValueError(f"seeds must fit in a signed 64-bit integer, got {bad[:3]}; reduce them modulo 2**64.")
    return np.asarray(values, dtype=np.int64)


def build_permutation_tables(
    seeds: torch.Tensor | np.ndarray | Sequence[int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation and gradient-index tables of OpenSimplex for many seeds at once.

    Reproduces ``opensimplex.internals._init(seed)`` exactly (64-bit LCG with two's-complement overflow,
    then a Fisher-Yates style draw of a permutation of 0..255), vectorised over seeds: the 256 draw steps
    run once for all seeds, so building tables for a training batch costs ~1 ms instead of a Python loop
    per seed.

    Args:
        seeds: ``[S]`` signed 64-bit integer seeds (tensor, array or sequence).
        device: Device of the returned tables (default CPU).

    Returns:
        ``(perm, grad_index)``, both ``LongTensor[S, 256]``: ``perm[s]`` is the permutation of seed ``s``;
        ``grad_index[s] = perm[s] % 24`` indexes the 24 gradients (opensimplex stores ``3 *`` that).
    """
    seeds_np = _as_int64_seeds(seeds)
    num_seeds = seeds_np.shape[0]
    multiplier = np.uint64(_LCG_MULTIPLIER)
    increment = np.uint64(_LCG_INCREMENT)
    # 1. Three warm-up LCG steps: seed = int64(seed * a + c); uint64 arithmetic wraps like c_int64.
    state = seeds_np.view(np.uint64).copy()
    for _ in range(3):
        state = state * multiplier + increment
    # 2. Draw perm[255], perm[254], ..., perm[0]: r = (seed + 31) mod (i + 1) in Python (floor) semantics.
    #    seed + 31 would overflow int64, so reduce each term first: ((seed mod m) + (31 mod m)) mod m.
    rows = np.arange(num_seeds)
    source = np.tile(np.arange(256, dtype=np.int64), (num_seeds, 1))
    perm = np.zeros((num_seeds, 256), dtype=np.int64)
    for i in range(255, -1, -1):
        state = state * multiplier + increment
        modulus = i + 1
        r = (np.mod(state.view(np.int64), modulus) + 31 % modulus) % modulus
        perm[:, i] = source[rows, r]
        source[rows, r] = source[:, i]
    perm_t = torch.from_numpy(perm).to(device if device is not None else "cpu")
    # 3. Gradient index of each permutation entry (opensimplex: int((perm % (72 / 3)) * 3), divided by 3).
    return perm_t, torch.remainder(perm_t, len(_GRADIENTS_3))


# ----------------------------------------------------------------------------------------------------------
# OpenSimplex 3-D noise (opensimplex.internals._noise3, vectorised)
# ----------------------------------------------------------------------------------------------------------
# All discrete decisions below are int8 arithmetic on 0/1 tensors: on CPU, torch.where / masked_fill on
# bool masks cost ~10 ns per element here, int8 multiply-adds well under 1 ns. Float values are only
# compared, never selected, so every decision is bit-for-bit the one opensimplex takes in float64.
def _pick(condition: torch.Tensor, if_true: torch.Tensor | int, if_false: torch.Tensor | int) -> torch.Tensor:
    """``condition ? if_true : if_false`` for an int8 0/1 ``condition`` and int8 tensors or small ints."""
    return condition * (if_true - if_false) + if_false


def _i8(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask as int8 0/1."""
    return mask.to(torch.int8)


def _bits(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bits 1 (x), 2 (y), 4 (z) of the int8 vertex code ``c`` as int8 0/1."""
    return c & 1, (c >> 1) & 1, (c >> 2) & 1


def _minus_one_at_first_zero_bit(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lattice offset ``(-1,1,1)``, ``(1,-1,1)`` or ``(1,1,-1)``: -1 on the first axis whose bit of ``c`` is 0."""
    bx, by, _ = _bits(c)
    return 2 * bx - 1, 1 - 2 * bx * (1 - by), 1 - 2 * bx * by


def _two_at_first_set_bit(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lattice offset ``(2,0,0)``, ``(0,2,0)`` or ``(0,0,2)``: 2 on the first axis whose bit of ``c`` is 1."""
    bx, by, _ = _bits(c)
    return 2 * bx, 2 * (1 - bx) * by, 2 * (1 - bx) * (1 - by)


def _pick3(
    condition: torch.Tensor, if_true: tuple[torch.Tensor | int, ...], if_false: tuple[torch.Tensor | int, ...]
) -> tuple[torch.Tensor, ...]:
    """:func:`_pick` over the three axes of a lattice offset."""
    return tuple(_pick(condition, a, b) for a, b in zip(if_true, if_false))


def _vertex_offsets(
    xins: torch.Tensor, yins: torch.Tensor, zins: torch.Tensor, in_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer lattice offsets of the (up to) 8 vertices that contribute at each point, as opensimplex picks them.

    Transcribes the branches of ``opensimplex.internals._noise3``. A point lies in the tetrahedron at (0,0,0)
    (``in_sum <= 1``, region "low"), the one at (1,1,1) (``in_sum >= 2``, "high") or the octahedron between
    ("middle"); its contributing vertices are those of its simplex / octahedron (4 / 6) plus two extra
    vertices chosen from the closest vertices. Offsets are relative to the super-cell origin
    ``(xsb, ysb, zsb)``. Slots:

    ======  =====================================  ====================================
    slot    low / high region                      middle region
    ======  =====================================  ====================================
    0-3     the tetrahedron's 4 vertices           (1,0,0) (0,1,0) (0,0,1) (1,1,0)
    4-5     extra vertices 0, 1                    (1,0,1) (0,1,1)
    6-7     unused: a far vertex (weight 0)        extra vertices 0, 1
    ======  =====================================  ====================================

    Args:
        xins, yins, zins: ``[N]`` float64 coordinates inside the stretched unit cube (in ``[0, 1)``).
        in_sum: ``[N]`` their sum (computed as opensimplex does, left to right).

    Returns:
        ``(ox, oy, oz)``, each ``int8 [8, N]``.
    """
    # 0. Comparisons shared by the branches (int8 0/1).
    x_gt_y, y_gt_x = _i8(xins > yins), _i8(yins > xins)
    x_gt_z, z_gt_x = _i8(xins > zins), _i8(zins > xins)
    y_gt_z, z_gt_y = _i8(yins > zins), _i8(zins > yins)
    in_low = _i8(in_sum <= 1)
    in_high = (1 - in_low) * _i8(in_sum >= 2)
    in_middle = (1 - in_low) * (1 - in_high)

    # 1. Tetrahedron at (0,0,0): a, b = the two closest of (1,0,0)=1, (0,1,0)=2, (0,0,1)=4.
    b_takes_z = (1 - y_gt_x) * z_gt_y  # xins >= yins and zins > yins: b = z, a = x
    a_takes_z = y_gt_x * z_gt_x  # xins < yins and zins > xins: a = z, b = y
    a_point = _pick(a_takes_z, 4, 1)
    b_point = _pick(b_takes_z, 4, 2)
    wins = 1 - in_sum
    wins_gt_a = _pick(a_takes_z, _i8(wins > zins), _i8(wins > xins))
    wins_gt_b = _pick(b_takes_z, _i8(wins > zins), _i8(wins > yins))
    origin_close = wins_gt_a | wins_gt_b  # (0,0,0) is one of the two closest vertices
    b_gt_a = _pick(b_takes_z, z_gt_x, _pick(a_takes_z, y_gt_z, y_gt_x))
    # 1a. (0,0,0) among the closest: extras from the other closest vertex c.
    bx, by, bz = _bits(_pick(b_gt_a, b_point, a_point))
    near0 = (2 * bx - 1, by - (1 - by) * bx, bz)  # (c&1 ? 1 : -1, c&2 ? 1 : (c&1 ? -1 : 0), c&4 ? 1 : 0)
    near1 = (bx, by - (1 - by) * (1 - bx), 2 * bz - 1)
    # 1b. Otherwise extras from both closest vertices c = a | b: (bits) and (bits ? 1 : -1).
    bx, by, bz = _bits(a_point | b_point)
    far0 = (bx, by, bz)
    far1 = (2 * bx - 1, 2 * by - 1, 2 * bz - 1)
    low0 = _pick3(origin_close, near0, far0)
    low1 = _pick3(origin_close, near1, far1)

    # 2. Tetrahedron at (1,1,1): a, b = the two closest of (1,1,0)=3, (1,0,1)=5, (0,1,1)=6.
    b_takes_z = (1 - x_gt_y) * y_gt_z  # xins <= yins and zins < yins: b = z, a = x
    a_takes_z = x_gt_y * x_gt_z  # xins > yins and zins < xins: a = z, b = y
    a_point = _pick(a_takes_z, 3, 6)
    b_point = _pick(b_takes_z, 3, 5)
    wins = 3 - in_sum
    wins_lt_a = _pick(a_takes_z, _i8(wins < zins), _i8(wins < xins))
    wins_lt_b = _pick(b_takes_z, _i8(wins < zins), _i8(wins < yins))
    corner_close = wins_lt_a | wins_lt_b  # (1,1,1) is one of the two closest vertices
    b_lt_a = _pick(b_takes_z, x_gt_z, _pick(a_takes_z, z_gt_y, x_gt_y))
    # 2a. (1,1,1) among the closest: extras from the other closest vertex c.
    bx, by, bz = _bits(_pick(b_lt_a, b_point, a_point))
    near0 = (2 * bx, by * (2 - bx), bz)  # (c&1 ? 2 : 0, c&2 ? (c&1 ? 1 : 2) : 0, c&4 ? 1 : 0)
    near1 = (bx, by * (1 + bx), 2 * bz)
    # 2b. Otherwise extras from the axis shared by both closest vertices c = a & b.
    bx, by, bz = _bits(a_point & b_point)
    far0 = (bx, by, bz)
    far1 = (2 * bx, 2 * by, 2 * bz)
    high0 = _pick3(corner_close, near0, far0)
    high1 = _pick3(corner_close, near1, far1)

    # 3. Octahedron: the closest two of its six vertices, decided by pairs of opposite vertices.
    p1 = xins + yins
    p2 = xins + zins
    p3 = yins + zins
    a_far, b_far, c_far = _i8(p1 > 1), _i8(p2 > 1), _i8(p3 > 1)
    a_score, b_score, score = (p1 - 1).abs(), (p2 - 1).abs(), (p3 - 1).abs()  # |p - 1|, exact
    replace_a = _i8((a_score <= b_score) & (a_score < score))
    replace_b = (1 - replace_a) * _i8((a_score > b_score) & (b_score < score))
    c_point = _pick(c_far, 6, 1)
    a_point = _pick(replace_a, c_point, _pick(a_far, 3, 4))
    b_point = _pick(replace_b, c_point, _pick(b_far, 5, 2))
    a_far = _pick(replace_a, c_far, a_far)
    b_far = _pick(replace_b, c_far, b_far)
    same_side = 1 - (a_far ^ b_far)
    both_far = same_side * a_far
    both_near = same_side * (1 - a_far)
    further = _pick(a_far, a_point, b_point)  # c1 when the two are on different sides
    nearer = _pick(a_far, b_point, a_point)  # c2 when the two are on different sides
    # 3a. Both on the (1,1,1) side: (1,1,1) and a (2,0,0)-permutation on the shared axis.
    # 3b. Both on the (0,0,0) side: (0,0,0) and a (-1,1,1)-permutation on the omitted axis.
    # 3c. One per side: a (-1,1,1)-permutation from the further one, a (2,0,0)-permutation from the nearer.
    mid0 = _pick3(both_far, (1, 1, 1), _pick3(both_near, (0, 0, 0), _minus_one_at_first_zero_bit(further)))
    mid1 = _pick3(
        both_near,
        _minus_one_at_first_zero_bit(a_point | b_point),
        _two_at_first_set_bit(_pick(both_far, a_point & b_point, nearer)),
    )

    # 4. Assemble the 8 slots (see the table above), one [8, N] tensor per axis.
    tetrahedron = 1 - in_middle
    offsets = []
    for axis in range(3):
        fixed = torch.tensor(
            [[vertex[axis] for vertex in region] for region in (_LOW_VERTICES, _HIGH_VERTICES, _MIDDLE_VERTICES)],
            dtype=torch.int8,
            device=xins.device,
        )  # [3 regions, 6 fixed vertices]: the low / high tetrahedra use the first 4
        first4 = fixed[0, :4, None] * in_low + fixed[1, :4, None] * in_high + fixed[2, :4, None] * in_middle
        extra0 = low0[axis] * in_low + high0[axis] * in_high
        extra1 = low1[axis] * in_low + high1[axis] * in_high
        last4 = [
            extra0 + fixed[2, 4] * in_middle,
            extra1 + fixed[2, 5] * in_middle,
            mid0[axis] * in_middle + _FAR_OFFSET * tetrahedron,
            mid1[axis] * in_middle + _FAR_OFFSET * tetrahedron,
        ]
        offsets.append(torch.cat([first4, torch.stack(last4)]))
    return offsets[0], offsets[1], offsets[2]


def _noise3_flat(
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    table_row: torch.Tensor,
    perm_flat: torch.Tensor,
    grad_flat: torch.Tensor,
    kernel_dtype: torch.dtype,
) -> torch.Tensor:
    """OpenSimplex 3-D noise at ``N`` points, each with its own permutation table.

    Args:
        x, y, z: ``[N]`` float64 coordinates.
        table_row: ``[N]`` int32, ``256 * s`` for the point's seed index ``s``.
        perm_flat: ``[S * 256]`` int32, concatenated permutation tables.
        grad_flat: ``[S * 256]`` int32, concatenated gradient indices.
        kernel_dtype: Float dtype of the per-vertex kernel (steps 4-5); the lattice and region decisions
            (steps 1-3) are always float64, as in opensimplex.

    Returns:
        ``[N]`` float64 noise values (opensimplex ``noise3``), roughly in ``[-1, 1]``.
    """
    # 1. Skew onto the simplectic honeycomb and find the super-cell origin.
    stretch_offset = (x + y + z) * _STRETCH_3
    xs = x + stretch_offset
    ys = y + stretch_offset
    zs = z + stretch_offset
    xsb_f = torch.floor(xs)
    ysb_f = torch.floor(ys)
    zsb_f = torch.floor(zs)
    squish_offset = (xsb_f + ysb_f + zsb_f) * _SQUISH_3
    # 2. Position relative to the origin, in real and in stretched space.
    dx0 = x - (xsb_f + squish_offset)
    dy0 = y - (ysb_f + squish_offset)
    dz0 = z - (zsb_f + squish_offset)
    xins = xs - xsb_f
    yins = ys - ysb_f
    zins = zs - zsb_f
    in_sum = xins + yins + zins
    # 3. The 8 contributing vertex slots of every point, [8, N] int8 offsets from the origin.
    ox, oy, oz = _vertex_offsets(xins, yins, zins, in_sum)
    # 4. Each contributes max(attn, 0)^4 * <gradient(hash(vertex)), d> with attn = 2 - |d|^2 (|d| < ~3, so
    #    float32 here costs ~4e-7 absolute per noise3 value and halves the run time).
    squish = (ox + oy + oz).to(kernel_dtype) * _SQUISH_3
    dx = dx0.to(kernel_dtype) - ox - squish
    dy = dy0.to(kernel_dtype) - oy - squish
    dz = dz0.to(kernel_dtype) - oz - squish
    attn = (2 - dx * dx - dy * dy - dz * dz).clamp_(min=0)
    # 5. Hash perm[(perm[(perm[xsv & 255] + ysv) & 255] + zsv) & 255] in the point's own table; index_select
    #    rather than advanced indexing (much cheaper on CPU when threads share busy cores).
    xsb = xsb_f.to(torch.int32)
    ysb = ysb_f.to(torch.int32)
    zsb = zsb_f.to(torch.int32)
    h = perm_flat.index_select(0, (table_row + ((xsb + ox) & 0xFF)).reshape(-1)).view(ox.shape)
    h = perm_flat.index_select(0, (table_row + ((h + ysb + oy) & 0xFF)).reshape(-1)).view(ox.shape)
    g = grad_flat.index_select(0, (table_row + ((h + zsb + oz) & 0xFF)).reshape(-1))
    gradients = torch.tensor(_GRADIENTS_3, dtype=kernel_dtype, device=x.device)
    dot = (
        gradients[:, 0].index_select(0, g).view(ox.shape) * dx
        + gradients[:, 1].index_select(0, g).view(ox.shape) * dy
        + gradients[:, 2].index_select(0, g).view(ox.shape) * dz
    )
    attn2 = attn * attn
    return (attn2 * attn2 * dot).sum(dim=0).to(torch.float64) / _NORM_3


def _noise3_chunked(
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    table_row: torch.Tensor,
    perm_flat: torch.Tensor,
    grad_flat: torch.Tensor,
    kernel_dtype: torch.dtype,
    chunk_size: int = _CHUNK_POINTS,
) -> torch.Tensor:
    """:func:`_noise3_flat` over chunks of ``chunk_size`` points (bounded memory, cache-sized temporaries)."""
    if kernel_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"kernel_dtype must be torch.float32 or torch.float64, got {kernel_dtype}.")
    # int32 indices: half the memory traffic of int64, and index_select accepts them.
    table_row = table_row.to(torch.int32)
    perm_flat = perm_flat.to(torch.int32)
    grad_flat = grad_flat.to(torch.int32)
    if x.shape[0] <= chunk_size:
        return _noise3_flat(x, y, z, table_row, perm_flat, grad_flat, kernel_dtype)
    return torch.cat(
        [
            _noise3_flat(
                x[i : i + chunk_size],
                y[i : i + chunk_size],
                z[i : i + chunk_size],
                table_row[i : i + chunk_size],
                perm_flat,
                grad_flat,
                kernel_dtype,
            )
            for i in range(0, x.shape[0], chunk_size)
        ]
    )


def noise3(
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    seeds: torch.Tensor | np.ndarray | Sequence[int],
    kernel_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """OpenSimplex 3-D noise ``S3_seed(x, y, z)`` for a batch of seeds, equal to ``opensimplex``'s ``noise3``.

    ``noise3(x, y, z, seeds, kernel_dtype=torch.float64)[s, ...] == opensimplex.OpenSimplex(seeds[s]).noise3(
    x[s, ...], y[s, ...], z[s, ...])`` up to float64 rounding.

    Args:
        x, y, z: Coordinates broadcastable to a common shape ``[S, ...]`` whose first dimension indexes the
            seed. Converted to float64; any device.
        seeds: ``[S]`` signed 64-bit integer seeds.
        kernel_dtype: Float dtype of the per-vertex kernel. ``torch.float64`` reproduces opensimplex to
            float64 rounding (~1e-16); ``torch.float32`` (default) is about twice as fast and within ~4e-7
            per octave. Lattice cells and region decisions are float64 either way.

    Returns:
        ``[S, ...]`` float64 noise on the coordinates' device, roughly in ``[-1, 1]``.
    """
    seeds_np = _as_int64_seeds(seeds)
    x, y, z = torch.broadcast_tensors(x, y, z)
    if x.dim() == 0 or x.shape[0] != seeds_np.shape[0]:
        raise ValueError(
            f"noise3: coordinates of shape {tuple(x.shape)} need a first dimension equal to the number of "
            f"seeds ({seeds_np.shape[0]}); put the seed axis first, e.g. x[None] for one seed."
        )
    device = x.device
    shape = x.shape
    perm, grad_index = build_permutation_tables(seeds_np, device=device)
    table_row = (torch.arange(shape[0], device=device) * 256).repeat_interleave(x[0].numel())
    value = _noise3_chunked(
        x.reshape(-1).to(torch.float64),
        y.reshape(-1).to(torch.float64),
        z.reshape(-1).to(torch.float64),
        table_row,
        perm.reshape(-1),
        grad_index.reshape(-1),
        kernel_dtype,
    )
    return value.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Fractal noise of spec D.1
# ----------------------------------------------------------------------------------------------------------
def _check_t(t: torch.Tensor, batch_size: int) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (batch_size,) or t.is_floating_point() or t.is_complex():
        got = f"{type(t).__name__} {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"t must be a LongTensor of training timesteps with shape [B] = [{batch_size}], got {got}; "
            "pass e.g. torch.full((B,), t, dtype=torch.long)."
        )


def fractal_simplex_noise(
    seeds: torch.Tensor,
    t: torch.Tensor,
    height: int,
    width: int,
    config: SimplexConfig = SimplexConfig(),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    kernel_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fractal 3-D OpenSimplex noise of spec D.1 for given seeds (deterministic; no random draws).

    ``n[b, c, h, w] = sum_{o<N} gamma^o S3_{seeds[b,c]}(w / f_o, h / f_o, t_b / f_o)``, ``f_o = f / 2^o``,
    exactly as AnoDDPM's ``rand_3d_fixed_T_octaves`` (coordinates divided by the halved frequency, amplitude
    multiplied by the persistence each octave, no normalisation). Coordinates and the octave sum are float64.

    Args:
        seeds: ``LongTensor[B, C]`` signed 64-bit OpenSimplex seeds, one per sample and channel.
        t: ``LongTensor[B]`` training timesteps (third noise coordinate).
        height: ``H``, number of rows.
        width: ``W``, number of columns.
        config: Octaves, persistence and frequency (spec D.1).
        device: Output device (default ``t.device``).
        dtype: Output dtype (default float32).
        kernel_dtype: Float dtype of the per-vertex kernel. ``torch.float64`` reproduces opensimplex to
            float64 rounding (~1e-16); ``torch.float32`` (default) is about twice as fast and within ~4e-7
            per octave. Lattice cells and region decisions are float64 either way.

    Returns:
        ``[B, C, H, W]`` noise in ``dtype`` on ``device``; std about 0.5 at 64x64 (not unit variance).
    """
    if seeds.dim() != 2:
        raise ValueError(f"seeds must be a LongTensor [B, C], got shape {tuple(seeds.shape)}.")
    batch_size, channels = seeds.shape
    _check_t(t, batch_size)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}.")
    device = torch.device(device) if device is not None else t.device
    num_seeds = batch_size * channels
    num_pixels = height * width
    perm, grad_index = build_permutation_tables(seeds.reshape(-1), device=device)

    # 1. Integer pixel grid: u = column (first coordinate), v = row (second), one t per sample.
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    v_grid, u_grid = torch.meshgrid(rows, cols, indexing="ij")
    t_seed = t.to(device=device, dtype=torch.float64).repeat_interleave(channels)  # [B*C]
    # 2. All octaves in one pass: coordinates divided by f / 2^o (spec D.1), points ordered [o, seed, pixel].
    frequencies = []
    amplitudes = []
    frequency, amplitude = float(config.frequency), 1.0
    for _ in range(config.octaves):
        frequencies.append(frequency)
        amplitudes.append(amplitude)
        frequency /= 2
        amplitude *= config.persistence
    freq = torch.tensor(frequencies, device=device, dtype=torch.float64).view(-1, 1, 1)
    shape = (config.octaves, num_seeds, num_pixels)
    x = (u_grid.reshape(1, 1, -1) / freq).expand(shape)
    y = (v_grid.reshape(1, 1, -1) / freq).expand(shape)
    z = (t_seed.view(1, -1, 1) / freq).expand(shape)
    table_row = (torch.arange(num_seeds, device=device) * 256).view(1, -1, 1).expand(shape)
    value = _noise3_chunked(
        x.reshape(-1),
        y.reshape(-1),
        z.reshape(-1),
        table_row.reshape(-1),
        perm.reshape(-1),
        grad_index.reshape(-1),
        kernel_dtype,
    ).view(shape)
    # 3. Weighted sum over octaves, gamma^o (not normalised).
    amp = torch.tensor(amplitudes, device=device, dtype=torch.float64).view(-1, 1, 1)
    noise = (value * amp).sum(dim=0)
    return noise.view(batch_size, channels, height, width).to(dtype)


def simplex_noise(
    shape: tuple[int, int, int, int],
    t: torch.Tensor,
    config: SimplexConfig = SimplexConfig(),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    kernel_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """AnoDDPM "(S)" noise: fractal 3-D OpenSimplex with a fresh random seed per sample and channel (D.1).

    The ``B * C`` seeds are drawn from ``generator`` (``torch.randint`` over the non-negative int64 range),
    so the same generator state gives the same noise, and samples / channels get different noise.

    Args:
        shape: ``(B, C, H, W)``.
        t: ``LongTensor[B]`` training timesteps; the third OpenSimplex coordinate.
        config: Octaves, persistence and frequency (spec D.1).
        generator: Torch generator the seeds are drawn from (default: torch's global RNG).
        device: Output device (default ``t.device``).
        dtype: Output dtype (default float32).
        kernel_dtype: Float dtype of the per-vertex kernel. ``torch.float64`` reproduces opensimplex to
            float64 rounding (~1e-16); ``torch.float32`` (default) is about twice as fast and within ~4e-7
            per octave. Lattice cells and region decisions are float64 either way.

    Returns:
        ``[B, C, H, W]`` noise in ``dtype`` on ``device`` (std about 0.5 at 64x64: not unit variance).
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}; add a channel axis for 2-D images.")
    batch_size, channels, height, width = (int(s) for s in shape)
    _check_t(t, batch_size)
    # 1. Fresh seeds per sample and channel, drawn on the generator's device (CPU for the default RNG).
    draw_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(
        0, _INT64_MAX, (batch_size, channels), generator=generator, device=draw_device, dtype=torch.int64
    )
    # 2. Fractal OpenSimplex (spec D.1).
    return fractal_simplex_noise(
        seeds, t, height, width, config=config, device=device, dtype=dtype, kernel_dtype=kernel_dtype
    )
