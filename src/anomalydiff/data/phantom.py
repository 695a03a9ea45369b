"""The built-in brain phantom: synthetic lesions on real MNI152 anatomy (spec data.md, "The built-in brain phantom").

No package ships real lesions with masks, so the embedded default dataset is made here, at run time, from the
MNI152 2009a template and its grey/white-matter maps that ship inside the installed nilearn (never copied into
this repository). Per subject:

1. Anatomy: GM, WM and brain-mask maps; CSF = brain mask - GM - WM (clipped); the template T1 supplies fine detail.
2. Geometry: one random smooth deformation (affine + elastic) plus the mass effect of tumours, composed into one
   sampling field that is computed on a coarse grid and upsampled trilinearly (it is smooth), then used once
   per map (``scipy.ndimage.map_coordinates``, order 1) inside the bounding box of the deformed brain only.
3. Lesions, drawn in output space: BraTS-like tumours (necrotic / non-enhancing core = 1, edema = 2,
   enhancing rim = 4; irregular shapes from thresholded smooth noise, edema spreading along white matter) or
   ATLAS-like chronic strokes (cortical-subcortical infarcts in vascular territories, lacunes).
4. Contrasts (T1, T1ce, T2, FLAIR or T1w alone): per-tissue and per-lesion intensities with per-subject jitter,
   partial-volume texture, gamma, bias field, Rician noise, sometimes thick-slice blur; 0 outside the brain.
5. Files: 3-D NIfTI in the real BraTS 2021 and ATLAS v2.0 layouts (see :func:`subject_files`), written atomically.

Subject ``k`` depends only on ``(seed, k)`` (and the config and layout): ``np.random.default_rng([seed, k])``.

Intensity units are arbitrary positive scanner-like units (up to ~1000), like the real data. Coordinates:
"output" = the written grid (BraTS box or MNI grid), "template" = nilearn's MNI152 voxel grid.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

Layout = Literal["brats", "atlas"]
LAYOUTS: tuple[str, ...] = ("brats", "atlas")
BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
ATLAS_MODALITIES: tuple[str, ...] = ("t1w",)
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
# BraTS 2021 geometry: 240 x 240 x 155 at 1 mm, LPS-ordered array (the affine the challenge files carry).
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
BRATS_AFFINE: np.ndarray = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
ATLAS_SPACE = "MNI152NLin2009aSym"
ATLAS_SUBJECTS_PER_SITE = 25
_COARSE_MM = 4.0  # spacing of the coarse grid on which the (smooth) sampling field is computed


@dataclass(frozen=True)
class PhantomConfig:
    """How phantom subjects vary. Defaults give BraTS/ATLAS-like difficulty; all lengths in mm.

    Tissue and lesion intensities are relative to white matter (= 1.0) of the same contrast, before jitter.
    Tuples of tissue intensities are ``(csf, gm, wm)``; tuples of tumour intensities are
    ``(necrosis, non_enhancing, enhancing, edema)``.
    """

    voxel_size: float = 1.0  # mm; the real data are 1 mm. Larger values (2, 3) are for fast tests only.
    lesion_free_fraction: float = 0.2  # share of subjects without any lesion (data.md: "some subjects have none")
    # --- geometry: subjects differ the way scans do (data.md "Subjects")
    rotation_deg: float = 7.0  # max |rotation| about the vertical axis; half of it about the other two
    scale_jitter: float = 0.06  # isotropic head-size variation (+-), plus half of it per axis
    translation_mm: float = 6.0  # max |shift| of the head in the field of view
    elastic_mm: float = 2.5  # std of the elastic displacement (anatomical variability beyond affine)
    elastic_smooth_mm: float = 20.0  # correlation length of the elastic displacement
    atlas_deformation_scale: float = 0.4  # ATLAS volumes are registered to MNI: smaller residual misalignment
    brats_brain_scale: float = 0.93  # MNI152 brains are larger than single brains; fits the 155-slice BraTS box
    ventricle_jitter: float = 0.25  # +- relative change of ventricle volume (atrophy / young brains)
    sulcal_widening: tuple[float, float] = (0.0, 0.35)  # range of extra CSF in sulci (atrophy)
    # --- image formation
    contrast_jitter: float = 0.07  # relative std of each tissue intensity per subject and contrast
    gamma_range: tuple[float, float] = (0.85, 1.18)  # scanner / windowing non-linearity
    bias_strength: float = 0.18  # std of the log bias field (RF inhomogeneity, ~+-35 % at 2 std)
    bias_smooth_mm: float = 45.0  # correlation length of the bias field
    noise_std: tuple[float, float] = (0.015, 0.045)  # Rician noise sigma range, relative to WM intensity
    texture_std: float = 0.05  # partial-volume texture: std of GM/WM/CSF fraction exchange at boundaries
    thick_slice_probability: float = 0.25  # chance per contrast of a thick-slice (blurred) acquisition axis
    intensity_range: tuple[float, float] = (450.0, 1100.0)  # brightest tissue level in stored units
    # --- normal tissue intensities (csf, gm, wm) per contrast: T1 WM > GM > CSF, T2 CSF > GM > WM, FLAIR
    t1_tissue: tuple[float, float, float] = (0.28, 0.66, 1.0)
    t1ce_tissue: tuple[float, float, float] = (0.27, 0.68, 1.0)
    t2_tissue: tuple[float, float, float] = (2.7, 1.45, 1.0)
    flair_tissue: tuple[float, float, float] = (0.3, 1.28, 1.0)  # CSF dark, GM slightly > WM
    # --- tumours (BraTS layout); intensities (necrosis, non_enhancing, enhancing, edema)
    tumour_radius_mm: tuple[float, float] = (5.0, 30.0)  # core radius range, log-uniform (small to large)
    edema_factor: tuple[float, float] = (1.15, 2.4)  # edema radius / core radius
    max_tumours: int = 2  # multifocal disease: up to this many tumours per subject
    mass_effect: tuple[float, float] = (0.45, 0.85)  # displaced volume radius / core radius
    non_enhancing_probability: float = 0.2  # low-grade-like tumours without enhancement or necrosis
    white_matter_preference: float = 0.8  # chance a tumour centre is drawn from white matter
    t1_tumour: tuple[float, float, float, float] = (0.38, 0.62, 0.76, 0.84)  # core dark on T1
    t1ce_tumour: tuple[float, float, float, float] = (0.36, 0.64, 1.55, 0.84)  # rim bright on T1ce
    t2_tumour: tuple[float, float, float, float] = (2.5, 2.0, 1.7, 2.2)  # edema bright on T2
    flair_tumour: tuple[float, float, float, float] = (0.9, 1.6, 1.5, 1.65)  # edema bright on FLAIR
    lesion_contrast_range: tuple[float, float] = (0.55, 1.25)  # per-lesion scaling of (intensity - 1)
    # --- strokes (ATLAS layout)
    stroke_radius_mm: tuple[float, float] = (4.0, 32.0)  # territorial infarct radius range, log-uniform
    max_strokes: int = 3  # multiple infarcts are common in ATLAS
    lacune_probability: float = 0.35  # share of strokes that are small deep (lacunar) infarcts
    t1_stroke: tuple[float, float] = (0.3, 0.55)  # (cavity like CSF, gliotic rim) on T1w
    white_matter_hyperintensity_probability: float = 0.3  # normal-ageing FLAIR/T2 caps that are NOT labelled

    def __post_init__(self) -> None:
        if not self.voxel_size > 0:
            raise ValueError(f"PhantomConfig.voxel_size must be > 0 mm, got {self.voxel_size}")
        if not 0.0 <= self.lesion_free_fraction <= 1.0:
            raise ValueError(
                f"PhantomConfig.lesion_free_fraction must be in [0, 1], got {self.lesion_free_fraction}"
            )


@dataclass(frozen=True)
class Anatomy:
    """MNI152 2009a maps from nilearn at 1 mm on the (197, 233, 189) grid, float32 in [0, 1].

    Attributes:
        t1: Template T1 [197, 233, 189]. gm, wm, mask: tissue probability / brain-mask maps, same shape.
        affine: Template voxel -> world (mm, RAS) [4, 4].
        brain_centre: Centre of the brain mask's bounding box, world mm [3].
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    brain_centre: np.ndarray


