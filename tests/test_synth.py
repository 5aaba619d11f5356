"""Synthetic cohort generator (synthetic, not clinical data): determinism, anatomy, geometry,
report/label consistency, codes, prevalence, CLI."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volumevlm.cli import main
from volumevlm.data.labels import LABEL_INDEX, LABELS
from volumevlm.data.synthetic import FINDINGS, check_report, generate_cohort, render_case, sample_case, sample_cohort
from volumevlm.data.synthetic.codes import FINDING_CODES
from volumevlm.data.synthetic.reports import finding_mentions
from volumevlm.io import check_same_geometry, read_volume, reorient
from volumevlm.text.phecodes import icd10_to_phecodes
from volumevlm.text.sections import SECTIONS, split_report

SHAPE = (48, 48, 24)
SEED = 11
N = 10


def read_manifest(folder):
    """Rows exactly as written (paths relative to the cohort folder)."""
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(out, n=N, seed=SEED, shape=SHAPE, dicom_fraction=0.2, workers=2, progress=False)
    return out, summary, read_manifest(out)


@pytest.fixture(scope="module")
def sampled():
    return [sample_case(5, i, SHAPE) for i in range(300)]


def _centroid_world(vol, label_map, index):
    ijk = np.argwhere(label_map == index)
    assert len(ijk), f"label {LABELS[index]} missing"
    return (vol.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].mean(axis=1)


def test_manifest_rows_are_complete_and_synthetic(cohort):
    out, summary, rows = cohort
    assert len(rows) == N == summary["cases"]
    for r in rows:
        for key in ("id", "image", "label", "report", "icd10", "phecodes", "findings", "finding_facts", "split", "age",
                    "sex", "contrast_phase", "spacing", "orientation", "format"):
            assert key in r, key
        assert r["synthetic"] is True
        assert set(r["findings"]) == set(FINDINGS)
        assert set(r["finding_facts"]) == {f for f, v in r["findings"].items() if v}
        assert (out / r["image"]).exists() and (out / r["label"]).exists()
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    # The cheap path (no voxels) gives the same rows as the written cohort.
    for r, s in zip(rows, sample_cohort(SEED, N, SHAPE)):
        keys = ("id", "split", "report", "icd10", "findings")
        assert [s[key] for key in keys] == [r[key] for key in keys]
    assert sum(r["format"] == "dicom" for r in rows) == 2
    assert "NOT CLINICAL" in (out / "README.txt").read_text()
    info = json.loads((out / "cohort.json").read_text())
    assert info["synthetic"] is True and "not clinical" in info["note"] and info["findings"] == list(FINDINGS)
    assert json.loads((out / "labels.json").read_text()) == {str(k): v for k, v in LABELS.items()}


def test_same_seed_gives_identical_cohort_for_any_worker_count(cohort, tmp_path):
    out, _, rows = cohort
    again = tmp_path / "again"
    generate_cohort(again, n=N, seed=SEED, shape=SHAPE, dicom_fraction=0.2, workers=1, progress=False)
    assert read_manifest(again) == rows
    for r in rows:
        a, b = read_volume(out / r["image"]), read_volume(again / r["image"])
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.affine, b.affine)
        la = np.asarray(nib.load(out / r["label"]).dataobj)
        lb = np.asarray(nib.load(again / r["label"]).dataobj)
        np.testing.assert_array_equal(la, lb)


def test_different_seed_differs():
    a, b = sample_case(1, 0, SHAPE), sample_case(2, 0, SHAPE)
    assert a["report"] != b["report"] or a["icd10"] != b["icd10"]
    ha, _, _ = render_case(a, 1, 0)
    hb, _, _ = render_case(b, 2, 0)
    assert not np.array_equal(ha, hb)


def test_written_files_equal_the_rendered_phantom(cohort):
    out, _, rows = cohort
    for r in rows:
        case = sample_case(SEED, int(r["id"].split("_")[1]), SHAPE)
        hu, lab, affine = render_case(case, SEED, int(r["id"].split("_")[1]))
        img = read_volume(out / r["image"])
        label = read_volume(out / r["label"], kind="label")
        check_same_geometry(img, label)
        assert img.orientation == r["orientation"]
        want_hu, want_aff = reorient(hu, affine, img.orientation)
        want_lab, _ = reorient(lab, affine, img.orientation)
        np.testing.assert_allclose(img.affine, want_aff, atol=0.01)
        np.testing.assert_array_equal(np.asarray(label.array).astype(np.uint8), want_lab)
        assert np.abs(img.array - want_hu).max() <= 0.51  # int16 storage rounds to whole HU


def test_stored_orientations_vary_and_dicom_is_dicom(cohort):
    out, _, rows = cohort
    orients = {r["orientation"] for r in rows if r["format"] == "nifti"}
    assert len(orients) >= 3 and orients != {"RAS"}
    for r in rows:
        if r["format"] == "dicom":
            assert (out / r["image"]).is_dir() and len(list((out / r["image"]).iterdir())) == SHAPE[2]
            assert read_volume(out / r["image"]).meta.get("format") == "dicom"
            assert r["orientation"] in ("LPS", "LPI")  # as scanners store axial series


def test_every_label_present_with_plausible_hu(cohort):
    out, _, rows = cohort
    for r in rows:
        img = read_volume(out / r["image"])
        lab = np.asarray(read_volume(out / r["label"], kind="label").array).astype(np.uint8)
        for index, name in LABELS.items():
            if index:
                assert (lab == index).sum() > 0, (r["id"], name)
        med = {name: float(np.median(img.array[lab == i])) for i, name in LABELS.items() if i}
        assert med["lung_left"] < -700 and med["lung_right"] < -700, r["id"]
        if r["contrast_phase"] == "non-contrast":
            if r["findings"]["hepatic_steatosis"]:
                assert med["liver"] < 45, r["id"]
            else:
                assert 40 <= med["liver"] <= 75, (r["id"], med["liver"])
        else:
            assert med["aorta"] > 90, (r["id"], med["aorta"])  # enhanced blood (non-contrast ~42 HU)
        if not r["findings"]["osteopenia"]:
            assert med["vertebrae"] > 150, (r["id"], med["vertebrae"])
        assert -40 <= med["urinary_bladder"] <= 50, (r["id"], med["urinary_bladder"])  # urine ~10 HU, partial volume at coarse grids
        # air outside the body, fat under the skin exist
        assert (img.array < -950).mean() > 0.05


def test_left_and_right_are_the_patients_in_world_ras(cohort):
    """RAS+: +x is the patient's right. Checked after reading back every stored orientation."""
    out, _, rows = cohort
    for r in rows:
        img = read_volume(out / r["image"])
        lab = np.asarray(read_volume(out / r["label"], kind="label").array)
        c = {name: _centroid_world(img, lab, LABEL_INDEX[name]) for name in
             ("kidney_left", "kidney_right", "lung_left", "lung_right", "liver", "spleen", "heart",
              "urinary_bladder", "vertebrae", "aorta", "inferior_vena_cava")}
        assert c["kidney_left"][0] < c["vertebrae"][0] < c["kidney_right"][0], r["id"]
        assert c["lung_left"][0] < c["lung_right"][0], r["id"]
        assert c["liver"][0] > c["spleen"][0], r["id"]
        assert c["aorta"][0] < c["inferior_vena_cava"][0], r["id"]  # aorta left of the IVC
        assert c["heart"][2] > c["liver"][2] > c["urinary_bladder"][2], r["id"]  # superior is +z
        assert c["kidney_left"][1] < c["urinary_bladder"][1], r["id"]  # kidneys posterior: -y
        assert c["vertebrae"][1] < c["aorta"][1], r["id"]


