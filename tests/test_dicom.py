"""DICOM in and out: Enhanced CT reads like the classic series of the same volume (frames
in any stored order), non-CT objects are refused in one line, DICOM SEG written for a
classic and an enhanced CT reads back frame by frame on the source geometry, and the
synthetic cohort writes enhanced CT. Every phantom here is synthetic, not clinical data."""

from __future__ import annotations

import json
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ct_files import rotation_z, zip_series
from volumevlm.errors import InputError
from volumevlm.io import (
    LPS_TO_RAS,
    VolumeWarning,
    read_volume,
    write_dicom_enhanced,
    write_dicom_seg,
    write_dicom_series,
    write_nifti,
)

AFFINES = {
    "LPS": np.array([[-0.9, 0, 0, 20], [0, -1.1, 0, 25], [0, 0, 2.0, -40], [0, 0, 0, 1.0]]),
    "PSL": np.array([[0, 0, -2.5, 10], [-0.8, 0, 0, 20], [0, 1.2, 0, -30], [0, 0, 0, 1.0]]),
    "LAI": np.array([[-1.0, 0, 0, 5], [0, 1.0, 0, -7], [0, 0, -3.0, 30], [0, 0, 0, 1.0]]),
    "oblique": rotation_z(30) @ np.array([[1.0, 0, 0, -20], [0, 1.2, 0, -25], [0, 0, 2.0, -30], [0, 0, 0, 1.0]]),
}
STUDY, SERIES = "1.2.826.0.1.3680043.10.7", "1.2.826.0.1.3680043.10.7.1"
# The phantom's HU range on some of these small grids holds no tissue; that warning is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore:.*not Hounsfield units")
NAMES = {0: "background", 1: "liver", 2: "vertebrae", 3: "kidney_left", 4: "my_structure"}


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _shuffled(n, seed=0):
    order = np.random.default_rng(seed).permutation(n)
    assert not np.array_equal(order, np.arange(n))
    return order


# ---------------------------------------------------------------------- enhanced CT in


@pytest.mark.parametrize("name", list(AFFINES))
def test_enhanced_ct_reads_like_the_classic_series_as_file_folder_and_zip(tmp_path, ct_phantom, name):
    hu, _, affine = ct_phantom(shape=(24, 20, 12), affine=AFFINES[name])
    classic = read_volume(write_dicom_series(tmp_path / "classic", hu, affine, patient_id="p"))
    order = _shuffled(hu.shape[2])
    path = write_dicom_enhanced(tmp_path / "enhanced" / "ct.dcm", hu, affine, patient_id="p", frame_order=order)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == hu.shape[2]
    # The frames really are stored out of order: frame 0 is not the first slice.
    first = np.array([float(v) for v in ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient])
    np.testing.assert_allclose(first, (LPS_TO_RAS @ affine @ [0, 0, order[0], 1])[:3], atol=1e-3)
    archive = zip_series(tmp_path / "enhanced", tmp_path / "enhanced.zip")
    for source in (path, tmp_path / "enhanced", archive):
        vol = read_volume(source)
        assert vol.meta["format"] == "dicom" and vol.meta["dicom_form"] == "enhanced" and vol.meta["n_frames"] == hu.shape[2]
        np.testing.assert_array_equal(vol.array, classic.array)
        np.testing.assert_allclose(vol.affine, classic.affine, atol=1e-4)


def test_enhanced_ct_applies_the_rescale_of_each_frame(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    path = write_dicom_enhanced(tmp_path / "ct.dcm", hu, affine, patient_id="p", frame_order=_shuffled(8, 1))
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int32)
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        # Frame f stores values 7*f lower with an intercept 7*f higher: the same HU.
        group.PixelValueTransformationSequence[0].RescaleIntercept = str(-1024 + 7 * f)
        stored[f] -= 7 * f
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path)
    np.testing.assert_array_equal(read_volume(path).array, np.round(hu))


def test_enhanced_ct_memory_guard_and_single_frame(tmp_path, ct_phantom, monkeypatch):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    path = write_dicom_enhanced(tmp_path / "ct.dcm", hu, affine, patient_id="p")
    monkeypatch.setenv("VOLUMEVLM_MAX_VOXELS", "1000")
    with pytest.raises(InputError, match="2560 voxels exceeds the memory guard of 1000"):
        read_volume(path)
    monkeypatch.delenv("VOLUMEVLM_MAX_VOXELS")
    one = write_dicom_enhanced(tmp_path / "one.dcm", hu[:, :, :1], affine, patient_id="p")
    with pytest.raises(InputError, match="single slice"):
        read_volume(one)


