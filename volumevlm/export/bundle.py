"""MONAI bundle export: ``volumevlm export-bundle --checkpoint CKPT --out DIR``.

A bundle is a directory that MONAI's own tools (``python -m monai.bundle run``,
``verify_net_in_out``, ``ckpt_export``) understand::

    LICENSE
    configs/metadata.json    versions, task, authors, network_data_format (input/output
                             tensors), metrics with their provenance
    configs/inference.json   network_def (a class of this module, built from JSON args),
                             the preprocessing GENERATED from volumevlm.data.transforms
                             (bundle_pipeline_specs), an inferer, postprocessing, an
                             evaluator and ``run``
    models/model.pt          the network's state dict
    models/model.ts          TorchScript (traced through the pure-torch attention path),
                             only when tracing works and the traced module reproduces
                             the network's output
    docs/README.md           the model card

Two tasks:

* ``segmentation``: the checkpoint's segmentation head (:class:`SegmentationNetwork`,
  logits [B, C, X, Y, Z]); ``run`` segments every ``*.nii.gz`` under ``dataset_dir`` by
  sliding windows, takes the class probabilities (softmax) to the input's own grid with
  :class:`volumevlm.data.transforms.InvertToInputd` (the inversion ``model.segment``
  uses: interpolated, then the argmax, so the masks are the same voxel for voxel) and writes ``<name>_seg.nii.gz``
  masks under ``output_dir``.
* ``embedding``: the image encoder and its projection (:class:`EmbeddingNetwork`,
  unit-length embeddings [B, E]); ``run`` writes ``embeddings.csv`` (file, E values)
  under ``output_dir``.

The bundle needs volumevlm installed (the network class and the CT loader are ours);
``required_packages_version`` in metadata.json says so.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from volumevlm.data.transforms import INVERT_TARGET, whole_field
from volumevlm.errors import VolumeVLMError
from volumevlm.models.encoder import EncoderConfig, VolumeEncoder
from volumevlm.models.heads import ProjectionHead
from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet

TASKS = ("segmentation", "embedding")
# The newest published metadata schema (it cannot be downloaded here; check_metadata
# encodes its required fields, and the specification's, itself).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
AUTHORS = "volumevlm developers"
METADATA_PATH = Path("configs") / "metadata.json"
INFERENCE_PATH = Path("configs") / "inference.json"
WEIGHTS_PATH = Path("models") / "model.pt"
TORCHSCRIPT_PATH = Path("models") / "model.ts"
README_PATH = Path("docs") / "README.md"
# The metadata's words for each SegmentationConfig.decoder.
DECODER_DESCRIPTIONS = {
    "fused": "a U-Net on the image whose bottleneck adds the tokens of a 3D ViT encoder with block-sparse attention",
    "unet": "a U-Net decoder on the convolutional stem of a 3D ViT encoder with block-sparse attention",
    "unetr": "a UNETR-style decoder over a 3D ViT encoder with block-sparse attention",
}
LICENSE_PATH = Path("LICENSE")
SEGMENTATION_POSTFIX = "seg"
EMBEDDINGS_CSV = "embeddings.csv"
# A traced module must give the eager network's output to this tolerance (relative to
# the output's magnitude) on an input it was not traced with, or model.ts is left out.
TORCHSCRIPT_RTOL = 1e-4
TORCHSCRIPT_FAILED = "model.ts not written: tracing"
# Characters that MONAI's ConfigParser reads as references/expressions at the start of
# a string, and its id separator: label names must avoid them to survive the JSON.
_CONFIG_PREFIXES = ("$", "@", "%")
_CONFIG_SEPARATOR = "#"


# ---------------------------------------------------------------------- networks


class SegmentationNetwork(SegmentationNet):
    """The segmentation head as a bundle's ``network_def``: built from the JSON args in
    inference.json, forward returns ONE channel-first tensor (logits [B, C, X, Y, Z]).

    encoder: an EncoderConfig as a dict; segmentation: a SegmentationConfig as a dict
    (both exactly as the checkpoint's config.json holds them).
    """

    def __init__(self, encoder: Mapping[str, Any], segmentation: Mapping[str, Any], warm_up: bool = True):
        super().__init__(EncoderConfig.from_dict(dict(encoder)), SegmentationConfig.from_dict(dict(segmentation)))
        if warm_up:
            _fill_caches(self, self.config.roi_size)


class EmbeddingNetwork(nn.Module):
    """The image encoder and its projection as a bundle's ``network_def``.

    forward(x float [B, 1, X, Y, Z] preprocessed) -> unit-length embeddings [B, E]: one
    tensor, the embedding dimension as the channel axis (what VolumeVLM.encode_image gives).
    Parameter names match VolumeVLM's (``encoder.*``, ``image_projection.*``).
    """

    def __init__(self, encoder: Mapping[str, Any], embed_dim: int, input_size: Sequence[int] | None = None, warm_up: bool = True):
        super().__init__()
        self.encoder = VolumeEncoder(EncoderConfig.from_dict(dict(encoder)))
        self.image_projection = ProjectionHead(self.encoder.embed_dim, int(embed_dim))
        if warm_up:
            _fill_caches(self, input_size if input_size is not None else self.encoder.config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.encoder(x).pooled), dim=-1)


def _fill_caches(net: nn.Module, spatial: Sequence[int]) -> None:
    """One forward on zeros at the nominal input size (the sliding-window ROI, or the
    preprocessed size), so the attention layouts and their index tensors are cached
    before anything traces the network. torch.jit.trace's sanity check (on in
    ``monai.bundle ckpt_export``) traces twice and compares the graphs: a first trace
    that builds those caches records operations that the second, finding them, does
    not, and the check fails although both compute the same."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 1, *[int(v) for v in spatial]))
    net.train(was_training)