def test_reports_agree_with_labels_on_every_case(cohort, sampled):
    _, _, rows = cohort
    for r in rows + sampled:
        assert check_report(r["report"], r["findings"], r["finding_facts"]) == [], (r["id"], r["report"])
        sections = split_report(r["report"])
        assert list(sections)[:len(SECTIONS)] == list(SECTIONS) and "IMPRESSION" in sections
    hedged = sum(bool(f.get("uncertain")) for r in sampled for f in r["finding_facts"].values())
    assert hedged > 0
    reports = {r["report"] for r in sampled}
    assert len(reports) == len(sampled)


def test_checker_catches_inconsistent_reports(sampled):
    case = next(r for r in sampled if r["findings"]["splenomegaly"] and not r["finding_facts"]["splenomegaly"].get("uncertain"))
    text = case["report"]
    dropped = "\n".join(line for line in text.splitlines()
                        if not re.search(r"splenomegaly|spleen is enlarged", line, re.I))
    assert any("splenomegaly" in p for p in check_report(dropped, case["findings"], case["finding_facts"]))
    healthy = next(r for r in sampled if not r["findings"]["ascites"])
    assert check_report(healthy["report"] + "\nModerate volume ascites.", healthy["findings"], healthy["finding_facts"])
    hedge = check_report(healthy["report"] + "\nPossible trace free fluid.", healthy["findings"], healthy["finding_facts"])
    assert any("ascites" in p and "uncertain" in p for p in hedge)
    assert finding_mentions("No hydronephrosis or nephrolithiasis.")["kidney_stone"]["status"] == "negated"
    assert finding_mentions("Cholelithiasis without wall thickening.")["gallstones"]["status"] == "affirmed"
    assert finding_mentions("Cannot exclude a small renal cyst.")["renal_cyst"]["status"] == "uncertain"
    side = next(r for r in sampled if r["findings"]["kidney_stone"] and r["finding_facts"]["kidney_stone"]["laterality"] == "left"
                and not r["finding_facts"]["kidney_stone"].get("uncertain"))
    swapped = re.sub(r"\bleft\b", "right", re.sub(r"\bLeft\b", "Right", side["report"]))
    assert any("laterality" in p for p in check_report(swapped, side["findings"], side["finding_facts"]))


