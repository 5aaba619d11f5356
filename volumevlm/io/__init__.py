"""CT input/output: one reader with validation, writers, geometry helpers.

Every image in volumevlm enters through :func:`read_volume` / :func:`as_volume` and is
a :class:`Volume` (array [X, Y, Z] in stored voxel order + affine voxel -> RAS mm).
"""

from volumevlm.io.dicom_seg import write_dicom_seg
from volumevlm.io.readers import VolumeWarning, as_volume, hu_problem, read_volume
from volumevlm.io.volume import (
    DEFAULT_MAX_VOXELS,
    LPS_TO_RAS,
    MAX_VOXELS_ENV,
    Volume,
    check_same_geometry,
    reorient,
)
from volumevlm.io.writers import write_dicom_enhanced, write_dicom_series, write_nifti

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "LPS_TO_RAS",
    "MAX_VOXELS_ENV",
    "Volume",
    "VolumeWarning",
    "as_volume",
    "check_same_geometry",
    "hu_problem",
    "read_volume",
    "reorient",
    "write_dicom_enhanced",
    "write_dicom_seg",
    "write_dicom_series",
    "write_nifti",
]