NETWORK_TARGETS = {
    "segmentation": f"{__name__}.SegmentationNetwork",
    "embedding": f"{__name__}.EmbeddingNetwork",
}


def network_args(model, task: str) -> dict[str, Any]:
    """The JSON args of ``network_def`` for ``task`` from a loaded VolumeVLM."""
    if task == "segmentation":
        head = model.head("segmentation")
        args = dict(head.head_config())
        _check_config_strings(args["segmentation"]["label_names"], model)
        return {"encoder": args["encoder"], "segmentation": args["segmentation"]}
    if task == "embedding":
        size = model.preprocess.spatial_size
        return {
            "encoder": model.encoder_config.to_dict(),
            "embed_dim": int(model.embed_dim),
            "input_size": None if size is None else [int(v) for v in size],
        }
    raise VolumeVLMError(f"export-bundle: unknown task {task!r}; choose from {', '.join(TASKS)}")


def build_network(task: str, args: Mapping[str, Any]) -> nn.Module:
    """The network_def of ``task`` built from its JSON args (random weights)."""
    if task == "segmentation":
        return SegmentationNetwork(**args)
    return EmbeddingNetwork(**args)


def network_state(model, task: str) -> dict[str, torch.Tensor]:
    """The weights of the task's network_def, taken from the loaded VolumeVLM."""
    if task == "segmentation":
        return {k: v.detach().clone() for k, v in model.head("segmentation").state_dict().items()}
    prefixes = ("encoder.", "image_projection.")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _check_config_strings(label_names: Mapping[str, str], model) -> None:
    for index, name in label_names.items():
        if name.startswith(_CONFIG_PREFIXES) or _CONFIG_SEPARATOR in name:
            raise VolumeVLMError(
                f"{model.source or 'model'}: label name {name!r} (index {index}) starts with $, @ or % or holds '#', "
                "which MONAI's bundle config would read as an expression or reference"
            )


def input_spatial_shape(model, task: str) -> list:
    """The network input's spatial shape as metadata states it: the sliding-window ROI
    for segmentation, the preprocessed size for embedding (any multiple of the patch
    size when the preprocessing keeps the resampled size)."""
    if task == "segmentation":
        return [int(v) for v in model.head("segmentation").config.roi_size]
    if model.preprocess.spatial_size is not None:
        return [int(v) for v in model.preprocess.spatial_size]
    return [f"{int(p)}*n" for p in model.encoder_config.patch_size]


# ---------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class _FieldRule:
    types: tuple[type, ...]
    required: bool