def test_codes_map_to_phecodes_with_imperfect_sensitivity_and_noise(sampled):
    missed = coded = spurious = 0
    for r in sampled:
        assert r["phecodes"] == icd10_to_phecodes(r["icd10"])
        for name, (codes, _) in FINDING_CODES.items():
            has = any(c in r["icd10"] for c in codes)
            if r["findings"][name]:
                coded += has
                missed += not has
            else:
                spurious += has
    sensitivity = coded / (coded + missed)
    assert 0.55 < sensitivity < 0.92
    assert spurious > 0
    assert any(c in r["icd10"] for r in sampled for c in ("I10", "E11.9", "E78.5"))  # codes no image shows


def test_every_finding_both_present_and_absent(sampled):
    rows = sampled[:200]
    for name in FINDINGS:
        k = sum(r["findings"][name] for r in rows)
        assert 0 < k < len(rows), (name, k)


def test_findings_co_occur_like_real_cohorts():
    cases = [sample_case(9, i, SHAPE) for i in range(1500)]

    def rate(name, cond):
        sel = [c for c in cases if cond(c)]
        return sum(c["findings"][name] for c in sel) / max(len(sel), 1)

    assert rate("ascites", lambda c: c["findings"]["cirrhosis"]) > 3 * rate("ascites", lambda c: not c["findings"]["cirrhosis"])
    assert rate("osteopenia", lambda c: c["age"] >= 70) > 3 * rate("osteopenia", lambda c: c["age"] < 50)
    with_cardiomegaly = rate("pleural_effusion", lambda c: c["findings"]["cardiomegaly"])
    assert with_cardiomegaly > 2 * rate("pleural_effusion", lambda c: not c["findings"]["cardiomegaly"])
    with_stone = rate("hydronephrosis", lambda c: c["findings"]["kidney_stone"])
    assert with_stone > 3 * rate("hydronephrosis", lambda c: not c["findings"]["kidney_stone"])