@dataclass
class PhantomSubject:
    """One subject in memory.

    Attributes:
        subject_id: ``BraTS2021_00007`` or ``sub-r001s008``.
        volumes: modality -> array [X, Y, Z] in stored dtype (int16 BraTS, float32 ATLAS), 0 outside the brain.
        seg: labels [X, Y, Z] uint8: BraTS {0, 1, 2, 4}; ATLAS {0, 1}.
        affine: voxel -> world [4, 4].
        lesions: one dict per lesion (kind, centre in world mm, radius in mm), for tests and docs.
        tissue: ``csf``, ``gm``, ``wm`` -> partial-volume fractions [X, Y, Z] float32 of the deformed normal
            anatomy (before lesions replace it); not written to disk, for tests and analysis.
    """

    subject_id: str
    volumes: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    lesions: list[dict[str, object]] = field(default_factory=list)
    tissue: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_lesion(self) -> bool:
        """Whether the segmentation marks any voxel."""
        return bool(self.seg.any())


# ----------------------------------------------------------------------------------------------- anatomy


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Load the MNI152 template, GM, WM and brain mask from the installed nilearn (resolution=1).

    Returns:
        The :class:`Anatomy` (cached: loaded once per process).
    """
    from nilearn import datasets

    imgs = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    arrays = {k: np.asarray(v.get_fdata(dtype=np.float32), dtype=np.float32) for k, v in imgs.items()}
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise RuntimeError(f"nilearn's MNI152 maps differ in shape {shapes}: reinstall nilearn (requirements.txt)")
    mask = (arrays["mask"] > 0.5).astype(np.float32)
    gm = np.clip(arrays["gm"], 0, 1) * mask
    wm = np.clip(arrays["wm"], 0, 1) * mask
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    t1 = arrays["t1"] / max(float(arrays["t1"].max()), 1e-6)
    affine = np.asarray(imgs["mask"].affine, float)
    inside = np.argwhere(mask > 0)
    centre = affine[:3, :3] @ ((inside.min(0) + inside.max(0)) / 2.0) + affine[:3, 3]
    return Anatomy(t1=t1 * mask, gm=gm, wm=wm, mask=mask, affine=affine, brain_centre=centre)


def output_geometry(layout: Layout, voxel_size: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the written grid.

    At 1 mm these are exactly the real datasets' (BraTS 2021: (240, 240, 155) with the challenge affine;
    ATLAS v2.0: the MNI152 grid (197, 233, 189) with the template's affine). Other voxel sizes cover the same
    field of view with bigger voxels (for fast tests only).

    Args:
        layout: ``"brats"`` or ``"atlas"``.
        voxel_size: Voxel edge in mm.

    Returns:
        (shape, affine [4, 4]).
    """
    _check_layout(layout)
    if layout == "brats":
        base_shape, base_affine = BRATS_SHAPE, BRATS_AFFINE
    else:
        base_shape, base_affine = (197, 233, 189), load_anatomy().affine
    if voxel_size == 1.0:
        return tuple(base_shape), base_affine.copy()  # type: ignore[return-value]
    shape = tuple(max(2, int(round(n / voxel_size))) for n in base_shape)
    affine = base_affine.copy()
    affine[:3, :3] = base_affine[:3, :3] * voxel_size
    # the centre of the first big voxel sits at the centre of the first voxel block it replaces
    affine[:3, 3] = base_affine[:3, :3] @ np.full(3, (voxel_size - 1.0) / 2.0) + base_affine[:3, 3]
    return shape, affine  # type: ignore[return-value]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown phantom layout {layout!r}: use one of {LAYOUTS}")


# ------------------------------------------------------------------------------------------ file layout


def subject_id(layout: Layout, index: int) -> str:
    """The real dataset's ID of subject ``index`` (0-based): ``BraTS2021_00000`` or ``sub-r001s001``."""
    _check_layout(layout)
    if layout == "brats":
        return f"BraTS2021_{index:05d}"
    site, number = divmod(index, ATLAS_SUBJECTS_PER_SITE)
    return f"sub-r{site + 1:03d}s{number + 1:03d}"


