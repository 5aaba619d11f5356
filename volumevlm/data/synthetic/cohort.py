"""The synthetic CT cohort: case sampling, rendering, files, manifest and summary.

SYNTHETIC, NOT CLINICAL DATA. The cohort is volumevlm's embedded default dataset and
smoke benchmark; no figure measured on it is a clinical accuracy.

Layout written by :func:`generate_cohort` into ``DIR``::

    manifest.jsonl      one JSON object per case (see :func:`sample_case`)
    labels.json         label index -> structure name
    cohort.json         generator version, seed, n, shape, date, findings, timing
    README.txt          what this is (and is not)
    images/<id>.nii.gz  int16 + scl_slope/scl_inter, varied stored orientation
    images/<id>/        a DICOM series folder, for the --dicom-fraction share of cases
    images/<id>.dcm     or one Enhanced CT (multi-frame) file per such case (--dicom-form enhanced)
    labels/<id>.nii.gz  uint8 label map in the same geometry as its image

Spacing is field of view / shape: the physical field of view is realistic (in-plane
320-480 mm, z 280-360 mm), so the default grid 128x128x64 gives about 2.5-3.8 mm
in-plane and 4.4-5.6 mm slices, and a clinical grid (512x512x200) 0.6-0.9 mm and
1.4-1.8 mm. Every case is a pure function of (seed, index, shape): results do not
depend on the number of workers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import multiprocessing
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from volumevlm.data.labels import LABELS
from volumevlm.data.manifest import read_manifest, write_manifest
from volumevlm.data.synthetic.codes import sample_codes
from volumevlm.data.synthetic.findings import CONTRAST_PHASES, FINDINGS, sample_findings, sample_patient
from volumevlm.data.synthetic.reports import write_report
from volumevlm.errors import GeometryError, InputError
from volumevlm.io.writers import write_text_atomic
from volumevlm.text.phecodes import icd10_to_phecodes

GENERATOR_VERSION = "1.0"
DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 64)
NOT_CLINICAL = "synthetic, not clinical data"
STORED_ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "LPI", "RPS", "LAI")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
# How DICOM cases are stored: a classic series (one file per slice) or one Enhanced CT
# multi-frame file (what current scanners export).
DICOM_FORMS = ("classic", "enhanced")

# Independent random streams per case, so that e.g. the report text does not change
# when the phantom's code draws one more number.
_STREAM_META, _STREAM_REPORT, _STREAM_CODES, _STREAM_IMAGE = range(4)


def case_id(index: int) -> str:
    return f"case_{index:05d}"


def _streams(seed: int, index: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), int(index)]).spawn(4)]


def _uid(seed: int, index: int, what: str) -> str:
    """A deterministic DICOM UID under the 2.25 (UUID-derived) root."""
    digest = hashlib.sha256(f"volumevlm-synth:{seed}:{index}:{what}".encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError) as err:
        raise InputError("--shape", f"expected three integers X,Y,Z, got {shape!r}") from err
    if len(out) != 3 or min(out) < 16 or max(out) > 1024:
        raise InputError("--shape", f"expected three integers X,Y,Z between 16 and 1024, got {shape!r}")
    return out


def sample_case(seed: int, index: int, shape=DEFAULT_SHAPE) -> dict:
    """Everything about one case except its voxels: cheap (no rendering).

    Returns a dict with the manifest fields (id, report, icd10, phecodes, findings,
    finding_facts, age, sex, contrast_phase, spacing [mm, stored axis order],
    orientation, synthetic) plus ``patient`` (demographics and latent conditions) and
    ``acquisition`` (field of view, offsets, noise, slice thickness) that the renderer needs.
    Split, file paths and format are assigned by :func:`generate_cohort`.
    """
    shape = _check_shape(shape)
    meta, rep, cod, _ = _streams(seed, index)
    patient = sample_patient(meta)
    findings, facts = sample_findings(meta, patient)
    phase = str(meta.choice(CONTRAST_PHASES, p=[0.3, 0.15, 0.55]))
    half_width = 150 + (patient["bmi"] - 20) * 2.6
    fov = float(max(meta.uniform(320, 480), 2 * min(half_width, 195) + 50))
    z_extent = float(meta.uniform(280, 360))
    top = float(meta.uniform(30, 50))  # lung bases above the right dome
    acquisition = {
        "fov_mm": round(fov, 2), "z_extent_mm": round(z_extent, 2), "top_mm": round(top, 2),
        "trunk_mm": round(z_extent - top - float(meta.uniform(10, 20)), 2),  # dome to pelvic floor
        "patient_offset_mm": [round(float(v), 2) for v in (meta.uniform(-12, 12), meta.uniform(-25, 5))],
        "table_offset_mm": [round(float(v), 2) for v in (meta.uniform(-5, 5), meta.uniform(-40, 40), meta.uniform(-450, -150))],
        "noise_sigma_hu": round(float(meta.uniform(5, 25)), 2),
        "slice_thickness_factor": round(float(meta.uniform(1.0, 1.5)), 3),
        "storage_intercept": float(meta.choice([0.0, -1024.0])),
    }
    orientation = str(meta.choice(STORED_ORIENTATIONS))
    spacing = [fov / shape[0], fov / shape[1], z_extent / shape[2]]
    thickness = spacing[2] * acquisition["slice_thickness_factor"]
    report, hedged = write_report(rep, findings, facts, contrast_phase=phase, slice_thickness_mm=thickness)
    for name in hedged:
        facts[name]["uncertain"] = True
    icd10 = sample_codes(cod, patient, findings, facts)
    return {
        "id": case_id(index),
        "synthetic": True,
        "age": patient["age"], "sex": patient["sex"], "bmi": patient["bmi"],
        "contrast_phase": phase,
        "findings": findings, "finding_facts": facts,
        "report": report, "icd10": icd10, "phecodes": icd10_to_phecodes(icd10),
        "shape": list(shape), "spacing": [round(v, 4) for v in spacing], "orientation": orientation,
        "slice_thickness_mm": round(thickness, 3), "noise_sigma_hu": acquisition["noise_sigma_hu"],
        "patient": patient, "acquisition": acquisition,
    }


def sample_cohort(seed: int, n: int, shape=DEFAULT_SHAPE) -> list[dict]:
    """Metadata, reports and codes of ``n`` cases with their splits, without rendering voxels.

    The rows equal those :func:`generate_cohort` writes for the same (seed, n, shape),
    minus the file fields (image, label, format); fast enough for thousands of cases.
    """
    split, _ = _assignments(seed, n, 0.0)
    rows = []
    for i in range(n):
        case = sample_case(seed, i, shape)
        case["split"] = split[i]
        rows.append(case)
    return rows


def render_case(case: dict, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels of a sampled case on the canonical RAS grid: (hu float32 [X,Y,Z], labels uint8, affine)."""
    from volumevlm.data.synthetic.phantom import render_phantom

    return render_phantom(case, tuple(case["shape"]), _streams(seed, index)[_STREAM_IMAGE])


