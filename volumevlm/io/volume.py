"""The in-memory CT volume and the geometry helpers every reader and writer shares.

Convention (nibabel's, used everywhere in volumevlm): ``array`` is indexed ``[i, j, k]``
in the voxel order of the stored file, and ``affine`` (4x4, float64) maps a voxel index
``(i, j, k, 1)`` to world RAS+ millimetres (x grows towards the patient's Right, y
towards Anterior, z towards Superior). DICOM and ITK store LPS; their readers and
writers convert with :data:`LPS_TO_RAS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from volumevlm.errors import GeometryError, InputError

# 1024 x 1024 x 2048 voxels (8 GiB as float32) is larger than any routine CT series;
# beyond it a file is more likely a mistake than a scan. Override with the env var.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2048
MAX_VOXELS_ENV = "VOLUMEVLM_MAX_VOXELS"

# Voxel spacings outside this range (mm) are not CT: a broken header, or the wrong unit.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 50.0

# Flips x and y: LPS (DICOM, ITK) <-> RAS (nibabel, MONAI). Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeWarning(UserWarning):
    """A volume was read but looks suspicious (e.g. values that are not HU)."""


@dataclass(frozen=True)
class Volume:
    """A 3D image with its geometry.

    array:  [X, Y, Z] in stored voxel order; float32 Hounsfield units for images,
            an integer dtype for label maps.
    affine: 4x4 float64, voxel index -> world RAS+ mm.
    source: path or description of where it came from (used in error messages).
    meta:   format ("nifti" | "dicom" | "nrrd" | "mha" | "array" ...), modality,
            series_uid, original dtype, kind ("image" | "label") ...
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the stored i, j, k axes."""
        return spacing_from_affine(self.affine)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Nearest anatomical direction of each stored axis, e.g. ("L", "P", "S")."""
        return axcodes_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        """The axcodes as one string, e.g. "LPS"."""
        return "".join(self.axcodes)

    def to_nifti(self) -> nib.Nifti1Image:
        """The volume as an in-memory nibabel image (qform and sform set to the affine)."""
        img = nib.Nifti1Image(np.asarray(self.array), np.asarray(self.affine, dtype=np.float64))
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis: the length of the affine's columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


def axcodes_from_affine(affine: np.ndarray) -> tuple[str, str, str]:
    return tuple(str(c) for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def max_voxels_limit(max_voxels: int | None) -> int | None:
    """The voxel-count guard in force: the env var overrides the library default.

    An explicit argument other than the default wins over the environment; None
    disables the guard.
    """
    if max_voxels is None:
        return None
    env = os.environ.get(MAX_VOXELS_ENV)
    if env and max_voxels == DEFAULT_MAX_VOXELS:
        try:
            return int(float(env))
        except ValueError as err:
            raise InputError(MAX_VOXELS_ENV, f"not a number: {env!r}") from err
    return int(max_voxels)


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store the same world content in another orientation.

    array:  [X, Y, Z, ...] (trailing axes are carried along untouched).
    affine: 4x4 voxel -> RAS mm.
    axcodes: target direction of the stored axes, e.g. "RAS" or "LPS".
    Returns (array, affine) with ``aff2axcodes(affine) == axcodes``. Exact: only flips
    and axis permutations, no interpolation.
    """
    affine = np.asarray(affine, dtype=np.float64)
    start = ornt.io_orientation(affine)
    target = ornt.axcodes2ornt(tuple(axcodes.upper()))
    transform = ornt.ornt_transform(start, target)
    out = ornt.apply_orientation(np.asarray(array), transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, np.asarray(array).shape[:3])
    return np.ascontiguousarray(out), new_affine


def check_same_geometry(image: Volume, label: Volume, *, atol_mm: float = 1e-3) -> None:
    """Raise GeometryError (naming the label file) unless label and image share one grid.

    Same shape and every affine entry within ``atol_mm`` (voxel corners then agree to
    about that many millimetres).
    """
    if tuple(image.shape) != tuple(label.shape):
        raise GeometryError(
            label.source, f"label shape {label.shape} differs from image shape {image.shape} ({image.source})"
        )
    diff = np.abs(np.asarray(image.affine, dtype=np.float64) - np.asarray(label.affine, dtype=np.float64))
    if not np.all(diff <= atol_mm):
        raise GeometryError(
            label.source,
            f"label affine differs from image affine ({image.source}) by up to {float(diff.max()):.4g} mm "
            f"(label orientation {''.join(label.axcodes)}, spacing {_fmt(label.spacing)}; "
            f"image orientation {''.join(image.axcodes)}, spacing {_fmt(image.spacing)})",
        )


def _fmt(values) -> str:
    return "x".join(f"{v:.4g}" for v in values)
