"""``volumevlm export-bundle``: write (or check) a MONAI bundle.

    volumevlm export-bundle --checkpoint CKPT --out DIR [--task segmentation|embedding]
    volumevlm export-bundle --check DIR
"""

from __future__ import annotations

import argparse
import json

from volumevlm.errors import VolumeVLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a volumevlm checkpoint directory (what `volumevlm train` exports)")
    parser.add_argument("--out", help="the bundle directory to write (an existing bundle there is replaced)")
    parser.add_argument(
        "--task",
        choices=("segmentation", "embedding"),
        default="segmentation",
        help="segmentation: the checkpoint's segmentation head (default); embedding: the image encoder",
    )
    parser.add_argument("--no-torchscript", action="store_true", help="do not try to write models/model.ts")
    parser.add_argument(
        "--check",
        metavar="DIR",
        help="only check an existing bundle: required files and metadata.json's fields (exit 2 on a problem)",
    )


def run(args: argparse.Namespace) -> int:
    from volumevlm.export.bundle import check_bundle, export_bundle

    if args.check:
        problems = check_bundle(args.check)
        if problems:
            for problem in problems[1:]:
                print(f"problem: {problem}")
            raise VolumeVLMError(f"bundle check failed ({len(problems)} problem(s)): {problems[0]}")
        print(f"{args.check}: bundle complete (files and metadata.json fields as the MONAI bundle specification requires)")
        return 0
    if not args.checkpoint or not args.out:
        raise VolumeVLMError("export-bundle: needs --checkpoint CKPT and --out DIR (or --check DIR)")
    result = export_bundle(args.checkpoint, args.out, task=args.task, torchscript=not args.no_torchscript)
    summary = {
        "bundle": str(result.directory),
        "task": result.task,
        "files": result.files,
        "torchscript": result.torchscript_note,
    }
    print(json.dumps(summary, indent=2))
    return 0