# The metadata fields, written from MONAI's bundle specification and its 20240725 schema:
# required ones (the schema's plus "changelog", which the specification lists as well)
# and the optional ones whose type the schema fixes.
METADATA_FIELDS: dict[str, _FieldRule] = {
    "schema": _FieldRule((str,), True),
    "version": _FieldRule((str,), True),
    "changelog": _FieldRule((dict,), True),
    "monai_version": _FieldRule((str,), True),
    "pytorch_version": _FieldRule((str,), True),
    "numpy_version": _FieldRule((str,), True),
    "required_packages_version": _FieldRule((dict,), True),
    "task": _FieldRule((str,), True),
    "description": _FieldRule((str,), True),
    "authors": _FieldRule((str,), True),
    "copyright": _FieldRule((str,), True),
    "network_data_format": _FieldRule((dict,), True),
    "optional_packages_version": _FieldRule((dict,), False),
    "data_source": _FieldRule((str,), False),
    "data_type": _FieldRule((str,), False),
    "image_classes": _FieldRule((str,), False),
    "label_classes": _FieldRule((str,), False),
    "pred_classes": _FieldRule((str,), False),
    "eval_metrics": _FieldRule((dict,), False),
    "intended_use": _FieldRule((str,), False),
    "references": _FieldRule((list,), False),
    "supported_apps": _FieldRule((dict,), False),
}
# Every tensor format specifier: the specification lists all of these as the keys it
# "must" hold (the schema insists on the first six).
TENSOR_FIELDS: dict[str, _FieldRule] = {
    "type": _FieldRule((str,), True),
    "format": _FieldRule((str,), True),
    "num_channels": _FieldRule((int,), True),
    "spatial_shape": _FieldRule((list,), True),
    "dtype": _FieldRule((str,), True),
    "value_range": _FieldRule((list,), True),
    "modality": _FieldRule((str,), True),
    "is_patch_data": _FieldRule((bool,), True),
    "channel_def": _FieldRule((dict,), True),
}
NETWORK_IO_SECTIONS = ("inputs", "outputs", "post_processed_outputs")


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", dict: "an object", list: "an array", int: "an integer", bool: "a boolean"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an integer
    return isinstance(value, types)


def check_metadata(meta: Any) -> list[str]:
    """Problems of a metadata.json dict against the bundle specification's fields.

    Returns one line per problem (empty when the metadata is complete): a required
    field missing or of the wrong JSON type, a version that is not text, a
    ``network_data_format`` without inputs/outputs, a tensor specifier missing one of
    the specification's keys, a spatial shape item that is neither an integer nor an
    expression string, a value range that is not [] or [min, max] numbers.
    """
    if not isinstance(meta, dict):
        return [f"metadata must be a JSON object, got {type(meta).__name__}"]
    problems = []
    for name, rule in METADATA_FIELDS.items():
        if name not in meta:
            if rule.required:
                problems.append(f"{name}: required field missing")
        elif not _is(meta[name], rule.types):
            problems.append(f"{name}: must be {_type_name(rule.types)}, got {type(meta[name]).__name__}")
    for name in ("changelog", "required_packages_version", "optional_packages_version"):
        if isinstance(meta.get(name), dict):
            bad = [k for k, v in meta[name].items() if not isinstance(v, str)]
            if bad:
                problems.append(f"{name}: values must be strings (not for {bad})")
    if isinstance(meta.get("references"), list) and not all(isinstance(r, str) for r in meta["references"]):
        problems.append("references: items must be strings")
    network_formats = {k: v for k, v in meta.items() if k == "network_data_format" or k.endswith("_data_format")}
    for fmt_name, fmt in network_formats.items():
        if not isinstance(fmt, dict):
            if fmt_name != "network_data_format":  # already reported above
                problems.append(f"{fmt_name}: must be an object")
            continue
        for section in ("inputs", "outputs"):
            if not isinstance(fmt.get(section), dict):
                problems.append(f"{fmt_name}.{section}: required object missing")
        for section in NETWORK_IO_SECTIONS:
            for io_name, spec in (fmt.get(section) or {}).items() if isinstance(fmt.get(section), dict) else ():
                problems += _check_tensor(f"{fmt_name}.{section}.{io_name}", spec)
    return problems


def _check_tensor(where: str, spec: Any) -> list[str]:
    if isinstance(spec, (int, float, str, bool)):
        return []  # the schema also admits plain numbers, strings and booleans
    if not isinstance(spec, dict):
        return [f"{where}: must be a tensor specifier object"]
    problems = []
    for name, rule in TENSOR_FIELDS.items():
        if name not in spec:
            problems.append(f"{where}.{name}: required field missing")
        elif not _is(spec[name], rule.types):
            problems.append(f"{where}.{name}: must be {_type_name(rule.types)}, got {type(spec[name]).__name__}")
    if isinstance(spec.get("spatial_shape"), list):
        bad = [v for v in spec["spatial_shape"] if not (_is(v, (int,)) or isinstance(v, str))]
        if bad:
            problems.append(f"{where}.spatial_shape: items must be integers or expression strings, got {bad}")
    value_range = spec.get("value_range")
    if isinstance(value_range, list):
        numbers = all(_is(v, (int, float)) for v in value_range)
        if not numbers or len(value_range) not in (0, 2) or (len(value_range) == 2 and value_range[0] > value_range[1]):
            problems.append(f"{where}.value_range: must be [] or [min, max] numbers, got {value_range}")
    if isinstance(spec.get("num_channels"), int) and not isinstance(spec.get("num_channels"), bool):
        if spec["num_channels"] < 1:
            problems.append(f"{where}.num_channels: must be positive, got {spec['num_channels']}")
    return problems