def subject_files(out: Path | str, layout: Layout, index: int) -> dict[str, Path]:
    """Paths of subject ``index``'s files, named exactly as in the real datasets.

    BraTS 2021: ``<out>/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``.
    ATLAS v2.0: ``<out>/Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz``
    and ``..._space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz`` (sites of 25 subjects: R001, R002, ...).

    Returns:
        modality (``flair``, ``t1``, ``t1ce``, ``t2`` or ``t1w``) and ``seg`` -> path.
    """
    out = Path(out)
    sid = subject_id(layout, index)
    if layout == "brats":
        folder = out / sid
        return {name: folder / f"{sid}_{name}.nii.gz" for name in (*BRATS_MODALITIES, "seg")}
    site = index // ATLAS_SUBJECTS_PER_SITE + 1
    folder = out / "Training" / f"R{site:03d}" / sid / "ses-1" / "anat"
    stem = f"{sid}_ses-1_space-{ATLAS_SPACE}"
    return {"t1w": folder / f"{stem}_T1w.nii.gz", "seg": folder / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"}


# ---------------------------------------------------------------------------------------- random fields


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-std smooth Gaussian noise [*shape] (white noise blurred by ``sigma`` voxels), float32."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndi.gaussian_filter(white, sigma, mode="reflect") if sigma > 0 else white
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


def _upsample(fields: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of [C, *coarse] to [C, *size]; coarse corners sit on the output corners."""
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(fields, dtype=np.float32))[None]
        if tuple(tensor.shape[2:]) == tuple(size):
            return tensor[0].numpy()
        return torch.nn.functional.interpolate(tensor, size=size, mode="trilinear", align_corners=True)[0].numpy()


def _coarse_axes(lo: np.ndarray, hi: np.ndarray, voxel_size: float, spacing_mm: float) -> list[np.ndarray]:
    """Per axis, positions (in output voxel units) of a grid spanning [lo, hi] with ~spacing_mm steps.

    The grid is never finer than two output voxels (coarse test grids stay cheap).
    """
    spacing_mm = max(spacing_mm, 2.0 * voxel_size)
    axes = []
    for a, b in zip(lo, hi):
        n = max(2, int(math.ceil((b - a) * voxel_size / spacing_mm)) + 1)
        axes.append(np.linspace(a, b, n, dtype=np.float64))
    return axes


def _smooth_field_on(rng: np.random.Generator, count: int, box_mm: np.ndarray, spacing_mm: float,
                     sigma_mm: float, size: tuple[int, int, int]) -> np.ndarray:
    """``count`` unit-std smooth noise fields [count, *size] of correlation ``sigma_mm`` over a box.

    The noise lattice has ``spacing_mm`` steps, or the output's own if coarser.
    """
    voxel_mm = float(np.max(np.asarray(box_mm) / np.maximum(np.array(size) - 1, 1)))
    spacing_mm = max(spacing_mm, voxel_mm)
    coarse = tuple(max(2, int(math.ceil(e / spacing_mm)) + 1) for e in box_mm)
    fields = np.stack([_smooth_noise(rng, coarse, sigma_mm / spacing_mm) for _ in range(count)])
    return _upsample(fields, size)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] from angles (rad) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _soft_inside(distance: np.ndarray, width: float) -> np.ndarray:
    """Membership 1 inside (distance < 1 - width), 0 outside (distance > 1 + width), smooth between."""
    return _smoothstep((1.0 + width - distance) / (2.0 * width)).astype(np.float32)


# ---------------------------------------------------------------------------------------- deformation


@dataclass
class _Warp:
    """Output world (mm) -> template voxel mapping: affine ``world_to_template`` after displacements."""

    world_to_template: np.ndarray  # [4, 4] output world -> template voxel (random affine + layout placement)
    elastic: np.ndarray  # [3, *lattice] displacement (mm) on a lattice in output voxel space
    elastic_step: float  # output voxels per lattice step
    masses: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (centre world mm, radius k mm)
    ventricle: tuple[np.ndarray, float] | None = None  # (centre world mm, signed strength k mm)

    def template_coords(self, vox: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
        """Template voxel coordinates [3, N] of output voxel coordinates ``vox`` [3, N]."""
        world = out_affine[:3, :3] @ vox + out_affine[:3, 3:4]
        # 1. elastic displacement (smooth lattice, linear interpolation)
        lattice = vox / self.elastic_step
        disp = np.stack([ndi.map_coordinates(c, lattice, order=1, mode="nearest") for c in self.elastic])
        # 2. mass effect: tissue at radius r came from r_src = cbrt(r^3 - k^3) (an expanding sphere of radius k)
        for centre, k in self.masses:
            world = _radial_source(world, centre, k)
        # 3. ventricular enlargement / shrinkage (same law about the ventricles' centre, signed)
        if self.ventricle is not None:
            world = _radial_source(world, self.ventricle[0], self.ventricle[1], decay_mm=45.0)
        world = world + disp
        return self.world_to_template[:3, :3] @ world + self.world_to_template[:3, 3:4]


def _radial_source(world: np.ndarray, centre: np.ndarray, k: float, decay_mm: float | None = None) -> np.ndarray:
    """Source positions [3, N] of an incompressible radial expansion (k > 0) or shrinkage (k < 0) about centre."""
    rel = world - centre[:, None]
    r = np.sqrt((rel**2).sum(0)) + 1e-6
    r_src = np.cbrt(np.maximum(r**3 - np.sign(k) * abs(k) ** 3, 0.0))
    if decay_mm is not None:  # keep the effect local (ventricles, not the whole brain)
        weight = np.exp(-((r / decay_mm) ** 2))
        r_src = r + (r_src - r) * weight
    return centre[:, None] + rel * (r_src / r)


def _make_warp(config: PhantomConfig, layout: Layout, rng: np.random.Generator, shape: tuple[int, int, int],
               out_affine: np.ndarray, anatomy: Anatomy) -> _Warp:
    """Draw one subject's deformation: layout placement, random affine, elastic field, ventricle size."""
    strength = config.atlas_deformation_scale if layout == "atlas" else 1.0
    # 1. layout placement (output world -> template world): the brain centre goes to the pivot
    brain_centre = anatomy.brain_centre.copy()
    if layout == "brats":
        place_scale = config.brats_brain_scale
        # centre of the BraTS box, 3 mm up: MNI brains are cut low in the brain stem, BraTS brains less so
        pivot_out = out_affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + out_affine[:3, 3] + np.array([0, 0, 3.0])
    else:  # ATLAS volumes live on the template grid itself
        place_scale = 1.0
        pivot_out = brain_centre
    # 2. random affine about the brain centre (in output world): rotation, scale, shift
    rot = _rotation(rng.uniform(-1, 1, 3) * np.radians(config.rotation_deg) * np.array([0.5, 0.5, 1.0]) * strength)
    iso = 1.0 + rng.uniform(-1, 1) * config.scale_jitter * strength
    aniso = 1.0 + rng.uniform(-1, 1, 3) * config.scale_jitter * 0.5 * strength
    scale = place_scale * iso * aniso  # output size / template size
    shift = rng.uniform(-1, 1, 3) * config.translation_mm * strength
    # template_world = brain_centre + R^T (x - pivot - shift) / scale
    lin = rot.T / scale[:, None]
    world_to_tworld = np.eye(4)
    world_to_tworld[:3, :3] = lin
    world_to_tworld[:3, 3] = brain_centre - lin @ (pivot_out + shift)
    world_to_template = np.linalg.inv(anatomy.affine) @ world_to_tworld
    # 3. elastic displacement lattice (8 mm steps) in output voxel space
    step_mm = 8.0
    lattice_shape = tuple(int(math.ceil(n * config.voxel_size / step_mm)) + 2 for n in shape)
    elastic = np.stack(
        [_smooth_noise(rng, lattice_shape, config.elastic_smooth_mm / step_mm) for _ in range(3)]
    ) * (config.elastic_mm * strength)
    warp = _Warp(world_to_template, elastic.astype(np.float32), step_mm / config.voxel_size)
    # 4. ventricle size: centre of the lateral ventricles (MNI ~ (0, -12, 14) mm) mapped to output world
    v_template = np.array([0.0, -12.0, 14.0])
    v_out = pivot_out + shift + rot @ ((v_template - brain_centre) * scale)
    k = 14.0 * np.cbrt(abs(rng.uniform(-1, 1) * config.ventricle_jitter) + 1e-9)
    warp.ventricle = (v_out, float(k * np.sign(rng.uniform(-1, 1))))
    return warp


# ---------------------------------------------------------------------------------------- lesions


@dataclass
class _Lesion:
    kind: str  # "tumour", "stroke" or "lacune"
    centre: np.ndarray  # output world mm
    radius: float  # core (tumour) or lesion (stroke) radius, mm
    params: dict[str, float] = field(default_factory=dict)
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))  # ellipsoid frame, rows scaled by 1/semi-axis
    direction: np.ndarray | None = None  # outward unit vector (territorial strokes: wedge towards the cortex)


