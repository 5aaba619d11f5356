"""One-shot CLI verbs, thin wrappers over the Python API of a checkpoint::

    volumevlm embed       -m CKPT -i IN... [-o OUT.safetensors|.npy|.npz|.json]
    volumevlm zero-shot   -m CKPT -i IN... [-o OUT.json] [--findings a,b] [--prompts SET_OR_YAML] [--anatomy]
    volumevlm phenotypes  -m CKPT -i IN... [-o OUT.json] [--top-k N|all] [--anatomy]
    volumevlm segment     -m CKPT -i IN... -o MASK.nii.gz|SEG.dcm|FOLDER [--format nifti|dicom-seg] [--statistics STATS.json|.csv]
    volumevlm retrieve    -m CKPT -i IN... --index DIR [-k N] [--kind report|image|all] [-o OUT.json]
    volumevlm report      -m CKPT -i IN... [-o OUT.txt|.json] [--max-new-tokens N] [--num-beams N]
                          [--consistent-candidates N] [--bank-fallback | --no-bank-fallback]

IN is anything :func:`volumevlm.io.read_volume` reads: NIfTI, NRRD / MHA, a DICOM series
folder or a ``.zip`` of one (``-i`` takes several, or repeat it). Each verb calls the
:class:`~volumevlm.inference.checkpoint.VolumeVLM` method of its name on the inputs in the order
given and names each result by the input as typed. Every file is written atomically
(a temporary file beside it, then renamed, so an older output is replaced whole) and
every JSON document carries the not-for-clinical-use statement under "note". Problems
(a missing or unreadable input, an unknown output suffix, a checkpoint without the head
a verb needs) are one-line errors; ``volumevlm`` prints them and exits with status 2.
What can be checked without reading an image (paths, suffixes, heads, the index) is
checked before any model runs; only ``segment`` writes as it goes (one mask per input,
so an unreadable later input leaves the earlier masks written).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.io.writers import write_atomic

EMBEDDING_FORMAT = "volumevlm-embeddings"
EMBED_SUFFIXES = {".safetensors": "safetensors", ".npy": "npy", ".npz": "npz", ".json": "json"}
JSON_SUFFIXES = {".json": "json"}
REPORT_SUFFIXES = {".txt": "text", ".json": "json"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Stripped from an input's name to name its mask in an output folder.
INPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".dcm")


@dataclass(frozen=True)
class Verb:
    """What :mod:`volumevlm.cli` needs of a sub-command."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------- shared pieces


def _common(parser: argparse.ArgumentParser, output_help: str, output_required: bool = False) -> None:
    parser.add_argument("-m", "--checkpoint", required=True, help="checkpoint directory (e.g. OUT/model of volumevlm train)")
    parser.add_argument("-i", "--input", dest="inputs", action="extend", nargs="+", required=True, metavar="IN",
                        help="CT volume(s): NIfTI, NRRD/MHA, DICOM series folder or .zip (several, or repeat -i)")
    parser.add_argument("-o", "--output", required=output_required, help=output_help)
    parser.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_inputs(inputs: Sequence[str]) -> list[str]:
    """The inputs as typed, each existing and given once (else a one-line error naming it)."""
    seen: set[Path] = set()
    for text in inputs:
        path = Path(text).expanduser()
        if not path.exists():
            raise InputError(text, "no such file or folder")
        key = path.resolve()
        if key in seen:
            raise InputError(text, "given twice as an input")
        seen.add(key)
    return list(inputs)


def output_format(path: str | os.PathLike, formats: Mapping[str, str], verb: str) -> str:
    """The format an output path asks for by its suffix; another suffix is a one-line error."""
    name = Path(path).name.lower()
    for suffix in sorted(formats, key=len, reverse=True):
        if name.endswith(suffix):
            return formats[suffix]
    raise InputError(path, f"unsupported output suffix for {verb} (use {', '.join(formats)})")


def _not_an_input(output: str | os.PathLike, inputs: Sequence[str]) -> None:
    # Inputs are never modified: an output path that is one of them is refused.
    target = Path(output).expanduser().resolve()
    for text in inputs:
        if Path(text).expanduser().resolve() == target:
            raise InputError(output, "is also an input; refusing to overwrite an input")