def check_bundle(directory: str | os.PathLike) -> list[str]:
    """Problems of a bundle directory: the files the specification requires (LICENSE,
    configs/metadata.json, models/model.pt), inference.json parseable, and
    :func:`check_metadata` on metadata.json. Empty when it is a complete bundle."""
    root = Path(directory)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    problems = [f"{root / rel}: required file missing" for rel in (LICENSE_PATH, METADATA_PATH, WEIGHTS_PATH)
                if not (root / rel).is_file()]
    for rel in (METADATA_PATH, INFERENCE_PATH):
        path = root / rel
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{path}: unreadable JSON ({str(err).splitlines()[0]})")
            continue
        if rel == METADATA_PATH:
            problems += [f"{path}: {p}" for p in check_metadata(content)]
    return problems


def _license_id() -> str:
    """volumevlm's licence as its package metadata declares it (pyproject.toml)."""
    from importlib import metadata

    try:
        meta = metadata.metadata("volumevlm")
        return meta.get("License-Expression") or meta.get("License") or "Apache-2.0"
    except metadata.PackageNotFoundError:
        return "Apache-2.0"


def _provenance(model, task: str) -> dict[str, Any]:
    """The training facts the checkpoint recorded for what this bundle exports."""
    # A loaded model keeps no provenance in memory: it is in the checkpoint's config.json.
    path = Path(model.source) / "config.json" if model.source is not None else None
    if path is None or not path.is_file():
        return {}
    provenance = dict(json.loads(path.read_text(encoding="utf-8")).get("provenance") or {})
    if task == "segmentation":
        return dict((provenance.get("heads") or {}).get("segmentation") or {})
    return {k: v for k, v in provenance.items() if k != "heads"}


# Entries of a training record's metrics that count things (cases, pairs, codes) rather
# than measure them: reported as sample sizes, not as figures.
_COUNT_SUFFIXES = ("/cases", "/pairs", "_codes", "_findings")


def _reported_metrics(provenance: Mapping[str, Any]) -> dict[str, float]:
    """Validation / test figures from the training record (training losses and counts left out)."""
    metrics = provenance.get("metrics") or {}
    out = {}
    for key, value in sorted(metrics.items()):
        if not key.startswith(("val/", "test/")) or key.endswith(_COUNT_SUFFIXES):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _sample_sizes(provenance: Mapping[str, Any]) -> dict[str, int]:
    metrics = provenance.get("metrics") or {}
    return {
        k: int(v)
        for k, v in sorted(metrics.items())
        if k.startswith(("val/", "test/")) and k.endswith(_COUNT_SUFFIXES) and isinstance(v, (int, float))
    }


def _metrics_provenance(provenance: Mapping[str, Any], checkpoint: Path, task: str) -> str:
    where = "provenance.heads.segmentation.metrics" if task == "segmentation" else "provenance.metrics"
    steps = provenance.get("global_step")
    cases = provenance.get("train_cases")
    parts = [f"from {checkpoint / 'config.json'} ({where})", "measured by volumevlm training on its validation/test split"]
    if steps is not None:
        parts.append(f"after {steps} training step(s)")
    if cases is not None:
        parts.append(f"{cases} training case(s)")
    parts += [f"{key} = {value}" for key, value in _sample_sizes(provenance).items()]
    if provenance.get("synthetic"):
        parts.append("SYNTHETIC data (volumevlm synth), NOT clinical data: not a clinical accuracy")
    return "; ".join(parts)