def _edit(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    return path


def _drop_frame(ds, f=3):
    frames = ds.pixel_array
    del ds.PerFrameFunctionalGroupsSequence[f]
    ds.NumberOfFrames = len(ds.PerFrameFunctionalGroupsSequence)
    ds.PixelData = np.delete(frames, f, axis=0).astype("<i2").tobytes()


def _tilt_frame(ds, f=2):
    group = ds.PerFrameFunctionalGroupsSequence[f]
    group.PlaneOrientationSequence = [pydicom.Dataset()]
    group.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]


def _duplicate_position(ds):
    groups = ds.PerFrameFunctionalGroupsSequence
    groups[1].PlanePositionSequence[0].ImagePositionPatient = groups[0].PlanePositionSequence[0].ImagePositionPatient


def _tilt(position):
    """A gantry tilt: each slice shifted in x by 0.3 of its height (z) above the first."""
    x, y, z = (float(v) for v in position)
    return [x + 0.3 * (z + 40.0), y, z]


def _gantry_tilt(ds):
    for group in ds.PerFrameFunctionalGroupsSequence:
        item = group.PlanePositionSequence[0]
        item.ImagePositionPatient = _tilt(item.ImagePositionPatient)


@pytest.mark.parametrize("change, expected", [
    (_drop_frame, "uneven slice spacing"),
    (_tilt_frame, "mixed orientations"),
    (_duplicate_position, "duplicate frames"),
    (_gantry_tilt, "gantry tilt"),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]), "pixel data missing, truncated"),
])
def test_enhanced_ct_with_bad_geometry_is_a_one_line_error(tmp_path, ct_phantom, change, expected):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    path = _edit(write_dicom_enhanced(tmp_path / "ct.dcm", hu, affine, patient_id="p", frame_order=_shuffled(8, 2)), change)
    with pytest.raises(InputError, match=expected) as err:
        read_volume(path)
    assert _one_line(err).startswith(str(path))


def test_classic_series_with_gantry_tilt_is_a_one_line_error(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    folder = write_dicom_series(tmp_path / "ct", hu, affine, patient_id="p")
    for name in os.listdir(folder):
        _edit(folder / name, lambda ds: setattr(ds, "ImagePositionPatient", _tilt(ds.ImagePositionPatient)))
    with pytest.raises(InputError, match=r"shifted in-plane by up to 4\.2 mm .*gantry tilt") as err:
        read_volume(folder)
    assert _one_line(err).startswith(str(folder))


# ---------------------------------------------------------------------- refusals


def _object(path, sop_class, modality, **extra):
    """A minimal DICOM object of another kind (not CT), as PACS exports hold them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, STUDY, generate_uid()
    for key, value in extra.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _seg_of_a_ct(tmp_path, ct_phantom):
    hu, labels, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    ct = read_volume(write_dicom_series(tmp_path / "ct_for_seg", hu, affine, patient_id="p"))
    return write_dicom_seg(tmp_path / "seg" / "seg.dcm", ct, labels, {1: "liver", 2: "vertebrae"})


def _mr(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    folder = write_dicom_series(tmp_path / "mr", hu, affine, patient_id="p")
    for name in os.listdir(folder):
        _edit(folder / name, lambda ds: (setattr(ds, "Modality", "MR"),
                                         setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"),
                                         setattr(ds.file_meta, "MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.4")))
    return folder / sorted(os.listdir(folder))[0]


NOT_CT = {
    "SEG": (_seg_of_a_ct, "Segmentation Storage (Modality SEG)"),
    "RTSTRUCT": (lambda tmp, _: _object(tmp / "rt" / "rt.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT",
                                         StructureSetLabel="ORGANS"), "RT Structure Set Storage (Modality RTSTRUCT)"),
    "MR": (_mr, "MR Image Storage (Modality MR)"),
    "secondary capture": (lambda tmp, _: _object(tmp / "sc" / "sc.dcm", "1.2.840.10008.5.1.4.1.1.7", "OT", Rows=8, Columns=8),
                          "Secondary Capture Image Storage (Modality OT)"),
    "SR": (lambda tmp, _: _object(tmp / "sr" / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR"),
           "Enhanced SR Storage (Modality SR)"),
    "presentation state": (lambda tmp, _: _object(tmp / "pr" / "pr.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),
                           "Grayscale Softcopy Presentation State Storage (Modality PR)"),
}


@pytest.mark.parametrize("kind", list(NOT_CT))
def test_objects_that_are_not_ct_images_are_refused_naming_file_and_type(tmp_path, ct_phantom, kind):
    make, what = NOT_CT[kind]
    path = make(tmp_path, ct_phantom)
    archive = zip_series(path.parent, tmp_path / "objects.zip")
    for given in (path, path.parent, archive):
        with pytest.raises(InputError) as err:
            read_volume(given)
        text = _one_line(err)
        assert what in text and "not a CT image" in text
        if given != archive:  # the zip's members live in a temporary folder: the file is named by its name
            assert str(path) in text if given == path else path.name in text


def test_a_folder_with_ct_and_other_objects_reads_the_ct_and_says_what_it_skipped(tmp_path, ct_phantom):
    hu, labels, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    study = tmp_path / "study"
    write_dicom_series(study / "ct", hu, affine, patient_id="p", study_uid=STUDY, series_uid=SERIES)
    ct = read_volume(study / "ct")
    write_dicom_seg(study / "seg.dcm", ct, labels, {1: "liver", 2: "vertebrae"})
    _object(study / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR")
    with pytest.warns(VolumeWarning, match=rf"reading CT series {SERIES} .*skipped 2 other series: .*Segmentation Storage"):
        vol = read_volume(study)
    np.testing.assert_array_equal(vol.array, ct.array)
    assert vol.meta["series_uid"] == SERIES and vol.meta["n_series"] == 3


# ---------------------------------------------------------------------- DICOM SEG out


def _lps_index(affine):
    """World LPS mm -> voxel index (i, j, k) of the grid ``affine`` (voxel -> RAS)."""
    return np.linalg.inv(LPS_TO_RAS @ affine)


def _mask_from_seg(seg, shape, affine, k_of_reference):
    """Rebuild the label map from a SEG file frame by frame, two ways that must agree: the
    source image/frame each SEG frame references (-> k through ``k_of_reference``), and its
    plane position (-> k through the known geometry). Segment n -> its label index."""
    segment_label = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    index_of = {name: index for index, name in NAMES.items()}
    to_index = _lps_index(affine)
    out = np.zeros(shape, dtype=np.uint8)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        k_ref = k_of_reference(ref)
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        ijk = to_index @ [*position, 1.0]
        np.testing.assert_allclose(ijk[:2], 0.0, atol=1e-3)  # a frame starts at voxel (0, 0, k)
        assert abs(ijk[2] - k_ref) < 1e-3
        label = index_of[segment_label[int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]]
        frame = pixels[f].T.astype(bool)  # [columns (i), rows (j)]
        assert not np.any(out[:, :, k_ref][frame])  # segments of a label map never overlap
        out[:, :, k_ref][frame] = label
    return out


def _labels(shape):
    """Known labels: blocks of four structures (one lateral, one without a SNOMED code)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:9, 3:10, 1:5] = 1
    labels[12:16, 2:6, 3:7] = 3
    labels[4:6, 12:15, 6:8] = 4
    labels[14:18, 10:14, 0:2] = 2
    return labels