def _load(args: argparse.Namespace):
    from volumevlm.inference.checkpoint import load

    return load(args.checkpoint, device=resolve_device(args.device))


def document(model, **fields: Any) -> dict[str, Any]:
    """A JSON output: the not-for-clinical-use note, the checkpoint's data note (e.g. that
    it was trained on the synthetic cohort), the checkpoint, then ``fields``."""
    import volumevlm
    from volumevlm.inference.index import data_note

    doc: dict[str, Any] = {"note": volumevlm.NOT_FOR_CLINICAL_USE}
    note = data_note(model)
    if note:
        doc["data_note"] = note
    source = getattr(model, "source", None)
    doc["checkpoint"] = None if source is None else str(Path(source).expanduser().resolve())
    doc.update(fields)
    return doc


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, doc: Any) -> Path:
    from volumevlm.io.writers import write_text_atomic

    return write_text_atomic(path, _json_text(doc))


def _wrote(path: str | os.PathLike) -> None:
    print(f"wrote {path}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


# ---------------------------------------------------------------------- embed


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "embeddings file: .safetensors ('embeddings' [N, E], sources in its metadata), .npy ([N, E]), "
                    ".npz (embeddings, sources) or .json; rows in input order (default: JSON on stdout)")


def _embed_run(args: argparse.Namespace) -> int:
    import numpy as np

    import volumevlm

    inputs = check_inputs(args.inputs)
    fmt = None
    if args.output:
        fmt = output_format(args.output, EMBED_SUFFIXES, "embed")
        _not_an_input(args.output, inputs)
    model = _load(args)
    emb = model.embed(inputs).float().cpu().contiguous()  # [N, E], unit rows, input order
    if fmt in (None, "json"):
        doc = document(model, embed_dim=int(emb.shape[1]),
                       embeddings=[{"source": s, "embedding": row} for s, row in zip(inputs, emb.tolist())])
        if fmt is None:
            print(_json_text(doc), end="")
            return 0
        write_json(args.output, doc)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        meta = document(model)
        metadata = {"format": EMBEDDING_FORMAT, "sources": json.dumps(inputs, ensure_ascii=False),
                    **{k: str(v) for k, v in meta.items() if v is not None}}
        write_atomic(args.output, lambda tmp: save_file({"embeddings": emb}, tmp, metadata=metadata))
    else:
        array = emb.numpy()

        def write_numpy(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a handle: np.save would append .npy to a name
                if fmt == "npy":
                    np.save(fh, array)
                else:
                    np.savez(fh, embeddings=array, sources=np.array(inputs), note=np.array(volumevlm.NOT_FOR_CLINICAL_USE))

        write_atomic(args.output, write_numpy)
    _wrote(args.output)
    return 0


# ---------------------------------------------------------------------- zero-shot


def _zero_shot_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "JSON {results: {input: {finding: P(present)}}} (default: a table on stdout)")
    parser.add_argument("--findings", help="comma-separated findings to score (default: every finding of the prompt set)")
    parser.add_argument("--prompts", help="prompt set: bundled name or YAML file (default: the checkpoint's own, else synthetic)")
    parser.add_argument("--anatomy", action="store_true",
                        help="read each finding in its organ system's embedding (needs the anatomy and segmentation heads)")


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise VolumeVLMError(f"findings: no finding names in {text!r}")
    return items


def _zero_shot_run(args: argparse.Namespace) -> int:
    from volumevlm.inference.pipeline import resolve_prompt_set

    inputs = check_inputs(args.inputs)
    if args.output:
        output_format(args.output, JSON_SUFFIXES, "zero-shot")
        _not_an_input(args.output, inputs)
    findings = split_list(args.findings)
    model = _load(args)
    prompt_set = resolve_prompt_set(args.prompts, model)  # a bad prompt set fails before any image is read
    for head in ("anatomy", "segmentation") if args.anatomy else ():
        model.head(head)  # a missing head fails before any image is read, naming the recipe
    results = model.zero_shot(inputs, findings=findings, prompts=prompt_set, anatomy=args.anatomy)
    by_source = dict(zip(inputs, results))
    if not args.output:
        names = list(results[0])
        rows = [[name, *(f"{by_source[s][name]:.4f}" for s in inputs)] for name in names]
        print(_table(["finding", *(Path(s).name for s in inputs)], rows, [False, *([True] * len(inputs))]))
        return 0
    write_json(args.output, document(model, prompt_set=prompt_set.name, findings=list(results[0]), results=by_source))
    _wrote(args.output)
    return 0