def metadata_dict(model, task: str, checkpoint: Path, torchscript_note: str) -> dict[str, Any]:
    """configs/metadata.json for ``task`` (see the module docstring)."""
    import volumevlm
    from volumevlm.provenance import package_versions

    # All are volumevlm's dependencies; "not installed" only for a broken environment.
    versions = {name: version or "not installed" for name, version in
                package_versions("volumevlm", "monai", "torch", "numpy", "nibabel", "pytorch-ignite").items()}
    provenance = _provenance(model, task)
    synthetic = bool(provenance.get("synthetic"))
    data_note = provenance.get("data_note") or "training data not recorded in the checkpoint"
    # The preprocessing inference.json runs (see inference_config).
    pre = whole_field(model.preprocess) if task == "segmentation" else model.preprocess
    low, high = pre.hu_window
    image = {
        "type": "image",
        "format": "hounsfield",
        "modality": "CT",
        "num_channels": 1,
        "spatial_shape": input_spatial_shape(model, task),
        "dtype": "float32",
        "value_range": [0.0, 1.0],
        "is_patch_data": task == "segmentation",
        "channel_def": {"0": f"CT, Hounsfield units windowed [{low:g}, {high:g}] and mapped linearly to [0, 1]"},
    }
    if task == "segmentation":
        head = model.head("segmentation")
        names = {str(i): head.config.name_of(i) for i in range(head.config.num_classes)}
        outputs = {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "modality": "n/a",
                "num_channels": head.config.num_classes,
                "spatial_shape": list(image["spatial_shape"]),
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": names,
            }
        }
        post = {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "modality": "n/a",
                "num_channels": 1,
                "spatial_shape": ["*", "*", "*"],
                "dtype": "uint8" if head.config.num_classes <= 256 else "int16",
                "value_range": [0, head.config.num_classes - 1],
                "is_patch_data": False,
                "channel_def": names,
            }
        }
        task_text = "3D CT multi-organ segmentation"
        description = (
            f"volumevlm segmentation head: "
            f"{DECODER_DESCRIPTIONS[head.config.decoder]}"
            f"{' and a convolutional path on the image' if head.config.image_path else ''} "
            f"({head.config.num_classes} labels, background included), run by sliding windows of "
            f"{list(head.config.roi_size)} voxels on CT resampled to RAS {list(pre.target_spacing)} mm; "
            f"masks are written back in each input's own geometry. {data_note}. Not for clinical use."
        )
        label_list = ", ".join(f"{i} {n}" for i, n in names.items())
        extra = {
            "label_classes": f"one channel of label indices: {label_list}",
            "pred_classes": f"{head.config.num_classes} channels of logits, channel i = label i ({label_list}); "
            "the saved mask is their argmax",
        }
    else:
        dim = int(model.embed_dim)
        outputs = {
            "pred": {
                "type": "tuples",
                "format": "latent",
                "modality": "n/a",
                "num_channels": dim,
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [-1.0, 1.0],
                "is_patch_data": False,
                "channel_def": {str(i): f"embedding component {i} (unit-length vector)" for i in range(dim)},
            }
        }
        post = {}
        task_text = "3D CT image embedding (image-report space)"
        description = (
            f"volumevlm image encoder (3D ViT, block-sparse attention) and its projection into the {dim}-dimensional "
            f"space shared with radiology reports; one unit-length embedding per CT volume preprocessed to "
            f"RAS {list(pre.target_spacing)} mm, {list(pre.spatial_size) if pre.spatial_size else 'any'} voxels. "
            f"{data_note}. Not for clinical use."
        )
        extra = {"pred_classes": f"{dim} channels: the unit-length image embedding"}
    metrics = _reported_metrics(provenance)
    meta: dict[str, Any] = {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by volumevlm {volumevlm.__version__} export-bundle (task {task})"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"].split("+")[0],
        "numpy_version": versions["numpy"],
        "required_packages_version": {
            "volumevlm": versions["volumevlm"],
            "nibabel": versions["nibabel"],
            "pytorch-ignite": versions["pytorch-ignite"],
        },
        "name": f"volumevlm CT {task}",
        "task": task_text,
        "description": description,
        "authors": AUTHORS,
        "copyright": f"Copyright (c) {AUTHORS}",
        "data_source": (
            "volumevlm synth (procedurally generated CT phantoms with reports and codes), NOT clinical data"
            if synthetic
            else str(provenance.get("data_root") or "not recorded in the checkpoint")
        ),
        "data_type": "nibabel",
        "image_classes": "single channel CT volume in Hounsfield units; the bundle's preprocessing windows it to [0, 1]",
        **extra,
        "eval_metrics": metrics,
        "eval_metrics_provenance": _metrics_provenance(provenance, checkpoint, task)
        if metrics
        else "no evaluation figures recorded in the checkpoint",
        "intended_use": "Research and software testing only. NOT for clinical use: not for diagnosis, treatment or any "
        "decision about a patient.",
        "references": [],
        "network_data_format": {"inputs": {"image": image}, "outputs": outputs},
        "volumevlm": {
            "checkpoint": str(checkpoint),
            "task": task,
            "preprocess": pre.to_dict(),
            "trained_on_synthetic_data": synthetic,
            "torchscript": torchscript_note,
            "license": _license_id(),
        },
    }
    if post:
        meta["network_data_format"]["post_processed_outputs"] = post
    return meta


# ---------------------------------------------------------------------- inference.json