@pytest.mark.parametrize("form", ["classic", "enhanced"])
def test_dicom_seg_reads_back_frame_by_frame_on_the_source_geometry(tmp_path, ct_phantom, form):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LAI"])
    if form == "classic":
        folder = write_dicom_series(tmp_path / "ct", hu, affine, patient_id="p", study_uid=STUDY, series_uid=SERIES)
        sources = [pydicom.dcmread(folder / name) for name in sorted(os.listdir(folder))]  # slice_000k.dcm holds k
        k_of_sop = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
        source = folder

        def k_of_reference(ref):
            return k_of_sop[ref.ReferencedSOPInstanceUID]
    else:
        order = _shuffled(hu.shape[2], 3)
        source = write_dicom_enhanced(tmp_path / "ct.dcm", hu, affine, patient_id="p", study_uid=STUDY,
                                      series_uid=SERIES, frame_order=order)
        sources = [pydicom.dcmread(source)]

        def k_of_reference(ref):
            assert ref.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
            return int(order[int(ref.ReferencedFrameNumber) - 1])  # stored frame f holds slice order[f]
    volume = read_volume(source)
    labels = _labels(volume.shape)
    out = write_dicom_seg(tmp_path / "out" / "seg.dcm", volume, labels, NAMES, software_version="9.9")
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == STUDY and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == "p" and seg.SeriesInstanceUID != SERIES
    assert "not for clinical use" in seg.SeriesDescription
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == SERIES
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence) == sorted(
        ds.SOPInstanceUID for ds in sources)
    # volume.array is in the reader's k order; the test's own k (from the writer) matches it here.
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(_mask_from_seg(seg, volume.shape, affine, k_of_reference), labels)
    # One segment per structure, each with its name and SNOMED CT anatomy.
    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert sorted(segments) == sorted(n for i, n in NAMES.items() if i)
    for segment in seg.SegmentSequence:
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
    kidney = segments["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.CodingSchemeDesignator) == ("64033007", "SCT")
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segments["my_structure"].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99VOLUMEVLM"
    assert segments["liver"].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"
    # highdicom, an independent reader, gives the same mask on the source images' geometry.
    back = hd.seg.segread(out)
    numbers = {name: int(s.SegmentNumber) for name, s in segments.items()}
    if form == "classic":
        by_instance = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
            segment_numbers=[numbers[NAMES[i]] for i in (1, 2, 3, 4)], combine_segments=True, relabel=True)
        rebuilt = np.transpose(by_instance, (2, 1, 0))
    else:
        by_frame = back.get_pixels_by_source_frame(
            source_sop_instance_uid=sources[0].SOPInstanceUID, source_frame_numbers=list(range(1, hu.shape[2] + 1)),
            segment_numbers=[numbers[NAMES[i]] for i in (1, 2, 3, 4)], combine_segments=True, relabel=True)
        rebuilt = np.zeros_like(labels)
        for f in range(hu.shape[2]):
            rebuilt[:, :, order[f]] = by_frame[f].T
    np.testing.assert_array_equal(rebuilt, labels)
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]