def _assignments(seed: int, n: int, dicom_fraction: float) -> tuple[list[str], set[int]]:
    """Deterministic split per index (exact 70/15/15 counts, val and test non-empty for n >= 3)
    and the set of indices written as DICOM (round(fraction * n) of them)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, int(n)]))
    n_val = int(round(SPLIT_FRACTIONS["val"] * n))
    n_test = int(round(SPLIT_FRACTIONS["test"] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    order = rng.permutation(n)
    split = ["train"] * n
    for i in order[:n_val]:
        split[i] = "val"
    for i in order[n_val:n_val + n_test]:
        split[i] = "test"
    k = int(round(dicom_fraction * n))
    dicom = set(int(i) for i in rng.permutation(n)[:k])
    return split, dicom


def _build_case(job: tuple) -> dict:
    """Render and write one case; returns its manifest row. Runs in a worker process."""
    from volumevlm.io import read_volume, reorient, write_dicom_enhanced, write_dicom_series, write_nifti

    out, seed, index, shape, split, as_dicom, dicom_form = job
    out = Path(out)
    case = sample_case(seed, index, shape)
    hu, lab, affine = render_case(case, seed, index)
    cid = case["id"]
    label_rel = f"labels/{cid}.nii.gz"
    if as_dicom:
        image_rel = f"images/{cid}" + (".dcm" if dicom_form == "enhanced" else "")
        # Scanners store axial series with rows/columns along patient Left/Posterior.
        dcm_hu, dcm_affine = reorient(hu, affine, "LPS" if case["orientation"][2] == "S" else "LPI")
        write = write_dicom_enhanced if dicom_form == "enhanced" else write_dicom_series
        write(out / image_rel, dcm_hu, dcm_affine, patient_id=cid,
              series_description="SYNTHETIC CT - NOT CLINICAL DATA",
              study_uid=_uid(seed, index, "study"), series_uid=_uid(seed, index, "series"),
              slice_thickness=case["slice_thickness_mm"], slope=1.0, intercept=-1024.0)
        back = read_volume(out / image_rel)
        lab_out, lab_aff = reorient(lab, affine, back.orientation)
        if lab_out.shape != back.shape or not np.allclose(lab_aff, back.affine, atol=0.01):
            raise GeometryError(out / image_rel, "DICOM series read back in a geometry the label map cannot match")
        write_nifti(out / label_rel, lab_out, back.affine, dtype=np.uint8)
        orientation, spacing, fmt = back.orientation, [round(v, 4) for v in back.spacing], "dicom"
    else:
        image_rel = f"images/{cid}.nii.gz"
        img, aff = reorient(hu, affine, case["orientation"])
        lab_out, _ = reorient(lab, affine, case["orientation"])
        write_nifti(out / image_rel, np.round(img), aff, slope=1.0, intercept=case["acquisition"]["storage_intercept"])
        write_nifti(out / label_rel, lab_out, aff, dtype=np.uint8)
        orientation, spacing, fmt = case["orientation"], case["spacing"], "nifti"
    row = {k: v for k, v in case.items() if k not in ("patient", "acquisition")}
    row.update({"image": image_rel, "label": label_rel, "split": split, "format": fmt,
                "orientation": orientation, "spacing": spacing})
    ordered = ["id", "image", "label", "format", "split", "synthetic", "age", "sex", "bmi", "contrast_phase",
               "shape", "spacing", "orientation", "slice_thickness_mm", "noise_sigma_hu",
               "findings", "finding_facts", "icd10", "phecodes", "report"]
    return {k: row[k] for k in ordered}


README = """SYNTHETIC CT COHORT - NOT CLINICAL DATA
=======================================