def inference_config(model, task: str, net_args: Mapping[str, Any]) -> dict[str, Any]:
    """configs/inference.json: the preprocessing is generated from the model's own
    PreprocessConfig by :func:`volumevlm.data.transforms.bundle_pipeline_specs`."""
    from volumevlm.data.transforms import bundle_pipeline_specs

    # A mask covers the whole input, as segment_to_input's does (no centre pad/crop).
    preprocess = whole_field(model.preprocess) if task == "segmentation" else model.preprocess
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import volumevlm.export.bundle"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        # Every *.nii.gz below dataset_dir, subfolders included, in a stable order.
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '**', '*.nii.gz'), recursive=True)))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": NETWORK_TARGETS[task], **json.loads(json.dumps(dict(net_args)))},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": bundle_pipeline_specs(preprocess, ["image"])},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
    }
    checkpoint_loader = {
        "_target_": "CheckpointLoader",
        "load_path": "$@bundle_root + '/models/model.pt'",
        "load_dict": {"model": "@network"},
        "map_location": "@device",
    }
    if task == "segmentation":
        head = model.head("segmentation")
        mask_dtype = "$np.uint8" if head.config.num_classes <= 256 else "$np.int16"
        config["inferer"] = {
            # The same windows, blending and padding as sliding_window_segment.
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(v) for v in head.config.roi_size],
            "sw_batch_size": 1,
            "overlap": float(head.config.sw_overlap),
            "mode": "gaussian",
        }
        config["postprocessing"] = {
            "_target_": "Compose",
            "transforms": [
                # Class probabilities on the preprocessed grid, then the label map on the
                # file's own grid by the package's one inversion (the same function as
                # model.segment: probabilities interpolated, then the argmax), not
                # MONAI's Invertd.
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": INVERT_TARGET, "keys": "pred", "orig_key": "image", "mode": "probabilities"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": SEGMENTATION_POSTFIX,
                    "output_ext": ".nii.gz",
                    "output_dtype": mask_dtype,
                    "resample": False,
                    "squeeze_end_dims": True,
                    "separate_folder": False,
                    "data_root_dir": "@dataset_dir",
                },
            ],
        }
        config["handlers"] = [checkpoint_loader, {"_target_": "StatsHandler", "iteration_log": False}]
    else:
        config["inferer"] = {"_target_": "SimpleInferer"}
        config["postprocessing"] = {"_target_": "Compose", "transforms": []}
        config["handlers"] = [
            checkpoint_loader,
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": EMBEDDINGS_CSV,
                "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                "output_transform": "$monai.handlers.from_engine(['pred'])",
            },
        ]
    config["evaluator"] = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": False,
    }
    config["initialize"] = ["$monai.utils.set_determinism(seed=0)"]
    config["run"] = ["$@evaluator.run()"]
    return config


# ---------------------------------------------------------------------- TorchScript


@dataclass
class TorchScriptResult:
    module: Any | None  # the traced module, or None
    note: str  # one line: what was done, or why model.ts is left out
    max_abs_diff: float | None = None