# ---------------------------------------------------------------------- phenotypes


def _top_k(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k: a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--top-k: a positive integer or 'all', got {text!r}")
    return value


def _phenotypes_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "JSON {results: {input: [{phecode, description, probability}]}} (default: a table on stdout)")
    parser.add_argument("--top-k", type=_top_k, default=10, help="most likely codes per input, or 'all' (default 10)")
    parser.add_argument("--anatomy", action="store_true",
                        help="the anatomy head's classifiers on the organs the model segments (needs the anatomy and "
                             "segmentation heads)")


def _phenotypes_run(args: argparse.Namespace) -> int:
    inputs = check_inputs(args.inputs)
    if args.output:
        output_format(args.output, JSON_SUFFIXES, "phenotypes")
        _not_an_input(args.output, inputs)
    model = _load(args)
    if args.anatomy:  # a missing head or classifier fails before any image is read, naming the recipe
        from volumevlm.models.anatomy import NO_PHENOTYPES

        model.head("segmentation")
        if not model.head("anatomy").phecodes:
            raise VolumeVLMError(NO_PHENOTYPES)
    results = model.phenotypes(inputs, top_k=args.top_k, anatomy=args.anatomy)
    by_source = {s: [{"phecode": c, "description": d, "probability": p} for c, d, p in ranked]
                 for s, ranked in zip(inputs, results)}
    if not args.output:
        for number, source in enumerate(inputs):
            rows = [[r["phecode"], f"{r['probability']:.4f}", r["description"]] for r in by_source[source]]
            print(("\n" if number else "") + source)
            print(_table(["phecode", "probability", "description"], rows, [False, True, False]))
        return 0
    write_json(args.output, document(model, top_k=args.top_k, anatomy=args.anatomy, results=by_source))
    _wrote(args.output)
    return 0


# ---------------------------------------------------------------------- segment


SEGMENT_FORMATS = ("nifti", "dicom-seg")
DICOM_SEG_SUFFIX = ".dcm"


def _segment_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, "mask file (.nii.gz / .nii, or .dcm for a DICOM SEG of a DICOM input) for one input, or a "
                    "folder (one <input name>.nii.gz, or .dcm with --format dicom-seg, each)", output_required=True)
    parser.add_argument("--format", choices=SEGMENT_FORMATS, default=None,
                        help="nifti, or dicom-seg: a DICOM Segmentation referencing the source images, for DICOM "
                             "inputs (series folder, its .zip, enhanced CT file); default: from the output's suffix")
    parser.add_argument("--statistics", metavar="STATS",
                        help="also write per-structure voxels, volume (mL) and mean HU: .json or .csv (and print them)")


def input_stem(source: str) -> str:
    """A file-name stem for an input: its name without the image suffix, made safe."""
    name = Path(source.rstrip("/\\")).name
    for suffix in INPUT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"


def segment_format(output: str, fmt: str | None) -> str:
    """The mask format: ``fmt`` when given (it must agree with a file name's suffix),
    else "dicom-seg" for a .dcm output and "nifti" for anything else."""
    name = Path(output).name.lower()
    by_suffix = "dicom-seg" if name.endswith(DICOM_SEG_SUFFIX) else ("nifti" if name.endswith(NIFTI_SUFFIXES) else None)
    if fmt is None:
        return by_suffix or "nifti"
    if by_suffix is not None and by_suffix != fmt:
        raise InputError(output, f"--format {fmt} does not match the output's suffix (use "
                                 f"{'.dcm' if fmt == 'dicom-seg' else '.nii.gz or .nii'})")
    return fmt


