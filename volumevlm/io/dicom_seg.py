"""DICOM Segmentation (SEG) output for a label map on a CT read from DICOM (highdicom).

A SEG object references the CT it was made on (study, series, every SOP instance and,
for an enhanced CT, every frame; the frame of reference) and describes one segment per
structure with its name and coded anatomy (SNOMED CT), so PACS viewers, 3D Slicer and
OHIF overlay it on the original images. Only a Volume that :func:`read_volume` read from
DICOM carries what a SEG must reference (``volume.meta["dicom"]``); any other input is
refused with one line (write NIfTI for it).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from volumevlm.errors import InputError
from volumevlm.io.dicom import DicomSource
from volumevlm.io.volume import Volume
from volumevlm.io.writers import write_atomic

DICOM_SEG_SUFFIXES = (".dcm",)
SEG_SERIES_DESCRIPTION = "volumevlm segmentation - not for clinical use"
SEG_SERIES_NUMBER = 999
# DICOM allows local codes in a coding scheme whose designator starts with "99".
LOCAL_SCHEME = "99VOLUMEVLM"

# Structure name -> (SNOMED CT attribute of pydicom's code dictionary, laterality or None).
_ANATOMY = {
    "liver": ("Liver", None),
    "spleen": ("Spleen", None),
    "kidney_left": ("Kidney", "Left"),
    "kidney_right": ("Kidney", "Right"),
    "gallbladder": ("Gallbladder", None),
    "pancreas": ("Pancreas", None),
    "stomach": ("Stomach", None),
    "aorta": ("Aorta", None),
    "inferior_vena_cava": ("InferiorVenaCava", None),
    "urinary_bladder": ("Bladder", None),
    "lung_left": ("Lung", "Left"),
    "lung_right": ("Lung", "Right"),
    "heart": ("Heart", None),
    "vertebrae": ("Vertebra", None),
}


def structure_codes(name: str):
    """(category, property type, laterality modifier or None) of a structure name: SNOMED CT
    "Anatomical Structure" and the organ's code; a name without a known code gets a local
    code (scheme 99VOLUMEVLM) under the same category."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    category = codes.SCT.AnatomicalStructure
    if name in _ANATOMY:
        organ, side = _ANATOMY[name]
        return category, getattr(codes.SCT, organ), (getattr(codes.SCT, side) if side else None)
    return category, Code(value=name[:16], scheme_designator=LOCAL_SCHEME, meaning=name.replace("_", " ")[:64]), None


def dicom_source_of(volume: Volume, target) -> DicomSource:
    """The DICOM objects ``volume`` was read from; a one-line error naming the input when it
    was not read from DICOM (``target``: the SEG output asked for, named in the message)."""
    source = volume.meta.get("dicom") if isinstance(volume.meta, Mapping) else None
    if not isinstance(source, DicomSource):
        fmt = volume.meta.get("format", "unknown") if isinstance(volume.meta, Mapping) else "unknown"
        raise InputError(volume.source, f"DICOM SEG output needs a DICOM CT input (this input is {fmt}); "
                                        f"write the mask as NIfTI (.nii.gz) instead of {Path(str(target)).name}")
    return source


def dicom_seg(volume: Volume, labels: np.ndarray, label_names: Mapping[int, str], *, software_version: str = "",
              target: str | os.PathLike = "<dicom-seg>"):
    """A highdicom Segmentation (a pydicom Dataset) of ``labels`` on the CT ``volume``.

    volume: as returned by :func:`read_volume` for a DICOM series, zip or enhanced CT file.
    labels: integer label map [X, Y, Z] on exactly the volume's grid (the mask
        ``model.segment`` returns); 0 is background.
    label_names: {label index: structure name}; one segment per non-background label,
        numbered 1.. in label order, with its name, the SNOMED CT category "Anatomical
        Structure" and the organ's code (laterality as a modifier).
    Frames follow the source: one per source slice (classic) or per stored frame
    (enhanced), empty frames omitted, each referencing its source image/frame.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    source = dicom_source_of(volume, target)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise InputError(target, f"mask shape {labels.shape} differs from the CT's {volume.shape}")
    if labels.dtype.kind not in "biu":
        raise InputError(target, f"mask must hold integer labels, got {labels.dtype}")
    names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
    present = set(np.unique(labels).tolist()) - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        raise InputError(target, f"mask holds labels {unnamed[:5]} that have no name")
    numbers = sorted(names)
    lut = np.zeros(max([*numbers, int(labels.max(initial=0))]) + 1, dtype=np.uint16)
    for segment, index in enumerate(numbers, start=1):
        lut[index] = segment
    frames = np.transpose(lut[labels], (2, 1, 0))  # [k, rows (j), columns (i)]
    if source.enhanced:
        # Stored frame f shows slice k where frame_of_k[k] == f.
        frames = frames[np.argsort(np.asarray(source.frame_of_k))]
    frames = frames.astype(np.uint8 if len(numbers) < 256 else np.uint16)

    algorithm = hd.AlgorithmIdentificationSequence(
        name="volumevlm", version=software_version or "unknown", family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for segment, index in enumerate(numbers, start=1):
        category, kind, side = structure_codes(names[index])
        description = hd.seg.SegmentDescription(
            segment_number=segment, segment_label=names[index][:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        if side is not None:
            modifier = Dataset()
            modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = side.value, side.scheme_designator, side.meaning
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    try:
        with warnings.catch_warnings():
            # The SEG copies the source's PatientName as stored; highdicom's advice on its form
            # is about the source, which volumevlm never modifies.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            seg = hd.seg.Segmentation(
                source_images=list(source.datasets), pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer="volumevlm", manufacturer_model_name="volumevlm",
                software_versions=software_version or "unknown", device_serial_number="none",
                content_label="VOLUMEVLM", content_description="volumevlm segmentation; not for clinical use",
                content_creator_name="volumevlm^", omit_empty_frames=bool(present))
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise InputError(volume.source, f"cannot build a DICOM SEG on this series ({' '.join(str(err).split())[:160]})") from err
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    return seg


def dicom_seg_bytes(volume: Volume, labels: np.ndarray, label_names: Mapping[int, str], *, software_version: str = "") -> bytes:
    """The DICOM SEG of :func:`dicom_seg` as a Part 10 file's bytes (e.g. an HTTP response)."""
    seg = dicom_seg(volume, labels, label_names, software_version=software_version)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom_seg(path: str | os.PathLike, volume: Volume, labels: np.ndarray, label_names: Mapping[int, str], *,
                    software_version: str = "") -> Path:
    """Write the DICOM SEG of :func:`dicom_seg` to ``path`` (.dcm) atomically; returns ``path``."""
    path = Path(path)
    if not path.name.lower().endswith(DICOM_SEG_SUFFIXES):
        raise InputError(path, "a DICOM SEG output must end with .dcm")
    seg = dicom_seg(volume, labels, label_names, software_version=software_version, target=path)
    return write_atomic(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))


__all__ = [
    "DICOM_SEG_SUFFIXES",
    "LOCAL_SCHEME",
    "SEG_SERIES_DESCRIPTION",
    "dicom_seg",
    "dicom_seg_bytes",
    "dicom_source_of",
    "structure_codes",
    "write_dicom_seg",
]
