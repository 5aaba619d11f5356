"""The ``volumevlm`` console script: one entry point, one sub-command per verb.

Sub-commands register themselves through :data:`COMMANDS`; each module keeps its own
argument parsing (``add_arguments``) and behaviour (``run``), imported only when used
so ``volumevlm --help`` stays fast. User-facing errors (:class:`VolumeVLMError`) print
one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from volumevlm import __version__
from volumevlm.errors import VolumeVLMError

# name -> (where add_arguments(parser) and run(args) -> int live, help). "module" names a
# module holding both; "module:attr" an attribute of it that has both (several verbs
# sharing one module).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("volumevlm.data.synthetic.cli", "write a synthetic CT cohort (not clinical data)"),
    "inspect": ("volumevlm.io.inspect", "print JSON facts and problems of a CT file or DICOM series"),
    "adapt": ("volumevlm.data.adapters", "turn a Merlin / CT-RATE / TotalSegmentator folder into a manifest"),
    "train": ("volumevlm.train.cli", "pretrain with Hydra overrides, e.g. experiment=demo data.root=DIR output_dir=OUT"),
    "evaluate": ("volumevlm.eval.evaluate", "run every evaluation protocol of a checkpoint on a cohort split -> OUT/metrics.json + plots"),
    "demo": ("volumevlm.demo", "run the end-to-end demo on the embedded synthetic cohort"),
    "export-bundle": ("volumevlm.export.cli", "write a MONAI bundle (segmentation head or image encoder) from a checkpoint"),
    "index": ("volumevlm.inference.index", "build a retrieval index of reports / images, or query one"),
    "predict": ("volumevlm.inference.batch", "batch inference over a manifest (Lightning, multi-GPU, resumable)"),
    "embed": ("volumevlm.inference.commands:embed", "image embeddings of CT volumes -> .safetensors / .npy / .npz / .json"),
    "zero-shot": ("volumevlm.inference.commands:zero_shot", "zero-shot finding probabilities of CT volumes"),
    "phenotypes": ("volumevlm.inference.commands:phenotypes", "most likely phecodes of CT volumes"),
    "segment": ("volumevlm.inference.commands:segment", "label masks of CT volumes (+ --statistics: mL and mean HU per structure)"),
    "retrieve": ("volumevlm.inference.commands:retrieve", "nearest reports / images of a retrieval index to CT volumes"),
    "report": ("volumevlm.inference.commands:report", "generated report text of CT volumes, organ system by organ system"),
    "serve": ("volumevlm.serve.cli", "HTTP service for the inference verbs"),
}


def load_command(name: str):
    """The object with add_arguments / run behind command ``name`` (imported now)."""
    module_name, _, attr = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volumevlm", description=__doc__.splitlines()[0])
    parser.add_argument("-V", "--version", action="version", version=f"volumevlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        # Parsers are built lazily per command so a broken optional dependency of one
        # verb does not break the others.
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"volumevlm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    try:
        module = load_command(name)
    except ImportError as err:
        # A verb whose optional dependency is missing: one line, the other verbs still work.
        print(f"error: volumevlm {name} is unavailable ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f"volumevlm {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except VolumeVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