def trace_network(net: nn.Module, input_shape: Sequence[int]) -> TorchScriptResult:
    """Trace ``net`` (MONAI's convert_to_torchscript with use_trace, as ckpt_export does)
    at ``input_shape`` and check the traced module against the eager network on a
    DIFFERENT input of that shape (a trace that froze data-dependent values fails this).

    Scripting is not attempted: the encoder's layouts and dataclass configs are Python.
    The attention runs on the CPU, i.e. the pure-torch path.
    """
    from monai.networks.utils import convert_to_torchscript

    shape = [int(v) for v in input_shape]
    generator = torch.Generator().manual_seed(0)
    example, probe = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    net = net.eval().cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values frozen at this shape
            traced = convert_to_torchscript(net, inputs=[example], use_trace=True)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)  # must also serialise: a traced Python op would fail here
            buffer.seek(0)
            reloaded = torch.jit.load(buffer)
            with torch.no_grad():
                expected, got = net(probe), reloaded(probe)
    except Exception as err:  # tracing raises many types (RuntimeError, TypeError, TracingCheckError ...)
        text = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")
        return TorchScriptResult(None, f"{TORCHSCRIPT_FAILED} through the attention path failed ({why[:200]})")
    diff = float((expected - got).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if diff > TORCHSCRIPT_RTOL * scale:
        return TorchScriptResult(
            None, f"{TORCHSCRIPT_FAILED} gave a module that differs from the network by {diff:.3g} (max |out| {scale:.3g})", diff
        )
    return TorchScriptResult(
        traced,
        f"model.ts traced at input {shape} through the pure-torch attention path; valid for that input shape only "
        f"(max |traced - eager| = {diff:.3g})",
        diff,
    )


# ---------------------------------------------------------------------- model card


def _fmt_metric(value: float) -> str:
    return f"{value:.4f}"


def model_card(model, task: str, meta: Mapping[str, Any], inference: Mapping[str, Any], has_torchscript: bool) -> str:
    """docs/README.md: what the model is, its data, intended use, metrics and provenance,
    how to run the bundle."""
    import volumevlm

    info = meta["volumevlm"]
    traced_and_failed = not has_torchscript and info["torchscript"].startswith(TORCHSCRIPT_FAILED)
    provenance = _provenance(model, task)
    synthetic = info["trained_on_synthetic_data"]
    lines = [
        f"# {meta['name']}",
        "",
        f"> **{volumevlm.NOT_FOR_CLINICAL_USE}** This bundle is research software. It must not be used for "
        "diagnosis, treatment or any decision about a patient.",
        "",
        "## Model",
        "",
        meta["description"],
        "",
        f"* exported from the volumevlm checkpoint `{info['checkpoint']}` by volumevlm {volumevlm.__version__} "
        f"(`volumevlm export-bundle --task {task}`)",
        f"* network: `{inference['network_def']['_target_']}` (needs volumevlm {volumevlm.__version__} installed)",
        f"* encoder: patch {list(model.encoder_config.patch_size)}, width {model.encoder_config.dim}, "
        f"depth {model.encoder_config.depth}, {model.encoder_config.heads} heads, attention patterns "
        f"{list(model.encoder_config.patterns())}",
        "",
        "## Data",
        "",
    ]
    if synthetic:
        lines += [
            "Trained on a **synthetic** CT cohort written by `volumevlm synth`: procedurally generated phantoms with "
            "generated reports, codes and label maps. It is **not clinical data**; a model trained on it has not "
            "seen a real patient.",
        ]
    else:
        lines += [f"Training data: {meta['data_source']} (as recorded in the checkpoint; {provenance.get('data_note', 'no note')})."]
    if provenance.get("train_cases") is not None:
        lines += ["", f"Training cases: {provenance['train_cases']}; training steps: {provenance.get('global_step', 'not recorded')}."]
    lines += [
        "",
        "## Intended use",
        "",
        "Research on 3D CT foundation models and testing of software pipelines (MONAI bundle tooling included). "
        "Out of scope: any clinical use; use on modalities other than CT.",
        "",
        "## Input",
        "",
        "One CT volume per `*.nii.gz` file, in Hounsfield units, stored in any orientation. The preprocessing "
        "(generated from volumevlm's one preprocessing definition) is:",
        "",
    ]
    for step in inference["preprocessing"]["transforms"]:
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in step.items() if k != "_target_")
        lines.append(f"1. `{step['_target_']}({args})`")
    lines += ["", "## Output", ""]
    if task == "segmentation":
        names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        lines += [
            f"A mask `<name>_{SEGMENTATION_POSTFIX}.nii.gz` per input, under `output_dir` (same sub-folders as under "
            "`dataset_dir`), with the input's own shape, voxel order and affine; voxel values are label indices:",
            "",
            "| index | structure |",
            "|---|---|",
        ]
        lines += [f"| {i} | {n} |" for i, n in names.items()]
    else:
        lines += [
            f"`{EMBEDDINGS_CSV}` under `output_dir`: one row per input file, the file name then the "
            f"{model.embed_dim} components of its unit-length embedding.",
        ]
    lines += ["", "## Metrics", ""]
    metrics = meta["eval_metrics"]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt_metric(v)} |" for k, v in metrics.items()]
        lines += ["", f"Provenance: {meta['eval_metrics_provenance']}."]
        if synthetic:
            lines += [
                "",
                "**These figures come from synthetic data (volumevlm's generated cohort), not from clinical data, "
                "and are not a clinical accuracy.**",
            ]
    else:
        lines += ["No evaluation figures were recorded in the checkpoint."]
    lines += [
        "",
        "## TorchScript",
        "",
        info["torchscript"] + ".",
        "",
        "## Running the bundle",
        "",
        "```bash",
        f"pip install volumevlm=={volumevlm.__version__}   # or `pip install -e .` in its source tree",
        "cd BUNDLE_DIR",
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --dataset_dir /path/to/ct_folder --output_dir /path/to/out",
        "python -m monai.bundle verify_net_in_out network_def --config_file configs/inference.json \\",
        "    --meta_file configs/metadata.json",
        "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\",
        "    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True",
        "```",
        "",
        "From another directory add `--bundle_root BUNDLE_DIR`. `ckpt_export` needs `--use_trace True`: the "
        "network cannot be scripted (`torch.jit.script`), only traced"
        + (", and tracing did not give a valid module for this network (see above)." if traced_and_failed else "."),
        "",
        "## License",
        "",
        f"{info['license']} (see `LICENSE`). {volumevlm.NOT_FOR_CLINICAL_USE}",
        "",
    ]
    if not has_torchscript:
        lines.insert(lines.index("## TorchScript") + 2, "No `models/model.ts` in this bundle.")
        lines.insert(lines.index("## TorchScript") + 3, "")
    return "\n".join(lines)