Written by `volumevlm synth` (generator version {version}, seed {seed}, {n} cases, grid {shape}).

Every image, label map, report and diagnosis code here is synthetic: procedural torso
phantoms in Hounsfield units with randomly drawn findings, template reports and
simulated ICD-10-CM codes. Nothing comes from a patient. Use it to test and demonstrate
volumevlm; no number measured on it is a clinical accuracy.

Geometry: the physical field of view is realistic (in-plane 320-480 mm, z 280-360 mm
from the lung bases to the bladder) and spacing = field of view / grid, so this grid
gives {spacing}; `--shape 512,512,200` would give about 0.6-0.9 mm in-plane and 1.4-1.8 mm
slices over the same anatomy.

Files
- manifest.jsonl: one JSON object per case: id, image, label (paths relative to this
  folder), format (nifti | dicom), split, age, sex, contrast_phase, spacing (mm, stored
  axis order), orientation (stored axis codes), findings ({{name: 0|1}} for all
  {n_findings} findings), finding_facts (sizes in mm, HU, laterality, count, location;
  "uncertain": true where the report hedges), icd10, phecodes, report, synthetic: true.
- labels.json: label index -> structure name (TotalSegmentator naming).
- cohort.json: generator settings, finding list, timing.
- images/: NIfTI (int16 with scale/intercept, varied stored orientation), DICOM series folders
  or Enhanced CT multi-frame .dcm files (dicom_form in cohort.json).