def mask_paths(output: str, inputs: Sequence[str], fmt: str = "nifti") -> list[Path]:
    """Where each input's mask goes: ``output`` itself when it is a mask file name (one
    input; .nii.gz / .nii, or .dcm for a DICOM SEG), else ``output/<input stem>.nii.gz``
    (``.dcm`` for ``fmt="dicom-seg"``); clashes are one-line errors."""
    out = Path(output).expanduser()
    suffixes = (DICOM_SEG_SUFFIX,) if fmt == "dicom-seg" else NIFTI_SUFFIXES
    if out.name.lower().endswith(suffixes):
        if len(inputs) > 1:
            raise InputError(output, f"{len(inputs)} inputs need an output folder, not one mask file")
        if out.is_dir():
            raise InputError(output, f"is a folder; a mask file name ending in {' or '.join(suffixes)} was expected")
        return [out]
    if out.suffix and not out.is_dir():
        raise InputError(output, "unsupported output suffix for segment (use .nii.gz or .nii for a file, .dcm for a "
                                 "DICOM SEG, or a folder)")
    if out.exists() and not out.is_dir():
        raise InputError(output, "exists and is not a folder")
    paths, owner = [], {}
    for source in inputs:
        path = out / f"{input_stem(source)}{suffixes[0]}"
        if path.name in owner:
            raise InputError(source, f"would write the same mask {path} as {owner[path.name]}; segment them separately")
        owner[path.name] = source
        paths.append(path)
    return paths


def _may_be_dicom(source: str) -> bool:
    """Whether an input can be DICOM by its path alone (a folder, a .zip, a DICOM file):
    lets a NIfTI input asking for a DICOM SEG fail before the model loads."""
    from volumevlm.io.dicom import is_dicom_file

    path = Path(source).expanduser()
    return path.is_dir() or path.name.lower().endswith(".zip") or is_dicom_file(path)


def _segment_run(args: argparse.Namespace) -> int:
    from volumevlm.inference.pipeline import mask_to_dicom_seg
    from volumevlm.inference.statistics import format_statistics, statistics_format, structure_statistics, write_statistics
    from volumevlm.io import read_volume
    from volumevlm.io.dicom_seg import dicom_source_of
    from volumevlm.models.segmentation import read_label_names, save_segmentation

    inputs = check_inputs(args.inputs)
    fmt = segment_format(args.output, args.format)
    targets = mask_paths(args.output, inputs, fmt)
    for target in targets:
        _not_an_input(target, inputs)
    if fmt == "dicom-seg":
        for source in inputs:
            if not _may_be_dicom(source):
                raise InputError(source, "DICOM SEG output needs a DICOM CT input (a series folder, its .zip or an "
                                         "enhanced CT file); write the mask as NIfTI (.nii.gz) instead")
    if args.statistics:
        statistics_format(args.statistics)
        _not_an_input(args.statistics, inputs)
    model = _load(args)
    model.head("segmentation")  # a checkpoint without the head: its one-line error, before any input is read
    rows: list[dict[str, Any]] = []
    for source, target in zip(inputs, targets):
        volume = read_volume(source)  # read once: the mask's geometry and the HU of the statistics
        if fmt == "dicom-seg":
            dicom_source_of(volume, target)  # e.g. a zip of NIfTI files: refused before the model runs
        mask = model.segment(volume)
        if fmt == "dicom-seg":
            mask_to_dicom_seg(volume, mask, out=target)
        else:
            save_segmentation(mask, target)
        _wrote(target)
        if args.statistics:
            rows.extend({"source": source, **row} for row in structure_statistics(mask, volume, read_label_names(mask)))
    if args.statistics:
        info = {key: value for key, value in document(model).items() if key != "note"}
        write_statistics(rows, args.statistics, info={**info, "masks": {s: str(t) for s, t in zip(inputs, targets)}})
        print(format_statistics(rows))
        _wrote(args.statistics)
    return 0


# ---------------------------------------------------------------------- retrieve


def _retrieve_arguments(parser: argparse.ArgumentParser) -> None:
    from volumevlm.inference.index import KINDS

    _common(parser, "JSON {results: {input: [hits, best first]}} (default: a table on stdout)")
    parser.add_argument("--index", required=True, help="retrieval index folder (volumevlm index build)")
    parser.add_argument("-k", type=int, default=5, help="hits per input (default 5)")
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="report", help="entries to search (default report)")