def test_spacing_is_field_of_view_over_shape():
    clinical = [sample_case(0, i, (512, 512, 200))["spacing"] for i in range(30)]
    for sx, sy, sz in clinical:
        assert 0.6 <= sx <= 1.0 and 0.6 <= sy <= 1.0 and 1.0 <= sz <= 5.0
    small = sample_case(0, 0, (128, 128, 64))["spacing"]
    big = sample_case(0, 0, (512, 512, 200))["spacing"]
    assert small[0] == pytest.approx(4 * big[0], rel=1e-3) and small[2] == pytest.approx(big[2] * 200 / 64, rel=1e-3)


def test_cli_writes_cohort_and_refuses_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["synth", "--out", str(out), "--n", "2", "--shape", "32,32,16", "--no-progress", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "not clinical" in printed and (out / "manifest.jsonl").exists()
    assert main(["synth", "--out", str(out), "--n", "2", "--shape", "32,32,16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err


# The organ each finding lives in (findings spread over the abdomen are left out).
HOST = {
    "hepatic_steatosis": ("liver",), "hepatomegaly": ("liver",), "cirrhosis": ("liver",), "liver_lesion": ("liver",),
    "splenomegaly": ("spleen",), "gallstones": ("gallbladder",), "renal_cyst": ("kidney_left", "kidney_right"),
    "kidney_stone": ("kidney_left", "kidney_right"), "hydronephrosis": ("kidney_left", "kidney_right"),
    "abdominal_aortic_aneurysm": ("aorta",), "atherosclerosis": ("aorta",), "pleural_effusion": ("lung_left", "lung_right"),
    "cardiomegaly": ("heart",), "vertebral_compression_fracture": ("vertebrae",),
}


def test_each_finding_is_rendered_where_it_belongs():
    """Counterfactual pairs: the same patient rendered with and without one finding.

    Each structure draws from its own random stream, so only the finding's own anatomy
    changes; every finding must change the image, in the expected direction.
    """
    import copy

    cases = [sample_case(4, i) for i in range(300)]
    base = next(c for c in cases if not any(c["findings"].values()) and c["contrast_phase"] == "non-contrast")
    hu0, lab0, _ = render_case(base, 4, 0)

    def region(lab, name):
        return lab == LABEL_INDEX[name]

    for name in FINDINGS:
        donor = next(c for c in cases if c["findings"][name] and not c["finding_facts"][name]["subtle"])
        cf = copy.deepcopy(base)
        cf["findings"][name] = 1
        cf["finding_facts"][name] = donor["finding_facts"][name]
        hu1, lab1, _ = render_case(cf, 4, 0)
        changed = np.abs(hu1 - hu0) > 30
        assert changed.sum() >= 5, name
        # Far from the finding's organ nothing moves (blur tails aside).
        if name in HOST:
            host = np.isin(lab0, [LABEL_INDEX[o] for o in HOST[name]]) | np.isin(lab1, [LABEL_INDEX[o] for o in HOST[name]])
            dist_mm = ndimage.distance_transform_edt(~host, sampling=base["spacing"])
            moved = np.abs(hu1 - hu0) > 1.0
            assert dist_mm[moved].max() <= 25.0, (name, float(dist_mm[moved].max()))
        if name == "hepatic_steatosis":
            assert np.median(hu1[region(lab1, "liver")]) < np.median(hu0[region(lab0, "liver")]) - 10
        if name == "hepatomegaly":
            assert region(lab1, "liver").sum() > 1.1 * region(lab0, "liver").sum()
        if name == "splenomegaly":
            assert region(lab1, "spleen").sum() > 1.3 * region(lab0, "spleen").sum()
        if name == "cardiomegaly":
            assert region(lab1, "heart").sum() > 1.2 * region(lab0, "heart").sum()
        if name == "abdominal_aortic_aneurysm":
            assert region(lab1, "aorta").sum() > 1.1 * region(lab0, "aorta").sum()
        if name == "pleural_effusion":
            lungs = lambda lab: region(lab, "lung_left").sum() + region(lab, "lung_right").sum()  # noqa: E731
            assert lungs(lab1) < lungs(lab0)
        if name == "vertebral_compression_fracture":
            assert region(lab1, "vertebrae").sum() < region(lab0, "vertebrae").sum()
        if name == "osteopenia":
            assert np.median(hu1[region(lab1, "vertebrae")]) < np.median(hu0[region(lab0, "vertebrae")])
        if name in ("gallstones", "kidney_stone"):
            organ = "gallbladder" if name == "gallstones" else ("kidney_left", "kidney_right")
            organ = (organ,) if isinstance(organ, str) else organ
            m0 = np.isin(lab0, [LABEL_INDEX[o] for o in organ])
            m1 = np.isin(lab1, [LABEL_INDEX[o] for o in organ])
            assert hu1[m1].max() > hu0[m0].max() + 100, name


def test_measurements_in_facts_match_the_rendered_anatomy():
    """Sizes stated in finding_facts (and reports) are what the phantom draws (within 15 %)."""
    shape = (96, 96, 96)
    cases = [sample_case(2, i, shape) for i in range(120)]

    def measure(name, case, lab):
        sp = case["spacing"]
        if name == "splenomegaly":
            z = np.argwhere(lab == LABEL_INDEX["spleen"])[:, 2]
            return (z.max() - z.min() + 1) * sp[2], case["finding_facts"][name]["length_mm"]
        if name == "hepatomegaly":
            z = np.argwhere(lab == LABEL_INDEX["liver"])[:, 2]
            return (z.max() - z.min() + 1) * sp[2], case["finding_facts"][name]["craniocaudal_span_mm"]
        if name == "cardiomegaly":
            xs = np.argwhere(lab == LABEL_INDEX["heart"])[:, 0]
            return (xs.max() - xs.min() + 1) * sp[0], case["finding_facts"][name]["transverse_diameter_mm"]
        area = (lab == LABEL_INDEX["aorta"]).sum(axis=(0, 1)) * sp[0] * sp[1]
        return 2 * np.sqrt(area.max() / np.pi), case["finding_facts"][name]["max_diameter_mm"]

    for name in ("splenomegaly", "hepatomegaly", "cardiomegaly", "abdominal_aortic_aneurysm"):
        i, case = next((i, c) for i, c in enumerate(cases) if c["findings"][name])
        _, lab, _ = render_case(case, 2, i)
        got, stated = measure(name, case, lab)
        assert abs(got - stated) <= 0.15 * stated, (name, got, stated)


def test_skipping_work_leaves_every_threshold_of_shapes_and_tubes_unchanged():
    """rho and _tube_mask evaluate only where a value below 1 is possible; every mask the phantom
    draws from them (thresholds at or below 1) must equal evaluating every voxel, bit for bit."""
    from volumevlm.data.synthetic.phantom import _Grid, _Shape, _tube_mask

    rng = np.random.default_rng(3)
    ax = np.arange(40) * 3.0 - 60
    warp = [[(rng.uniform(-4, 4), rng.normal(size=3) * 0.03, rng.uniform(0, 6.3)) for _ in range(2)] for _ in range(3)]
    g = _Grid(ax, ax + 7, ax[:30] * 1.5, (3.0, 3.0, 4.5), warp)
    full = (slice(None),) * 3
    thresholds = (1.0, 0.9, 0.75, 0.35)
    inside = 0
    for i in range(40):
        s = _Shape(rng, rng.uniform(-50, 50, 3), rng.uniform(3, 35, 3), rot_deg=60, bumpiness=0.1, nodular=0.025 * (i % 2))
        for box in (s.box(g), full):
            if box is None:
                continue
            fast, ref = s.rho(g, box), s.rho(g, box, skip=False)
            for t in thresholds:
                assert np.array_equal(fast < t, ref < t)
            assert np.array_equal(fast[ref < 1], ref[ref < 1])
            inside += int((ref < 1).sum())
        pts = rng.uniform(-60, 60, (int(rng.integers(2, 5)), 3))
        radii = rng.uniform(2, 20, len(pts))
        fast, ref = _tube_mask(g, full, pts, radii), _tube_mask(g, full, pts, radii, skip=False)
        assert np.array_equal(fast < 1, ref < 1) and np.array_equal(fast[ref < 1], ref[ref < 1])
        inside += int((ref < 1).sum())
    assert inside > 10_000