def _pick_centres(rng: np.random.Generator, candidates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    p = weights / weights.sum()
    return candidates[rng.choice(len(candidates), p=p)]


def _random_ellipsoid(rng: np.random.Generator, radius: float, spread: float = 0.3) -> np.ndarray:
    """[3, 3] map: (x - c) -> ellipsoid-normalised coordinates (norm 1 on the surface of mean radius)."""
    semi = radius * np.exp(rng.uniform(-spread, spread, 3))
    semi *= radius / np.cbrt(np.prod(semi))
    rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
    return (rot / semi[:, None]).astype(np.float64)


def _plan_lesions(config: PhantomConfig, layout: Layout, rng: np.random.Generator, coarse_world: np.ndarray,
                  coarse_tissue: dict[str, np.ndarray], coarse_template_world: np.ndarray) -> list[_Lesion]:
    """Draw lesion kinds, sizes and centres from the coarse (4 mm) deformed anatomy.

    Args:
        coarse_world: [3, N] output world mm of coarse grid points.
        coarse_tissue: ``gm``, ``wm``, ``mask``, ``depth`` (mm inside the brain) at those points, each [N].
        coarse_template_world: [3, N] MNI world mm of those points (for vascular territories).
    """
    if rng.uniform() < config.lesion_free_fraction:
        return []
    depth, wm, gm = coarse_tissue["depth"], coarse_tissue["wm"], coarse_tissue["gm"]
    lesions: list[_Lesion] = []
    if layout == "brats":
        # multifocal disease in ~15 % of tumour subjects: 2..max_tumours foci
        count = int(rng.integers(2, max(config.max_tumours, 2) + 1)) if rng.uniform() < 0.15 else 1
        count = min(count, max(config.max_tumours, 1))
        for index in range(count):
            lo, hi = np.log(config.tumour_radius_mm[0]), np.log(config.tumour_radius_mm[1])
            radius = float(np.exp(rng.uniform(lo, hi)))
            if index > 0:
                radius = min(radius, 12.0)  # satellites are small
            edema = float(rng.uniform(*config.edema_factor))
            inner = depth > max(4.0, 0.7 * radius)
            if rng.uniform() < config.white_matter_preference:
                weights = inner * np.clip(wm - 0.5, 0, None)
            else:
                weights = inner * np.clip(gm + wm - 0.6, 0, None)
            if not weights.any():
                weights = depth.clip(0, None) + 1e-6
            centre = _pick_centres(rng, coarse_world.T, weights) + rng.uniform(-2, 2, 3)
            non_enh = rng.uniform() < config.non_enhancing_probability or radius < 7.0 and rng.uniform() < 0.5
            params = {
                "edema": edema,
                # necrotic core radius / tumour radius: an enhancing wall ~2.5-10 mm thick
                "necrosis": 0.0 if non_enh else float(np.clip(rng.uniform(0.35, 0.8), max(1.0 - 10.0 / radius, 0.15),
                                                              max(1.0 - 2.5 / radius, 0.15))),
                "enhancing": 0.0 if non_enh else 1.0,
                "rim_patchiness": float(rng.uniform(0.0, 0.5)),
                "mass": float(rng.uniform(*config.mass_effect)),
                "contrast": float(rng.uniform(*config.lesion_contrast_range)),
                "roughness": float(rng.uniform(0.12, 0.3)),
                "heterogeneity": float(rng.uniform(0.08, 0.2)),
            }
            lesions.append(_Lesion("tumour", centre, radius, params, _random_ellipsoid(rng, 1.0, 0.25)))
        return lesions
    count = 1 + int(rng.integers(0, config.max_strokes))
    tx, ty, tz = coarse_template_world
    brain_centre = (coarse_world * coarse_tissue["mask"]).sum(1) / max(float(coarse_tissue["mask"].sum()), 1e-6)
    for _ in range(count):
        contrast = float(rng.uniform(*config.lesion_contrast_range))
        if rng.uniform() < config.lacune_probability:
            # lacune: basal ganglia / thalamus / internal capsule / corona radiata
            region = (np.abs(tx) > 8) & (np.abs(tx) < 32) & (ty > -35) & (ty < 25) & (tz > -8) & (tz < 30)
            weights = region * (depth > 6) * (gm + wm)
            radius = float(rng.uniform(2.5, 7.0))
            kind = "lacune"
        else:
            territory = rng.choice(["mca", "mca", "mca", "aca", "pca"])
            if territory == "mca":
                region = (np.abs(tx) > 28) & (ty > -75) & (ty < 35) & (tz > -15) & (tz < 60)
            elif territory == "aca":
                region = (np.abs(tx) < 22) & (ty > -45) & (tz > 15)
            else:
                region = (ty < -55) & (tz > -20) & (tz < 35)
            weights = region * np.clip(gm - 0.2, 0, None) * (depth > 1.0) * (depth < 14.0)
            lo, hi = np.log(config.stroke_radius_mm[0]), np.log(config.stroke_radius_mm[1])
            radius = float(np.exp(rng.uniform(lo, hi)))
            kind = "stroke"
        if not weights.any():
            weights = (depth > 2).astype(float) + 1e-6
        centre = _pick_centres(rng, coarse_world.T, weights) + rng.uniform(-1.5, 1.5, 3)
        params = {
            "contrast": contrast,
            "roughness": float(rng.uniform(0.15, 0.35)),
            "gliosis": float(rng.uniform(0.15, 0.45)),
            "heterogeneity": float(rng.uniform(0.05, 0.15)),
            "hemisphere": float(np.sign(coarse_template_world[0][np.argmin(((coarse_world.T - centre) ** 2).sum(1))])),
        }
        outward = centre - brain_centre
        outward /= max(float(np.linalg.norm(outward)), 1e-6)
        lesions.append(_Lesion(kind, centre, radius, params, _random_ellipsoid(rng, 1.0, 0.4),
                               outward if kind == "stroke" else None))
    return lesions


# ------------------------------------------------------------------------------------------- subject


def generate_subject(config: PhantomConfig, layout: Layout, seed: int, index: int,
                     anatomy: Anatomy | None = None) -> PhantomSubject:
    """Generate one phantom subject in memory.

    Args:
        config: Phantom settings.
        layout: ``"brats"`` (FLAIR, T1, T1ce, T2 + labels {0,1,2,4} on the BraTS grid) or ``"atlas"``
            (T1w + binary stroke mask on the MNI grid).
        seed: Dataset seed.
        index: 0-based subject index; the subject depends only on (seed, index) for a given config/layout.
        anatomy: Preloaded :func:`load_anatomy` (loaded and cached if None).

    Returns:
        The :class:`PhantomSubject` (volumes [X, Y, Z] in stored dtype, seg uint8 [X, Y, Z], affine [4, 4]).
    """
    _check_layout(layout)
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    anatomy = anatomy or load_anatomy()
    rng = np.random.default_rng([int(seed), int(index)])
    v = float(config.voxel_size)
    shape, out_affine = output_geometry(layout, v)
    warp = _make_warp(config, layout, rng, shape, out_affine, anatomy)

    # 1. coarse pass over the whole grid: where is the deformed brain, and where can lesions go
    axes = _coarse_axes(np.zeros(3), np.array(shape, float) - 1, v, _COARSE_MM)
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    tcoords = warp.template_coords(grid, out_affine)
    sample = functools.partial(ndi.map_coordinates, coordinates=tcoords, order=1, mode="constant", cval=0.0,
                               prefilter=False)
    coarse_shape = tuple(len(a) for a in axes)
    c_mask = sample(anatomy.mask).reshape(coarse_shape)
    spacing = np.array([(a[1] - a[0]) * v for a in axes])
    depth = ndi.distance_transform_edt(c_mask > 0.5, sampling=spacing).ravel()
    coarse_tissue = {"gm": sample(anatomy.gm), "wm": sample(anatomy.wm), "mask": c_mask.ravel(), "depth": depth}
    coarse_world = out_affine[:3, :3] @ grid + out_affine[:3, 3:4]
    coarse_tworld = anatomy.affine[:3, :3] @ tcoords + anatomy.affine[:3, 3:4]
    lesions = _plan_lesions(config, layout, rng, coarse_world, coarse_tissue, coarse_tworld)
    for lesion in lesions:
        if lesion.kind == "tumour":
            warp.masses.append((lesion.centre, lesion.params["mass"] * lesion.radius))

    # 2. bounding box of the brain (plus a margin) at full resolution
    inside = np.argwhere(c_mask > 0.02)
    if len(inside) == 0:
        raise RuntimeError("the deformed brain left the field of view: lower PhantomConfig.translation_mm")
    lo = np.array([axes[d][max(inside[:, d].min() - 1, 0)] for d in range(3)])
    hi = np.array([axes[d][min(inside[:, d].max() + 1, len(axes[d]) - 1)] for d in range(3)])
    lo, hi = np.floor(lo).astype(int), np.ceil(hi).astype(int)
    box = tuple(int(n) for n in hi - lo + 1)
    box_mm = (hi - lo) * v

    # 3. sampling field on a coarse grid over the box, upsampled (the field is smooth), then the maps
    baxes = _coarse_axes(lo.astype(float), hi.astype(float), v, _COARSE_MM)
    bgrid = np.stack(np.meshgrid(*baxes, indexing="ij")).reshape(3, -1)
    bcoords = warp.template_coords(bgrid, out_affine).reshape(3, *[len(a) for a in baxes])
    maps = _sample_maps(anatomy, bcoords, box)
    brain = maps["mask"] > 0.5
    gm = np.where(brain, maps["gm"], 0.0).astype(np.float32)
    wm = np.where(brain, maps["wm"], 0.0).astype(np.float32)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain

    # 4. partial-volume texture and sulcal widening: exchange tissue fractions at boundaries with smooth noise
    tex = _smooth_field_on(rng, 4, box_mm, 2.0, 1.6, box)
    widen = rng.uniform(*config.sulcal_widening)
    to_csf = np.clip(gm * csf * 4.0 * (widen + config.texture_std * 2.0 * tex[0]), -0.5, 0.5) * gm
    gm = gm - to_csf
    csf = csf + to_csf
    to_wm = np.clip(gm * wm * 4.0 * config.texture_std * 2.0 * tex[1], -0.3, 0.3)
    to_wm = np.where(to_wm > 0, to_wm * gm, to_wm * wm)
    gm, wm = gm - to_wm, wm + to_wm
    tissue_texture = 1.0 + config.texture_std * 0.5 * tex[2] + config.texture_std * 0.25 * tex[3]
    detail = maps["t1"] - (0.25 * csf + 0.62 * gm + 0.86 * wm)  # template detail the tissue maps lack
    detail = np.where(brain, detail, 0.0).astype(np.float32)
    del tex

    # 5. lesion memberships (soft) and labels, in output space
    layers = {name: np.zeros(box, np.float32) for name in ("necrosis", "non_enhancing", "enhancing", "edema",
                                                          "cavity", "gliosis")}
    layers["texture"] = np.ones(box, np.float32)  # multiplicative heterogeneity inside lesions
    seg_box = np.zeros(box, np.uint8)
    for lesion in lesions:
        _draw_lesion(rng, lesion, layers, seg_box, brain, gm, wm, out_affine, lo, box, v, warp, anatomy)
    if layout == "brats" and rng.uniform() < config.white_matter_hyperintensity_probability:
        caps = _periventricular_caps(rng, csf, wm, box_mm, box)
    else:
        caps = np.zeros(box, np.float32)

    # 6. contrasts
    modalities = BRATS_MODALITIES if layout == "brats" else ATLAS_MODALITIES
    volumes: dict[str, np.ndarray] = {}
    bias_shared = _smooth_field_on(rng, 1, box_mm, 12.0, config.bias_smooth_mm, box)[0]
    for name in modalities:
        image = _synthesize(config, name, rng, csf, gm, wm, detail, tissue_texture, layers, caps, lesions)
        gamma = rng.uniform(*config.gamma_range)
        image = np.power(np.clip(image, 0, None), gamma, dtype=np.float32)
        bias_own = _smooth_field_on(rng, 1, box_mm, 12.0, config.bias_smooth_mm, box)[0]
        image *= np.exp(config.bias_strength * (0.6 * bias_shared + 0.8 * bias_own))
        sigma = rng.uniform(*config.noise_std)
        n1 = rng.standard_normal(box, dtype=np.float32)
        n2 = rng.standard_normal(box, dtype=np.float32)
        image = np.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician magnitude
        if rng.uniform() < config.thick_slice_probability:
            axis = int(rng.integers(0, 3))
            image = ndi.gaussian_filter1d(image, rng.uniform(0.5, 1.1) / v, axis=axis)
        image *= brain
        image *= rng.uniform(*config.intensity_range) / _brightest(config, name)
        full = np.zeros(shape, np.float32)
        full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = image
        if layout == "brats":
            full = np.clip(np.rint(full), 0, 32767).astype(np.int16)
        volumes[name] = full
    inner = (slice(lo[0], hi[0] + 1), slice(lo[1], hi[1] + 1), slice(lo[2], hi[2] + 1))
    seg = np.zeros(shape, np.uint8)
    seg[inner] = seg_box
    tissue = {}
    for name, fraction in (("csf", csf), ("gm", gm), ("wm", wm)):
        tissue[name] = np.zeros(shape, np.float32)
        tissue[name][inner] = fraction
    info = [{"kind": les.kind, "centre_mm": [round(float(c), 1) for c in les.centre], "radius_mm": round(les.radius, 1)}
            for les in lesions]
    return PhantomSubject(subject_id(layout, index), volumes, seg, out_affine, info, tissue)


def _sample_maps(anatomy: Anatomy, coarse_coords: np.ndarray, box: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Trilinear samples of the template maps at upsampled template voxel coordinates.

    Args:
        anatomy: The template maps [197, 233, 189].
        coarse_coords: Template voxel coordinates [3, *coarse] on a grid whose corners are the box corners.
        box: Full-resolution box shape.

    Returns:
        ``gm``, ``wm``, ``mask``, ``t1`` -> float32 [*box] (0 outside the template).
    """
    sizes = np.array(anatomy.mask.shape, dtype=np.float64)
    # grid_sample wants (x, y, z) = (last, middle, first) array axis, normalised to [-1, 1] (align_corners)
    normalised = (coarse_coords / (sizes[:, None, None, None] - 1.0) * 2.0 - 1.0)[::-1]
    grid = _upsample(normalised.astype(np.float32), box)
    out = {}
    with torch.no_grad():
        grid_t = torch.from_numpy(grid).permute(1, 2, 3, 0).contiguous()[None]
        del grid
        for name in ("gm", "wm", "mask", "t1"):
            volume = torch.from_numpy(getattr(anatomy, name))[None, None]
            sampled = torch.nn.functional.grid_sample(volume, grid_t, mode="bilinear", padding_mode="zeros",
                                                      align_corners=True)
            out[name] = sampled[0, 0].numpy()
    return out


def _brightest(config: PhantomConfig, name: str) -> float:
    tissue = {"t1": config.t1_tissue, "t1w": config.t1_tissue, "t1ce": config.t1ce_tissue,
              "t2": config.t2_tissue, "flair": config.flair_tissue}[name]
    return float(max(max(tissue), 1.0))


def _box_world(out_affine: np.ndarray, lo: np.ndarray, sub_lo: np.ndarray, sub_shape: tuple[int, int, int]
               ) -> np.ndarray:
    """Output world mm [3, *sub_shape] of the voxels of a sub-box (given in box coordinates)."""
    idx = [np.arange(n, dtype=np.float32) + (lo[d] + sub_lo[d]) for d, n in enumerate(sub_shape)]
    grid = np.stack(np.meshgrid(*idx, indexing="ij")).reshape(3, -1)
    return (out_affine[:3, :3] @ grid + out_affine[:3, 3:4]).reshape(3, *sub_shape).astype(np.float32)


def _draw_lesion(rng: np.random.Generator, lesion: _Lesion, layers: dict[str, np.ndarray], seg: np.ndarray,
                 brain: np.ndarray, gm: np.ndarray, wm: np.ndarray, out_affine: np.ndarray, lo: np.ndarray,
                 box: tuple[int, int, int], v: float, warp: _Warp, anatomy: Anatomy) -> None:
    """Add one lesion's soft memberships to ``layers`` and its labels to ``seg`` (both box-sized, in place)."""
    p = lesion.params
    # the lesion's extent in mm: ellipsoid axes up to e^0.4 x radius, noise clipped to +-2.5 std
    extent = p.get("edema", 1.0) * (1.0 + 2.5 * 1.3 * p["roughness"]) if lesion.kind == "tumour" else (
        1.0 + 2.5 * p["roughness"])
    reach = lesion.radius * 1.5 * extent + 4.0
    centre_vox = np.linalg.solve(out_affine[:3, :3], lesion.centre - out_affine[:3, 3]) - lo
    sub_lo = np.clip(np.floor(centre_vox - reach / v).astype(int), 0, None)
    sub_hi = np.minimum(np.ceil(centre_vox + reach / v).astype(int), np.array(box) - 1)
    if np.any(sub_hi < sub_lo):
        return
    sub = tuple(slice(a, b + 1) for a, b in zip(sub_lo, sub_hi))
    sub_shape = tuple(int(b - a + 1) for a, b in zip(sub_lo, sub_hi))
    world = _box_world(out_affine, lo, sub_lo, sub_shape)
    rel = (world - lesion.centre[:, None, None, None].astype(np.float32)).reshape(3, -1)
    ell = (lesion.axes.astype(np.float32) @ rel).reshape(3, *sub_shape)
    dist = np.sqrt((ell**2).sum(0)) / lesion.radius  # 1 on the mean surface
    sub_mm = (np.array(sub_shape) - 1) * v
    # two octaves of shape noise: broad undulations (~R/4) and lobulations (~R/10, at least 1.5 mm)
    broad = _smooth_field_on(rng, 4, sub_mm, 2.0, max(2.0, 0.25 * lesion.radius), sub_shape)
    lobes = _smooth_field_on(rng, 2, sub_mm, 1.5, max(1.5, 0.1 * lesion.radius), sub_shape)
    noise = np.clip(broad * 0.85 + 0.5 * np.concatenate([lobes, lobes[::-1]]), -2.5, 2.5)
    fine = _smooth_field_on(rng, 1, sub_mm, 1.5, 1.2, sub_shape)[0]
    in_brain = brain[sub]
    rough = p["roughness"]
    width = max(0.06, 1.2 / lesion.radius)  # soft edges ~1-2 mm
    if lesion.kind == "tumour":
        # irregular shapes: the normalised distance is perturbed additively by smooth noise, so no islands
        # appear far from the lesion (the perturbation is bounded in distance units)
        core_d = dist + rough * noise[0]
        tumour = _soft_inside(core_d, width) * in_brain
        edema_r = p["edema"]
        edema_d = dist / edema_r + 1.3 * rough * noise[1]
        # edema spreads along white matter (finger-like), spares cortex, never enters CSF
        affinity = np.clip(wm[sub] * 1.35 + 0.2 * gm[sub] - 0.25, 0.0, 1.0)
        edema = _soft_inside(edema_d, 0.25) * affinity * (edema_r > 1.05)
        # oedema fades outwards: strongest next to the tumour
        edema *= np.clip(1.25 - 0.45 * edema_d, 0.45, 1.0)
        edema = np.maximum(edema, tumour) * in_brain
        if p["enhancing"] > 0:
            nec_d = (dist + 0.7 * rough * noise[2]) / p["necrosis"]
            necrosis = _soft_inside(nec_d, width / p["necrosis"]) * tumour
            rim = np.clip(tumour - necrosis, 0.0, 1.0)
            patchy = _smoothstep((noise[3] + 1.2 - 2.0 * p["rim_patchiness"]) * 1.5)
            enhancing = rim * patchy * np.clip(0.7 + 0.25 * fine + 0.2 * lobes[1], 0.3, 1.0)
            non_enh = rim - rim * patchy
        else:
            necrosis = np.zeros_like(tumour)
            enhancing = np.zeros_like(tumour)
            non_enh = tumour * (0.9 + 0.1 * fine)
        texture = 1.0 + p["heterogeneity"] * (0.7 * broad[2] * broad[3] + 0.5 * fine) * np.maximum(edema, tumour)
        layers["texture"][sub] *= np.clip(texture, 0.6, 1.5)
        layers["necrosis"][sub] = np.maximum(layers["necrosis"][sub], necrosis * (0.85 + 0.15 * fine))
        layers["non_enhancing"][sub] = np.maximum(layers["non_enhancing"][sub], non_enh)
        layers["enhancing"][sub] = np.maximum(layers["enhancing"][sub], enhancing)
        layers["edema"][sub] = np.maximum(layers["edema"][sub], edema * (0.85 + 0.15 * fine))
        label = seg[sub]
        label[(edema > 0.5) & (label == 0)] = 2
        core = tumour > 0.5
        label[core & ~np.isin(label, (1, 4))] = 1
        label[core & (enhancing > 0.25) & (necrosis < 0.5)] = 4
        seg[sub] = label
        return
    # strokes: chronic infarct = fluid-filled cavity with a gliotic rim, confined to its hemisphere
    if lesion.kind == "stroke" and lesion.direction is not None:
        # territorial infarct: a wedge with its base on the cortex, narrowing towards the ventricles
        # (u: depth coordinate along the outward direction, rho: distance from the wedge axis)
        n = lesion.direction.astype(np.float32)
        u = np.tensordot(n, rel, axes=1).reshape(sub_shape) / lesion.radius
        rho = np.sqrt(np.maximum((rel**2).sum(0).reshape(sub_shape) / lesion.radius**2 - u**2, 0.0))
        half_width = 0.3 + 0.75 * _smoothstep((u + 1.1) / 1.5)
        dist = np.sqrt(((u - 0.2) / 1.1) ** 2 + (rho / half_width) ** 2)
    d = dist + rough * noise[0]
    lesion_m = _soft_inside(d, width) * in_brain
    if lesion.kind == "stroke":
        # hemisphere of each voxel from the template x coordinate (midline is respected by arterial territories)
        # (the warp is smooth: evaluate it on a coarse grid over the sub-box and upsample)
        first = lo + sub_lo
        caxes = _coarse_axes(first.astype(float), (first + np.array(sub_shape) - 1).astype(float), v, _COARSE_MM)
        cvox = np.stack(np.meshgrid(*caxes, indexing="ij")).reshape(3, -1)
        tvox = warp.template_coords(cvox, out_affine)[:1].reshape(1, *[len(a) for a in caxes])
        tx = anatomy.affine[0, 0] * _upsample(tvox, sub_shape)[0] + anatomy.affine[0, 3]
        lesion_m *= _smoothstep(0.5 + 0.5 * p["hemisphere"] * tx / 2.0)
        # infarcts follow tissue, not the ventricles
        lesion_m *= np.clip((gm[sub] + wm[sub]) * 1.5, 0.0, 1.0)
    cavity = lesion_m * _smoothstep((1.0 - d) / max(p["gliosis"], 0.05) + 0.3 * noise[1])
    gliosis = np.clip(lesion_m - cavity, 0.0, 1.0)
    texture = 1.0 + p["heterogeneity"] * (0.6 * noise[2] + 0.5 * fine) * lesion_m
    layers["texture"][sub] *= np.clip(texture, 0.6, 1.5)
    layers["cavity"][sub] = np.maximum(layers["cavity"][sub], cavity * (0.85 + 0.15 * fine))
    layers["gliosis"][sub] = np.maximum(layers["gliosis"][sub], gliosis)
    label = seg[sub]
    label[lesion_m > 0.5] = 1
    seg[sub] = label


def _periventricular_caps(rng: np.random.Generator, csf: np.ndarray, wm: np.ndarray, box_mm: np.ndarray,
                          box: tuple[int, int, int]) -> np.ndarray:
    """Unlabelled, faint normal-ageing hyperintensities hugging the ventricles (FLAIR/T2), [*box] in [0, 1]."""
    ventricles = ndi.binary_opening(csf > 0.85, iterations=1)
    near = ndi.gaussian_filter(ventricles.astype(np.float32), 2.0)
    noise = _smooth_field_on(rng, 1, box_mm, 4.0, 5.0, box)[0]
    return np.clip(near * 3.0 - 0.2, 0, 1) * wm * _smoothstep(noise * 0.8 + 0.3)


def _synthesize(config: PhantomConfig, name: str, rng: np.random.Generator, csf: np.ndarray, gm: np.ndarray,
                wm: np.ndarray, detail: np.ndarray, texture: np.ndarray, layers: dict[str, np.ndarray],
                caps: np.ndarray, lesions: list[_Lesion]) -> np.ndarray:
    """Noise-free image of one contrast [*box], WM ~ 1, before gamma/bias/noise."""
    key = "t1" if name == "t1w" else name
    tissue = np.array({"t1": config.t1_tissue, "t1ce": config.t1ce_tissue, "t2": config.t2_tissue,
                       "flair": config.flair_tissue}[key], dtype=np.float64)
    tissue *= np.exp(rng.normal(0.0, config.contrast_jitter, 3))
    tissue /= tissue[2]
    image = (tissue[0] * csf + tissue[1] * gm + tissue[2] * wm).astype(np.float32)
    # template detail (deep nuclei, tracts): same sign on T1-weighted, inverted on T2-weighted contrasts
    detail_gain = {"t1": 0.9, "t1ce": 0.8, "t2": -1.3, "flair": -0.8}[key]
    image += detail_gain * detail
    image *= texture
    if caps.any() and key in ("t2", "flair"):
        image = image * (1.0 - caps) + caps * (1.45 if key == "flair" else 1.5) * image.mean(where=wm > 0.9)
    tumour_table = {"t1": config.t1_tumour, "t1ce": config.t1ce_tumour, "t2": config.t2_tumour,
                    "flair": config.flair_tumour}
    if any(les.kind == "tumour" for les in lesions):
        contrast = float(np.mean([les.params["contrast"] for les in lesions if les.kind == "tumour"]))
        values = np.array(tumour_table[key], dtype=np.float64)
        values = 1.0 + (values - 1.0) * contrast * np.exp(rng.normal(0.0, 0.08, 4))
        if key == "flair":  # necrotic fluid is variably suppressed on FLAIR
            values[0] = rng.uniform(0.5, 1.6)
        # layered from outside in: edema, then the tumour compartments replace what lies underneath
        for layer, value in (("edema", values[3]), ("non_enhancing", values[1]), ("enhancing", values[2]),
                             ("necrosis", values[0])):
            weight = layers[layer]
            if weight.any():
                if layer == "edema":  # edema raises water content: it modulates, not erases, the anatomy
                    image = image * (1.0 - weight) + weight * value * (0.6 + 0.4 * image)
                else:
                    image = image * (1.0 - weight) + weight * value
    if key == "t1" and name == "t1w" and (layers["cavity"].any() or layers["gliosis"].any()):
        contrast = float(np.mean([les.params["contrast"] for les in lesions]))
        cavity_v = tissue[0] * (0.75 + 0.2 * rng.uniform())  # fluid, a little darker than partial-volume CSF
        gliosis_v = 1.0 + (config.t1_stroke[1] - 1.0) * contrast
        image = image * (1.0 - layers["gliosis"]) + layers["gliosis"] * gliosis_v * (0.7 + 0.3 * image)
        image = image * (1.0 - layers["cavity"]) + layers["cavity"] * cavity_v
    return image * layers["texture"]


# ------------------------------------------------------------------------------------------- writing


def _save_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI to a temporary name in the same folder, then rename it (a killed run leaves no half-file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp{os.getpid()}.nii.gz")
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_subject(subject: PhantomSubject, out: Path | str, layout: Layout, index: int) -> dict[str, Path]:
    """Write one subject's NIfTI files (atomically) in the real layout; returns the written paths."""
    paths = subject_files(out, layout, index)
    for name, path in paths.items():
        array = subject.seg if name == "seg" else subject.volumes[name]
        _save_atomic(array, subject.affine, path)
    return paths


def write_phantom_dataset(config: PhantomConfig, out: Path | str, layout: Layout, subjects: int, seed: int,
                          overwrite: bool = False, progress: bool = True) -> Path:
    """Generate and write ``subjects`` phantom subjects in the real BraTS 2021 or ATLAS v2.0 layout.

    Also writes ``<out>/phantom.json`` (layout, seed, count, config, lesions per subject) for provenance.

    Args:
        config: Phantom settings.
        out: Dataset root folder (created if missing).
        layout: ``"brats"`` or ``"atlas"``.
        subjects: Number of subjects (>= 1).
        seed: Dataset seed; subject k depends only on (seed, k).
        overwrite: Allow writing into a non-empty folder (files of the same names are replaced, others kept).
        progress: Show a tqdm progress bar.

    Returns:
        The dataset root ``out``.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    from tqdm import tqdm

    _check_layout(layout)
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"phantom output {out} is a file: give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"phantom output folder {out} is not empty: choose an empty or new folder, or pass --overwrite "
            "(overwrite=True) to replace the phantom's files in it"
        )
    out.mkdir(parents=True, exist_ok=True)
    anatomy = load_anatomy()
    summary: list[dict[str, object]] = []
    for index in tqdm(range(subjects), desc=f"phantom ({layout})", unit="subject", disable=not progress):
        subject = generate_subject(config, layout, seed, index, anatomy)
        write_subject(subject, out, layout, index)
        summary.append({"subject_id": subject.subject_id, "has_lesion": subject.has_lesion,
                        "lesions": subject.lesions})
    meta = {"generator": "anomalydiff.data.phantom", "layout": layout, "seed": seed, "subjects": subjects,
            "config": asdict(config), "subject_list": summary}
    tmp = out / f".phantom.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "phantom.json")
    return out


# ------------------------------------------------------------------------------------------- montage


def _axial_display(path: Path) -> np.ndarray:
    """A volume reoriented to RAS [X, Y, Z] float32 (for display)."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.get_fdata(dtype=np.float32))


def montage_indices(out: Path | str, layout: Layout, rows: int = 5) -> list[int]:
    """Subjects worth showing: up to ``rows - 1`` with lesions, then one lesion-free (from ``phantom.json``).

    Falls back to the first ``rows`` subjects whose files exist when ``phantom.json`` is missing.
    """
    meta_path = Path(out) / "phantom.json"
    if meta_path.exists():
        listing = json.loads(meta_path.read_text())["subject_list"]
        sick = [i for i, item in enumerate(listing) if item["has_lesion"]]
        healthy = [i for i, item in enumerate(listing) if not item["has_lesion"]]
        chosen = sick[: max(rows - 1, 1)] + healthy[:1]
        chosen += [i for i in range(len(listing)) if i not in chosen][: max(rows - len(chosen), 0)]
        return sorted(chosen[:rows])
    found = []
    index = 0
    while len(found) < rows and subject_files(out, layout, index)["seg"].exists():
        found.append(index)
        index += 1
    return found


def save_montage(out: Path | str, layout: Layout, png: Path | str, rows: int = 5,
                 indices: list[int] | None = None) -> Path:
    """Save a PNG montage of axial slices read back from a written phantom dataset.

    One row per subject (the slice through the largest lesion area, or mid-ventricles if lesion-free), one
    column per contrast, and a last column with the segmentation outline (BraTS colours: 1 red, 2 yellow,
    4 cyan; ATLAS: red) on FLAIR / T1w. ATLAS rows show the T1w at the lesion and 20 mm above.
    Radiological convention (patient's right on the image left, anterior up).

    Args:
        out: Dataset root written by :func:`write_phantom_dataset`.
        layout: Its layout.
        png: Output PNG path.
        rows: How many subjects to show when ``indices`` is None (see :func:`montage_indices`).
        indices: Explicit subject indices to show.

    Returns:
        The PNG path.
    """
    out = Path(out)
    rows_idx = list(indices) if indices is not None else montage_indices(out, layout, rows)
    if not rows_idx:
        raise FileNotFoundError(f"montage: no phantom subject found in {out}; write the dataset first")
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch

    modalities = BRATS_MODALITIES if layout == "brats" else ATLAS_MODALITIES
    columns = [*modalities, "seg"] if layout == "brats" else ["t1w", "t1w ", "seg"]
    fig = Figure(figsize=(2.4 * len(columns), 2.9 * len(rows_idx)), facecolor="black")
    axes = fig.subplots(len(rows_idx), len(columns), squeeze=False)
    for r, index in enumerate(rows_idx):
        paths = subject_files(out, layout, index)
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"montage: phantom files missing: {missing[:2]}; write the dataset first")
        vols = {m: _axial_display(paths[m]) for m in modalities}
        seg = _axial_display(paths["seg"]).round().astype(np.uint8)
        brain = vols[modalities[0]] > 0
        if seg.any():
            z = int(np.argmax(seg.reshape(-1, seg.shape[2]).astype(bool).sum(0)))
        else:
            zs = np.flatnonzero(brain.any((0, 1)))
            z = int(zs[0] + 0.55 * (zs[-1] - zs[0]))
        zs = [z]
        xy = np.argwhere(brain.any(2))  # crop every panel of this row to the brain (plus 4 voxels)
        x0, y0 = np.maximum(xy.min(0) - 4, 0)
        x1, y1 = xy.max(0) + 5
        crop = (slice(int(x0), int(x1)), slice(int(y0), int(y1)))
        if layout == "atlas":  # second column: a slice 20 mm higher for more anatomy
            zs.append(min(z + max(1, int(round(20 / abs(nib.load(str(paths["seg"])).header.get_zooms()[2])))),
                          seg.shape[2] - 1))
        for c, column in enumerate(columns):
            ax = axes[r, c]
            name = column.strip()
            if column == "seg":
                base = vols["flair" if layout == "brats" else "t1w"]
                zz = z
            else:
                base = vols[name]
                zz = zs[1] if column == "t1w " else z
            sl = base[:, :, zz][crop]
            vmax = float(np.percentile(base[base > 0], 99.5)) if (base > 0).any() else 1.0
            # radiological display: rows = anterior at top, patient's right on the left of the image
            ax.imshow(np.flipud(sl.T)[:, ::-1], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            if column == "seg":
                s = seg[:, :, zz][crop]
                colours = {1: "red", 2: "yellow", 4: "cyan"} if layout == "brats" else {1: "red"}
                for label, colour in colours.items():
                    m = np.flipud((s == label).T)[:, ::-1]
                    if m.any():
                        ax.contour(m.astype(float), levels=[0.5], colors=colour, linewidths=0.7)
            title = f"{subject_id(layout, index)} {name} z={zz}" if c == 0 else f"{name} z={zz}"
            ax.set_title(title, color="white", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, facecolor="black")
    return png
