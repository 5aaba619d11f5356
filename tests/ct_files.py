"""Writers of test inputs the package itself does not write: NRRD / MHA through
SimpleITK and zipped DICOM series (the phantoms they hold are NOT clinical data)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def write_itk(path: Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """HU [X, Y, Z] with a voxel -> RAS mm affine, as NRRD / MHA (SimpleITK: LPS world, [Z, Y, X])."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)).astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).reshape(-1)])
    sitk.WriteImage(image, str(path))
    return Path(path)


def zip_series(folder: Path, archive: Path) -> Path:
    """The files of a DICOM series folder, flat, in a zip."""
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(Path(folder).iterdir()):
            zf.write(f, f.name)
    return Path(archive)