- labels/: uint8 label maps, same geometry as their image.
"""


def generate_cohort(out, n: int, seed: int, shape=None, dicom_fraction: float = 0.0, workers: int = 2,
                    progress: bool = True, overwrite: bool = False, dicom_form: str = "classic") -> dict:
    """Write a synthetic (not clinical) CT cohort of ``n`` cases into ``out``; return its summary.

    shape: (X, Y, Z) voxels (default :data:`DEFAULT_SHAPE`); dicom_fraction: share of cases
    written as DICOM; dicom_form: "classic" (a series folder, one file per slice) or
    "enhanced" (one Enhanced CT multi-frame file); workers: processes (results are
    identical for any count).
    An existing non-empty ``out`` is refused unless ``overwrite``.
    """
    out = Path(out)
    shape = _check_shape(shape or DEFAULT_SHAPE)
    if int(n) < 1:
        raise InputError("--n", f"need at least one case, got {n}")
    if not 0.0 <= float(dicom_fraction) <= 1.0:
        raise InputError("--dicom-fraction", f"must be between 0 and 1, got {dicom_fraction}")
    if int(workers) < 1:
        raise InputError("--workers", f"must be at least 1, got {workers}")
    if dicom_form not in DICOM_FORMS:
        raise InputError("--dicom-form", f"must be one of {', '.join(DICOM_FORMS)}, got {dicom_form!r}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(out, "is not empty; choose a new directory or pass --overwrite")
        for sub in ("images", "labels"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    split, dicom = _assignments(seed, n, dicom_fraction)
    jobs = [(str(out), int(seed), i, shape, split[i], i in dicom, dicom_form) for i in range(n)]
    rows: dict[int, dict] = {}
    workers = min(int(workers), n)
    with _progress(progress, n) as advance:
        if workers == 1:
            for job in jobs:
                rows[job[2]] = _build_case(job)
                advance()
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(workers) as pool:
                for row in pool.imap_unordered(_build_case, jobs):
                    rows[int(row["id"].split("_")[1])] = row
                    advance()
    elapsed = time.perf_counter() - start

    write_manifest(out / "manifest.jsonl", [rows[i] for i in range(n)])
    write_text_atomic(out / "labels.json", json.dumps({str(k): v for k, v in LABELS.items()}, indent=2) + "\n")
    info = {
        "generator": "volumevlm.data.synthetic", "version": GENERATOR_VERSION, "note": NOT_CLINICAL,
        "synthetic": True, "seed": int(seed), "n": int(n), "shape": list(shape),
        "dicom_fraction": float(dicom_fraction), "dicom_form": dicom_form, "findings": list(FINDINGS),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2), "workers": workers,
    }
    write_text_atomic(out / "cohort.json", json.dumps(info, indent=2) + "\n")
    write_text_atomic(out / "README.txt", README.format(version=GENERATOR_VERSION, seed=seed, n=n,
                                                         shape="x".join(map(str, shape)), n_findings=len(FINDINGS),
                                                         spacing=_spacing_range(shape)))
    return summarize_cohort(out)


def _spacing_range(shape) -> str:
    """Voxel size range (mm) this grid gives over the sampled fields of view, for the README."""
    x0, x1 = 320 / max(shape[0], shape[1]), 480 / min(shape[0], shape[1])
    z0, z1 = 280 / shape[2], 360 / shape[2]
    return f"about {x0:.2f}-{x1:.2f} mm in-plane and {z0:.2f}-{z1:.2f} mm between slices"


class _progress:
    """A Rich progress bar (or nothing) exposing one ``advance()`` callable."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("synthetic cases (not clinical data)"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn())
        self.bar.__enter__()
        task = self.bar.add_task("synth", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize_cohort(folder) -> dict:
    """Facts of a written cohort: cases, splits, finding prevalence, frequent codes, disk use, timing."""
    folder = Path(folder)
    rows = list(read_manifest(folder / "manifest.jsonl", strict=True))
    info_path = folder / "cohort.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    n = len(rows)
    image_bytes = sum(_disk_bytes(Path(r["image"])) for r in rows)
    label_bytes = sum(_disk_bytes(Path(r["label"])) for r in rows)
    return {
        "folder": str(folder), "note": NOT_CLINICAL, "cases": n,
        "splits": dict(Counter(r["split"] for r in rows)),
        "formats": dict(Counter(r["format"] for r in rows)),
        "orientations": dict(Counter(r["orientation"] for r in rows)),
        "contrast_phases": dict(Counter(r["contrast_phase"] for r in rows)),
        "prevalence": {f: round(sum(r["findings"][f] for r in rows) / max(n, 1), 3) for f in FINDINGS},
        "top_icd10": Counter(c for r in rows for c in r["icd10"]).most_common(10),
        "top_phecodes": Counter(c for r in rows for c in r["phecodes"]).most_common(10),
        "shape": info.get("shape"), "seed": info.get("seed"),
        "image_bytes": image_bytes, "label_bytes": label_bytes,
        "bytes_per_case": round((image_bytes + label_bytes) / max(n, 1)),
        "elapsed_s": info.get("elapsed_s"),
        "seconds_per_case": round(info["elapsed_s"] / max(n, 1), 3) if info.get("elapsed_s") is not None else None,
    }


def format_summary(summary: dict) -> str:
    """A short human-readable report of :func:`summarize_cohort`'s dict."""
    s = summary
    lines = [
        f"Synthetic CT cohort ({NOT_CLINICAL}): {s['folder']}",
        f"  cases {s['cases']}  splits {s['splits']}  formats {s['formats']}  grid {s.get('shape')}  seed {s.get('seed')}",
        f"  contrast phases {s['contrast_phases']}",
        f"  on disk: images {s['image_bytes'] / 1e6:.1f} MB, labels {s['label_bytes'] / 1e6:.1f} MB, "
        f"{s['bytes_per_case'] / 1e6:.2f} MB per case",
    ]
    if s.get("elapsed_s") is not None:
        lines.append(f"  time: {s['elapsed_s']:.1f} s ({s['seconds_per_case']:.2f} s per case)")
    lines.append("  finding prevalence:")
    for name, p in sorted(s["prevalence"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {name:<32} {p:6.1%}")
    lines.append("  most frequent ICD-10: " + ", ".join(f"{c} ({k})" for c, k in s["top_icd10"]))
    lines.append("  most frequent phecodes: " + ", ".join(f"{c} ({k})" for c, k in s["top_phecodes"]))
    return "\n".join(lines)
