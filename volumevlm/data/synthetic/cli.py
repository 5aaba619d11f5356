"""``volumevlm synth``: write a synthetic CT cohort (SYNTHETIC, NOT CLINICAL DATA).

Procedural torso phantoms with label maps, template radiology reports and simulated
ICD-10-CM codes / phecodes, for tests, demos and smoke benchmarks. Nothing in the
output comes from a patient.
"""

from __future__ import annotations

import argparse

from volumevlm.data.synthetic.cohort import DEFAULT_SHAPE, DICOM_FORMS, format_summary, generate_cohort
from volumevlm.errors import InputError


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        out = tuple(int(p) for p in parts)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z integers, got {text!r}") from err
    if len(out) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers X,Y,Z, got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a SYNTHETIC (not clinical) CT cohort: torso phantoms in HU with label maps, "
        "reports by organ system, ICD-10 codes and phecodes, manifest.jsonl."
    )
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--n", type=int, default=200, help="number of cases (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same cohort (default 0)")
    parser.add_argument("--shape", type=_shape, default=DEFAULT_SHAPE,
                        help="voxel grid X,Y,Z (default %s); spacing = field of view / shape, so a larger grid "
                             "gives finer voxels over the same anatomy" % ",".join(map(str, DEFAULT_SHAPE)))
    parser.add_argument("--dicom-fraction", type=float, default=0.0,
                        help="share of cases written as DICOM instead of NIfTI (default 0)")
    parser.add_argument("--dicom-form", choices=DICOM_FORMS, default="classic",
                        help="DICOM cases as a classic series folder (one file per slice, default) or one "
                             "Enhanced CT multi-frame .dcm file")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2); output does not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError("--n", f"need at least one case, got {args.n}")
    summary = generate_cohort(args.out, n=args.n, seed=args.seed, shape=args.shape,
                              dicom_fraction=args.dicom_fraction, dicom_form=args.dicom_form, workers=args.workers,
                              progress=not args.no_progress, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0