def _retrieve_run(args: argparse.Namespace) -> int:
    from volumevlm.inference.index import RetrievalIndex

    inputs = check_inputs(args.inputs)
    if args.output:
        output_format(args.output, JSON_SUFFIXES, "retrieve")
        _not_an_input(args.output, inputs)
    if args.k < 1:
        raise VolumeVLMError(f"retrieve: -k must be a positive integer, got {args.k}")
    index = RetrievalIndex.open(args.index)
    model = _load(args)
    kind = None if args.kind == "all" else args.kind
    results = model.retrieve(inputs, k=args.k, index=index, kind=kind)
    by_source = dict(zip(inputs, results))
    if not args.output:
        for number, source in enumerate(inputs):
            rows = [[str(h["rank"]), f"{h['score']:+.4f}", h["kind"], str(h["id"]),
                     " ".join(str(h.get("text") or h.get("source") or "").split())[:100]] for h in by_source[source]]
            print(("\n" if number else "") + source)
            print(_table(["rank", "score", "kind", "id", "text / source"], rows, [True, True, False, False, False]))
        return 0
    write_json(args.output, document(model, index=str(index.folder.resolve()), kind=args.kind, k=args.k, results=by_source))
    _wrote(args.output)
    return 0


# ---------------------------------------------------------------------- report


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, ".txt (the reports under a '== input ==' line each) or .json ({results: {input: {report, "
                    "sections}}}) (default: the text on stdout)")
    parser.add_argument("--max-new-tokens", type=int, help="longest generated text per section (default: the head's)")
    parser.add_argument("--num-beams", type=int, help="beam search width (default: the head's)")
    parser.add_argument("--consistent-candidates", type=int,
                        help="write each section N ways and keep the one the labeler reads as the image's findings "
                             "(default: the head's; 1 = the decoder's first choice)")
    parser.add_argument("--bank-fallback", action=argparse.BooleanOptionalAction, default=None,
                        help="take a section the decoder cannot write consistently with the image's findings from "
                             "the head's section bank of training-report texts (default: the head's)")


def report_text(reports: Mapping[str, str]) -> str:
    """The reports as one text: the not-for-clinical-use line, then per input a
    ``== input ==`` line and its report."""
    import volumevlm

    blocks = [f"== {source} ==\n{text.strip()}\n" for source, text in reports.items()]
    return f"{volumevlm.NOT_FOR_CLINICAL_USE}\n\n" + "\n".join(blocks)


def _report_run(args: argparse.Namespace) -> int:
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.text.sections import split_report

    inputs = check_inputs(args.inputs)
    fmt = None
    if args.output:
        fmt = output_format(args.output, REPORT_SUFFIXES, "report")
        _not_an_input(args.output, inputs)
    generation = {key: value for key, value in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams),
                                                ("consistent_candidates", args.consistent_candidates),
                                                ("bank_fallback", args.bank_fallback))
                  if value is not None}
    model = _load(args)
    model.head("report")  # a checkpoint without the head: its one-line error, before any input is read
    reports = dict(zip(inputs, model.generate_report(inputs, **generation)))
    if fmt is None:
        print(report_text(reports), end="")
        return 0
    if fmt == "text":
        write_text_atomic(args.output, report_text(reports))
    else:
        results = {source: {"report": text, "sections": split_report(text)} for source, text in reports.items()}
        write_json(args.output, document(model, results=results))
    _wrote(args.output)
    return 0


# ---------------------------------------------------------------------- the verbs (volumevlm.cli names them "module:attr")

embed = Verb(_embed_arguments, _embed_run)
zero_shot = Verb(_zero_shot_arguments, _zero_shot_run)
phenotypes = Verb(_phenotypes_arguments, _phenotypes_run)
segment = Verb(_segment_arguments, _segment_run)
retrieve = Verb(_retrieve_arguments, _retrieve_run)
report = Verb(_report_arguments, _report_run)

__all__ = [
    "Verb",
    "check_inputs",
    "document",
    "embed",
    "input_stem",
    "mask_paths",
    "output_format",
    "phenotypes",
    "report",
    "report_text",
    "resolve_device",
    "retrieve",
    "segment",
    "write_json",
    "zero_shot",
]