def license_text() -> str:
    licence = _license_id()
    year = _dt.date.today().year
    where = " (http://www.apache.org/licenses/LICENSE-2.0)" if licence == "Apache-2.0" else ""
    return (
        f"Copyright {year} {AUTHORS}\n\n"
        f"SPDX-License-Identifier: {licence}\n\n"
        f"The configuration files and model weights of this bundle are licensed under the {licence} licence{where};\n"
        "you may not use them except in compliance with it.\n"
        "They are distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either\n"
        "express or implied.\n\n"
        "Research software: NOT for clinical use.\n"
    )


# ---------------------------------------------------------------------- export


@dataclass
class ExportResult:
    directory: Path
    task: str
    files: list[str] = field(default_factory=list)
    torchscript: bool = False
    torchscript_note: str = ""


def export_bundle(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    task: str = "segmentation",
    *,
    torchscript: bool = True,
    log: Callable[[str], Any] | None = None,
) -> ExportResult:
    """Write the MONAI bundle of ``task`` for the checkpoint directory ``checkpoint`` to
    ``out`` (atomically: built in a temporary folder beside it, then moved in place; an
    existing bundle there is replaced, any other non-empty folder is refused).

    Raises VolumeVLMError (one line) for an unknown task, an unreadable checkpoint, a
    checkpoint without the head the task needs, or an ``out`` that is not a bundle.
    ``log`` receives one-line notes (e.g. why model.ts is left out); default: stderr.
    """
    from monai.data import save_net_with_metadata

    import volumevlm

    if task not in TASKS:
        raise VolumeVLMError(f"export-bundle: unknown task {task!r}; choose from {', '.join(TASKS)}")
    checkpoint = Path(checkpoint).expanduser().resolve()
    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / METADATA_PATH).is_file())):
        raise VolumeVLMError(f"{target}: exists and is not a MONAI bundle; choose an empty or new folder")
    model = volumevlm.load(checkpoint)
    args = network_args(model, task)  # raises the head's one-line recipe error when missing
    net = build_network(task, args)
    net.load_state_dict(network_state(model, task), strict=True)
    net.eval()

    shape = [1, 1, *[_example_size(v, p) for v, p in zip(input_spatial_shape(model, task), model.encoder_config.patch_size)]]
    traced = trace_network(net, shape) if torchscript else TorchScriptResult(None, "model.ts not written (--no-torchscript)")
    meta = metadata_dict(model, task, checkpoint, traced.note)
    problems = check_metadata(meta)
    if problems:  # our own generator must satisfy our own check
        raise VolumeVLMError(f"export-bundle: generated metadata.json is incomplete: {problems[0]}")
    inference = inference_config(model, task, args)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        for folder in ("configs", "models", "docs"):
            (tmp / folder).mkdir()
        (tmp / LICENSE_PATH).write_text(license_text(), encoding="utf-8")
        (tmp / METADATA_PATH).write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
        (tmp / INFERENCE_PATH).write_text(json.dumps(inference, indent=4) + "\n", encoding="utf-8")
        torch.save(net.state_dict(), tmp / WEIGHTS_PATH)
        if traced.module is not None:
            # As ckpt_export saves it: metadata.json inside, the config as extras/inference.json.
            save_net_with_metadata(
                traced.module,
                str(tmp / TORCHSCRIPT_PATH),
                include_config_vals=False,
                append_timestamp=False,
                meta_values=meta,
                more_extra_files={"inference.json": json.dumps(inference).encode()},
            )
        (tmp / README_PATH).write_text(
            model_card(model, task, meta, inference, traced.module is not None), encoding="utf-8"
        )
        problems = check_bundle(tmp)
        if problems:
            raise VolumeVLMError(f"export-bundle: the written bundle is incomplete: {problems[0]}")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        from volumevlm.io.writers import _replace_folder

        os.chmod(tmp, 0o755 & ~_umask())
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if traced.module is None:
        (log or _to_stderr)(f"note: {traced.note}")
    return ExportResult(target, task, files, traced.module is not None, traced.note)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _example_size(value, patch: int) -> int:
    """A concrete size for a spatial_shape item: the integer, or the patch size for an
    expression such as "8*n" (n = 1)."""
    return int(value) if isinstance(value, int) else int(patch)
