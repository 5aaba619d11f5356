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


def seg_content(path) -> dict:
    """What a DICOM SEG says, without the UIDs and times made fresh for each file: segments,
    and per frame its segment, source image (and frame), plane position and pixels."""
    import pydicom

    seg = pydicom.dcmread(path)
    frames = []
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        frames.append((int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber), ref.ReferencedSOPInstanceUID,
                       int(ref.get("ReferencedFrameNumber", 0)),
                       tuple(float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient), pixels[f].tobytes()))
    return {
        "segments": [(int(s.SegmentNumber), s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
                     for s in seg.SegmentSequence],
        "series": seg.ReferencedSeriesSequence[0].SeriesInstanceUID,
        "study": seg.StudyInstanceUID,
        "frame_of_reference": seg.FrameOfReferenceUID,
        "frames": frames,
    }


def rotation_z(degrees: float) -> np.ndarray:
    """A 4x4 rotation about the z axis (for oblique test geometries)."""
    t = np.deg2rad(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r