def test_dicom_seg_of_an_empty_mask_and_of_a_zip(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["PSL"])
    folder = write_dicom_series(tmp_path / "ct", hu, affine, patient_id="p")
    archive = zip_series(folder, tmp_path / "ct.zip")
    volume = read_volume(archive)  # the extraction folder is gone: the SEG uses the kept headers
    seg = pydicom.dcmread(write_dicom_seg(tmp_path / "seg.dcm", volume, np.zeros(volume.shape, np.uint8), NAMES))
    assert len(seg.SegmentSequence) == 4 and not seg.pixel_array.any()
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID


def test_dicom_seg_refuses_inputs_that_were_not_dicom_and_masks_off_the_grid(tmp_path, ct_phantom):
    hu, labels, affine = ct_phantom(shape=(20, 16, 8), affine=AFFINES["LPS"])
    nifti = read_volume(write_nifti(tmp_path / "ct.nii.gz", hu, affine))
    with pytest.raises(InputError, match=r"ct\.nii\.gz: DICOM SEG output needs a DICOM CT input .*nifti.*NIfTI") as err:
        write_dicom_seg(tmp_path / "seg.dcm", nifti, labels, NAMES)
    _one_line(err)
    dicom = read_volume(write_dicom_series(tmp_path / "ct", hu, affine, patient_id="p"))
    with pytest.raises(InputError, match="mask shape"):
        write_dicom_seg(tmp_path / "seg.dcm", dicom, labels[:, :, :4], NAMES)
    with pytest.raises(InputError, match=r"labels \[7\] that have no name"):
        write_dicom_seg(tmp_path / "seg.dcm", dicom, np.where(_labels(dicom.shape) == 1, 7, 0).astype(np.uint8), NAMES)
    with pytest.raises(InputError, match="must end with .dcm"):
        write_dicom_seg(tmp_path / "seg.nii.gz", dicom, labels, NAMES)
    assert not (tmp_path / "seg.dcm").exists()


# ---------------------------------------------------------------------- synthetic cohort


def test_synthetic_cohort_writes_enhanced_ct(tmp_path):
    from volumevlm.cli import main
    from volumevlm.data.synthetic import generate_cohort

    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "2", "--seed", "5", "--shape", "32,32,16",
                 "--dicom-fraction", "1", "--dicom-form", "enhanced", "--workers", "1", "--no-progress"]) == 0
    classic = tmp_path / "classic"
    generate_cohort(classic, n=2, seed=5, shape=(32, 32, 16), dicom_fraction=1.0, workers=1, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "c" / "cohort.json").read_text())["dicom_form"] == "enhanced"
    for row, other in zip(rows, [json.loads(line) for line in (classic / "manifest.jsonl").read_text().splitlines()]):
        assert row["format"] == "dicom" and row["image"].endswith(".dcm")
        ds = pydicom.dcmread(tmp_path / "c" / row["image"], stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and "NOT CLINICAL" in ds.SeriesDescription
        vol, same = read_volume(tmp_path / "c" / row["image"]), read_volume(classic / other["image"])
        np.testing.assert_array_equal(vol.array, same.array)
        np.testing.assert_allclose(vol.affine, same.affine, atol=1e-4)
        label = read_volume(tmp_path / "c" / row["label"], kind="label")
        np.testing.assert_allclose(label.affine, vol.affine, atol=0.01)
    with pytest.raises(InputError, match="--dicom-form"):
        generate_cohort(tmp_path / "bad", n=1, seed=0, dicom_form="jpeg", progress=False)
