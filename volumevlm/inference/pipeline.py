"""The inference verbs on any CT input: embed, zero-shot, phenotypes, similarity maps,
segmentation and report generation.

The :class:`~volumevlm.inference.checkpoint.VolumeVLM` methods of the same names (the model
:func:`volumevlm.load` returns) delegate here::

    model = volumevlm.load("demo-output/model")
    model.embed("case.nii.gz")                       # float [E], unit length
    model.zero_shot("case.nii.gz")                   # {finding: P(present)}
    model.phenotypes("case.nii.gz", top_k=5)         # [(phecode, description, probability)]
    model.similarity_map("case.nii.gz", "splenomegaly", out="sim.nii.gz")  # nibabel float image
    model.segment("series/", out="mask.nii.gz")      # nibabel label image, input geometry
    model.generate_report("case.nii.gz")             # text, organ system by organ system

What ``x`` may be:

* a path: NIfTI, a DICOM series folder or ``.zip``, NRRD / MHA (read by THE reader,
  :mod:`volumevlm.io.readers`), a ``nibabel`` image, or ``(array [X, Y, Z], affine 4x4)``,
  all in Hounsfield units. These go through THE preprocessing saved with the checkpoint
  (``model.preprocess``), and maps come back in the input's own voxel grid through its
  inverse (:func:`volumevlm.data.transforms.invert_to_input`).
* a torch tensor that is ALREADY preprocessed: ``[1, X, Y, Z]`` (one volume) or
  ``[B, 1, X, Y, Z]`` (B volumes), values in [0, 1] (what :func:`volumevlm.preprocess`
  returns). Its geometry is its own grid: a MONAI MetaTensor's ``.affine`` when it has
  one, else the model's target spacing in RAS with the origin at 0. A raw HU tensor
  is refused (pass ``(array, affine)`` for that).
* a list of any of these: the result is a list, one entry per input (a batched
  ``[B, 1, X, Y, Z]`` tensor too). :func:`embed` stacks its results into ``[N, E]``.

Bad input raises a one-line :class:`~volumevlm.errors.VolumeVLMError` naming the file;
a verb that needs a head the checkpoint lacks raises ``model.head(name)``'s one-line
error, which says how to train that head. Models trained on the synthetic cohort give
outputs about synthetic phantoms: nothing here is a clinical result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError, one_line
from volumevlm.models.zero_shot import (  # noqa: F401 (default_prompt_set, with_findings: public here too)
    default_prompt_set,
    inference_mode,
    resolve_prompt_set,
    with_findings,
    zero_shot_from_embeddings,
    zero_shot_from_sections,
)

UPSAMPLE_MODES = ("linear", "nearest")
# A preprocessed tensor holds [0, 1]; this much float slack is tolerated.
_RANGE_SLACK = 1e-3


# ---------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One input, ready for the model.

    image: float32 [1, X, Y, Z] preprocessed (a MetaTensor whose ``.affine`` is its grid
        when it came from a raw input); None when only read (``preprocess_image=False``).
    volume: the input as read (its geometry is where maps go back to); None when the
        input was an already preprocessed tensor.
    grid_affine: voxel -> RAS mm of ``image``'s grid (float64 4x4).
    source: what to name in messages.
    """

    image: torch.Tensor | None
    volume: Any
    grid_affine: np.ndarray
    source: str


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _looks_like_array_affine(x: Any) -> bool:
    """(array, affine): a 2-tuple whose first entry is an array/tensor and whose second is 4x4."""
    if not (isinstance(x, tuple) and len(x) == 2):
        return False
    first, second = x
    if not (isinstance(first, np.ndarray) or _is_tensor(first)):
        return False
    try:
        return np.asarray(second.detach().cpu() if _is_tensor(second) else second, dtype=np.float64).shape == (4, 4)
    except (TypeError, ValueError):
        return False


def split_inputs(x: Any) -> tuple[list[Any], bool]:
    """(inputs, many): the single inputs in ``x`` and whether the caller gets a list back.

    A list (or a tuple that is not ``(array, affine)``) holds several inputs; a
    ``[B, 1, X, Y, Z]`` tensor holds B preprocessed volumes."""
    if isinstance(x, (list, tuple)) and not _looks_like_array_affine(x):
        if len(x) == 0:
            raise VolumeVLMError("inputs: an empty list (give at least one volume)")
        out: list[Any] = []
        for entry in x:
            if _is_tensor(entry) and entry.dim() == 5:
                out.extend(entry[i] for i in range(entry.shape[0]))
            else:
                out.append(entry)
        return out, True
    if _is_tensor(x) and x.dim() == 5:
        if x.shape[0] == 0:
            raise InputError(f"<{type(x).__name__}>", "an empty batch (B = 0)")
        return [x[i] for i in range(x.shape[0])], True
    return [x], False


def _grid_affine_of_tensor(x: torch.Tensor, model) -> np.ndarray:
    affine = getattr(x, "affine", None)
    if affine is not None:
        a = np.asarray(affine.detach().cpu().numpy() if _is_tensor(affine) else affine, dtype=np.float64)
        if a.ndim == 3:  # a batched MetaTensor's affine is [B, 4, 4]
            a = a[0]
        if a.shape == (4, 4) and np.isfinite(a).all() and abs(np.linalg.det(a[:3, :3])) > 1e-12:
            return a
    # A plain tensor carries no geometry: it is taken to be on the model's grid (RAS,
    # target spacing); only the output's affine depends on this, never the values.
    return np.diag([*model.preprocess.target_spacing, 1.0]).astype(np.float64)


def _preprocessed_tensor(x: torch.Tensor, model) -> Item:
    source = f"<{type(x).__name__} {list(x.shape)}>"
    if x.dim() != 4 or x.shape[0] != 1 or min(x.shape[1:]) < 1:
        raise InputError(
            source,
            "a tensor must be an already preprocessed volume [1, X, Y, Z] or batch [B, 1, X, Y, Z]; "
            "pass (array, affine) or a file for a raw HU volume",
        )
    if not x.is_floating_point():
        raise InputError(source, f"a preprocessed volume is floating point in [0, 1], got {x.dtype}")
    plain = x.detach().as_tensor() if hasattr(x, "as_tensor") else x.detach()
    plain = plain.float()
    if not bool(torch.isfinite(plain).all()):
        raise InputError(source, "holds NaN or infinite values")
    lo, hi = float(plain.min()), float(plain.max())
    if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
        raise InputError(
            source,
            f"values span {lo:.4g}..{hi:.4g}, not a preprocessed [0, 1] volume (HU?); "
            "pass (array, affine) or a file for a raw HU volume, or volumevlm.preprocess(x)",
        )
    return Item(image=plain.cpu(), volume=None, grid_affine=_grid_affine_of_tensor(x, model), source=source)


def prepare(x: Any, model, preprocess_image: bool = True, config=None) -> Item:
    """One single input (see the module docstring) as an :class:`Item`; with
    ``preprocess_image=False`` a raw input is only read (``image`` is None). ``config``:
    the PreprocessConfig to run (default ``model.preprocess``; segmentation passes its
    :func:`~volumevlm.data.transforms.whole_field`)."""
    from volumevlm.data.transforms import preprocess
    from volumevlm.io import Volume, as_volume

    if _is_tensor(x):
        return _preprocessed_tensor(x, model)
    volume = x if isinstance(x, Volume) else as_volume(x)  # raises InputError naming the file
    if not preprocess_image:
        return Item(image=None, volume=volume, grid_affine=np.asarray(volume.affine, dtype=np.float64), source=volume.source)
    try:
        image = preprocess(volume, model.preprocess if config is None else config)
    except VolumeVLMError:
        raise
    except Exception as err:  # MONAI / numpy failures on odd data: still one line naming the file
        raise InputError(volume.source, "preprocessing failed", detail=one_line(err)) from None
    grid_affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
    return Item(image=image, volume=volume, grid_affine=grid_affine, source=volume.source)


def iter_items(x: Any, model, preprocess_image: bool = True) -> tuple[Iterator[Item], bool]:
    """(lazy Items of ``x``, many): inputs are read one at a time, so a list of many
    volumes never sits in memory at once."""
    inputs, many = split_inputs(x)
    return (prepare(entry, model, preprocess_image) for entry in inputs), many


def _batch(item: Item, model) -> torch.Tensor:
    image = item.image.as_tensor() if hasattr(item.image, "as_tensor") else item.image
    return image[None].to(device=model.device, dtype=torch.float32)


# ---------------------------------------------------------------------- embed


def embed(model, x: Any) -> torch.Tensor:
    """Unit image embeddings: float32 [E] for one input, [N, E] for a list (CPU)."""
    items, many = iter_items(x, model)
    rows = []
    with inference_mode(model):
        for item in items:
            rows.append(model.encode_image(_batch(item, model))[0].float().cpu())
    return torch.stack(rows) if many else rows[0]


# ---------------------------------------------------------------------- prompts / zero-shot


def zero_shot(model, x: Any, findings: Sequence[str] | None = None, prompts: Any = None, anatomy: bool = False):
    """{finding: P(present)} per input (a list of dicts for a list).

    anatomy: read each finding in its organ system's embedding (the checkpoint's anatomy
    and segmentation heads, :func:`volumevlm.models.zero_shot.zero_shot_from_sections`)
    instead of the global image embedding; a checkpoint without them says how to fit them."""
    prompt_set = resolve_prompt_set(prompts, model)  # a bad prompt set fails before any image is read
    if anatomy:
        head, segmentation = model.head("anatomy"), model.head("segmentation")
        emb, sections = _anatomy_embeddings(model, x, head, segmentation)
        many = emb.dim() == 2
        probs, names, _ = zero_shot_from_sections(model, emb if many else emb[None],
                                                  sections if many else sections[None], head, prompt_set, findings)
    else:
        emb = embed(model, x)
        many = emb.dim() == 2
        probs, names = zero_shot_from_embeddings(model, emb if many else emb[None], prompt_set, findings)
    results = [{name: float(p) for name, p in zip(names, row.tolist())} for row in probs]
    return results if many else results[0]


def organ_pass(model, images: torch.Tensor, segmentation, statistics: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit global embeddings [B, E], organ features [B, K, F] by the histogram recipe
    ``statistics``) of preprocessed images [B, 1, X, Y, Z]: one encoder and one
    segmentation pass, what reading organ by organ needs (here and in the server's batches)."""
    from volumevlm.models.anatomy import organ_features, organ_labels
    from volumevlm.models.report import encoder_features

    out = model.encoder(images)
    tokens, grid = encoder_features(out)
    organs = organ_features(tokens, grid, images, organ_labels(segmentation, images), segmentation.config.num_classes,
                            statistics, model.preprocess.hu_window)
    return F.normalize(model.image_projection(out.pooled), dim=-1), organs


def _organ_passes(model, x: Any, segmentation, statistics: str):
    """(lazy :func:`organ_pass` of each input of x, many)."""
    items, many = iter_items(x, model)
    return (organ_pass(model, _batch(item, model), segmentation, statistics) for item in items), many


def _anatomy_embeddings(model, x: Any, head, segmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit global embeddings [E] or [N, E], section embeddings [S, E] or [N, S, E]) of x."""
    globals_, sections = [], []
    with inference_mode(model):
        passes, many = _organ_passes(model, x, segmentation, head.organ_statistics)
        for emb, organs in passes:
            globals_.append(emb[0].float().cpu())
            sections.append(head(organs)[0].float().cpu())
    if many:
        return torch.stack(globals_), torch.stack(sections)
    return globals_[0], sections[0]


def embed_anatomy(model, x: Any) -> torch.Tensor:
    """What an anatomy retrieval index compares an image as: the global embedding and the
    anatomy head's organ-system embeddings side by side
    (:func:`~volumevlm.models.anatomy.anatomy_retrieval_vectors`), float32 [E'] for one
    input, [N, E'] for a list (CPU)."""
    from volumevlm.models.anatomy import anatomy_retrieval_vectors

    emb, sections = _anatomy_embeddings(model, x, model.head("anatomy"), model.head("segmentation"))
    if emb.dim() == 2:
        return anatomy_retrieval_vectors(emb, sections)
    return anatomy_retrieval_vectors(emb[None], sections[None])[0]


# ---------------------------------------------------------------------- phenotypes


def phenotypes(model, x: Any, top_k: int | None = 10, anatomy: bool = False):
    """[(phecode, description, P)] sorted by probability, the ``top_k`` most likely
    (None: every code of the vocabulary); a list of such lists for a list.

    anatomy: the anatomy head's classifiers on the organ features of the model's own
    segmentation (the codes it was fitted for) instead of the global phenotype head."""
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise VolumeVLMError(f"top_k: must be a positive integer or None, got {top_k!r}")
    from volumevlm.models.anatomy import NO_PHENOTYPES

    vocab = model.phecode_vocab
    if anatomy:
        head, segmentation = model.head("anatomy"), model.head("segmentation")
        if not head.phecodes:
            raise VolumeVLMError(NO_PHENOTYPES)
        codes = list(head.phecodes)
    else:
        codes = list(vocab.codes)
    results = []
    with inference_mode(model):
        if anatomy:
            passes, many = _organ_passes(model, x, segmentation, head.organ_statistics)
            logits = (head.phenotype_logits(organs)[0] for _, organs in passes)
        else:
            items, many = iter_items(x, model)
            logits = (model.phenotype_logits(_batch(item, model))[0] for item in items)
        for row in logits:
            probs = torch.sigmoid(row.float()).cpu()
            order = torch.argsort(probs, descending=True, stable=True).tolist()
            if top_k is not None:
                order = order[: int(top_k)]
            results.append([(codes[i], _description(vocab, codes[i]), float(probs[i])) for i in order])
    return results if many else results[0]


def _description(vocab, code: str) -> str:
    try:
        return vocab.description(code)
    except VolumeVLMError:
        return ""


# ---------------------------------------------------------------------- similarity maps


def text_direction(model, finding: str, prompts: Any = None) -> torch.Tensor:
    """The finding's unit direction in the shared space, float32 [E]: normalise(p - n)
    where p (n) is the re-normalised mean of its positive (negative) prompt embeddings
    (the centroids :func:`~volumevlm.text.prompts.zero_shot_probabilities` compares)."""
    if not isinstance(finding, str) or not finding.strip():
        raise VolumeVLMError(f"finding: need a finding name, got {finding!r}")
    prompt_set, keys, _ = with_findings(resolve_prompt_set(prompts, model), [finding])
    positives, negatives = prompt_set.texts(keys[0])
    with inference_mode(model):
        emb = F.normalize(model.encode_text(positives + negatives).float(), dim=-1)
    pos = F.normalize(emb[: len(positives)].mean(dim=0), dim=-1)
    neg = F.normalize(emb[len(positives):].mean(dim=0), dim=-1)
    direction = pos - neg
    if float(direction.norm()) < 1e-12:
        raise VolumeVLMError(f"finding {finding!r}: its positive and negative prompts embed identically (no direction)")
    return F.normalize(direction, dim=-1).cpu()


def token_similarity(model, image: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(cosine float32 [gx, gy, gz], grid): each grid token of the encoder, projected into
    the shared space with the image projection, against ``direction`` [E].

    image: preprocessed [1, 1, X, Y, Z] on the model's device."""
    with inference_mode(model):
        out = model.encoder(image)
        tokens = model.image_projection(out.tokens)[0].float()  # [N, E], x-major grid order
    cosine = F.normalize(tokens, dim=-1) @ direction.to(tokens.device).float()
    grid = tuple(int(g) for g in out.grid)
    return cosine.reshape(grid).cpu(), grid  # type: ignore[return-value]


def upsample_tokens(values: torch.Tensor, patch_size: Sequence[int], spatial: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """A token-grid map [gx, gy, gz] on the voxel grid [X, Y, Z] it was computed from.

    Token (i, j, k) covers voxels [i*px, (i+1)*px) x ... (the encoder pads the volume up to
    a multiple of the patch size); "nearest" repeats each token's value over its patch,
    "linear" interpolates trilinearly between patch centres (values beyond the outer
    centres are held). The padding is cropped off."""
    if mode not in UPSAMPLE_MODES:
        raise VolumeVLMError(f"upsample: must be one of {list(UPSAMPLE_MODES)}, got {mode!r}")
    padded = [g * p for g, p in zip(values.shape, patch_size)]
    grid = values[None, None].float()
    if mode == "nearest":
        full = grid.repeat_interleave(int(patch_size[0]), 2).repeat_interleave(int(patch_size[1]), 3)
        full = full.repeat_interleave(int(patch_size[2]), 4)
    else:
        full = F.interpolate(grid, size=padded, mode="trilinear", align_corners=False)
    return full[0, 0, : spatial[0], : spatial[1], : spatial[2]].contiguous()


def _float_image(values: np.ndarray, affine: np.ndarray, descrip: str):
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(values, dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = descrip.encode()[:79]
    return image


def similarity_map(model, x: Any, finding: str, prompts: Any = None, upsample: str = "linear",
                   out: str | os.PathLike | Sequence[str | os.PathLike] | None = None):
    """Where the image looks like ``finding``: a float32 nibabel image of cosines in
    [-1, 1] in the input's own geometry (shape, stored orientation and affine as the
    input; 0 outside the preprocessed field of view), one per input for a list.

    Each grid token of the encoder is projected into the shared space (the image
    projection, applied per token: the pooled embedding is the projection of the mean
    token) and compared by cosine with the finding's text direction
    (:func:`text_direction`); the token map is brought to the preprocessed voxel grid
    (:func:`upsample_tokens`) and then to the input's grid through THE preprocessing's
    inverse. A patch-level map from a contrastive model: coarse, and on a model trained
    on synthetic phantoms, a picture of synthetic data only.

    out: a .nii / .nii.gz path (a list of paths for a list of inputs) to also write each
    map to, atomically (:func:`save_map`).
    """
    from volumevlm.data.transforms import invert_to_input

    direction = text_direction(model, finding, prompts)
    items, many = iter_items(x, model)
    outs = _out_paths(out, many)
    results = []
    descrip = f"volumevlm similarity to '{finding}' (cosine); not for clinical use"
    patch = model.encoder_config.patch_size
    for index, item in enumerate(items):
        batch = _batch(item, model)
        cosine, _ = token_similarity(model, batch, direction)
        voxels = upsample_tokens(cosine, patch, batch.shape[2:], upsample).numpy()
        if item.volume is None:
            image = _float_image(voxels, item.grid_affine, descrip)
        else:
            inverted = invert_to_input(voxels, item.grid_affine, item.volume, mode="linear")
            image = _float_image(np.asarray(inverted.dataobj), item.volume.affine, descrip)
        if outs is not None:
            save_map(image, _nth(outs, index, item))
        results.append(image)
    return results if many else results[0]


def save_map(image, path: str | os.PathLike) -> Path:
    """Write a nibabel image (a similarity map or a mask) to ``path`` (.nii or .nii.gz)
    atomically: a temporary file beside it, renamed into place."""
    from volumevlm.io.writers import save_image_atomic

    return save_image_atomic(image, path)


def _out_paths(out, many: bool):
    if out is None:
        return None
    if isinstance(out, (str, os.PathLike)):
        return [Path(out)] if not many else Path(out)
    paths = [Path(p) for p in out]
    if not many:
        raise VolumeVLMError("out: one input takes one output path, got a list")
    return paths


def _nth(outs, index: int, item: Item) -> Path:
    """The output path of input ``index``: from a list, or a folder for many inputs."""
    if isinstance(outs, list):
        if index >= len(outs):
            raise VolumeVLMError(f"out: {len(outs)} output paths for more inputs")
        return outs[index]
    # A single path for several inputs is a folder; each file is named after its input.
    stem = Path(item.source).name if item.volume is not None else f"volume_{index:04d}"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or f"volume_{index:04d}"
    return Path(outs) / f"{index:04d}_{stem}.nii.gz"


# ---------------------------------------------------------------------- segmentation


def segment(model, x: Any, out: str | os.PathLike | Sequence[str | os.PathLike] | None = None):
    """Label map(s) in the input's own geometry: a nibabel image of uint8 label indices
    whose header carries the label names (read them back with
    :func:`volumevlm.models.segmentation.read_label_names`). Needs the checkpoint's
    segmentation head. out: also write each mask there atomically: NIfTI (.nii.gz /
    .nii), or a DICOM SEG (.dcm) referencing the source images when the input was
    DICOM (a series folder, its zip, or an enhanced CT file); a .dcm output for any
    other input is a one-line error, raised before the model runs on it."""
    import nibabel as nib

    from volumevlm.models.segmentation import (
        LABELS_EXTENSION_KEY,
        NIFTI_DESCRIP,
        save_segmentation,
        segment_to_input,
        sliding_window_segment,
    )

    net = model.head("segmentation")
    # Raw inputs are only read here: segment_to_input runs THE preprocessing itself.
    items, many = iter_items(x, model, preprocess_image=False)
    outs = _out_paths(out, many)
    results = []
    for index, item in enumerate(items):
        target = _nth(outs, index, item) if outs is not None else None
        as_seg = target is not None and _is_dicom_seg_path(target)
        if as_seg:
            _check_dicom_source(item, target)
        if item.volume is not None:
            image, _ = segment_to_input(net, item.volume, model.preprocess)
        else:
            # Already on the model's grid: the mask stays there (the tensor's own geometry).
            with inference_mode(net):
                labels = sliding_window_segment(net, item.image.to(next(net.parameters()).device))[0].cpu().numpy()
            dtype = np.uint8 if net.config.num_classes <= 256 else np.int16
            image = nib.Nifti1Image(labels.astype(dtype), item.grid_affine)
            image.set_qform(item.grid_affine, code=1)
            image.set_sform(item.grid_affine, code=1)
            image.set_data_dtype(dtype)
            header = image.header
            header["descrip"] = NIFTI_DESCRIP.encode()[:79]
            header.set_intent("label")
            names = {str(k): v for k, v in sorted(net.config.label_names.items())}
            header.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps({LABELS_EXTENSION_KEY: names}).encode()))
        if as_seg:
            mask_to_dicom_seg(item.volume, image, out=target)
        elif target is not None:
            save_segmentation(image, target)
        results.append(image)
    return results if many else results[0]


def _is_dicom_seg_path(path: str | os.PathLike) -> bool:
    from volumevlm.io.dicom_seg import DICOM_SEG_SUFFIXES

    return Path(path).name.lower().endswith(DICOM_SEG_SUFFIXES)


def _check_dicom_source(item: Item, target: Path) -> None:
    from volumevlm.io.dicom_seg import dicom_source_of

    if item.volume is None:
        raise InputError(item.source, f"DICOM SEG output ({target.name}) needs a DICOM CT input, not a preprocessed "
                                      "tensor; write the mask as NIfTI (.nii.gz) instead")
    dicom_source_of(item.volume, target)


def mask_to_dicom_seg(volume, mask, out: str | os.PathLike | None = None,
                      label_names: Mapping[int, str] | None = None) -> bytes:
    """A mask as a DICOM SEG on the CT it was made from: the bytes of the Part 10 file
    (for an HTTP response), also written atomically to ``out`` (.dcm) when given.

    volume: the :class:`volumevlm.io.Volume` that ``read_volume`` returned for a DICOM
        series folder, zip or enhanced CT file (it keeps the source headers the SEG
        references: study, series, SOP instances, frames, frame of reference).
    mask: what ``model.segment(volume)`` returned (a nibabel label image on the
        volume's grid, label names in its header), or (label array [X, Y, Z], names).
    label_names: {index: structure name}, overriding the names the mask carries.
    Non-DICOM volumes and masks off the volume's grid are one-line errors.
    """
    from volumevlm import __version__
    from volumevlm.io import check_same_geometry
    from volumevlm.io.dicom_seg import dicom_seg_bytes, write_dicom_seg
    from volumevlm.io.volume import Volume
    from volumevlm.models.segmentation import read_label_names

    if not isinstance(volume, Volume):
        raise InputError(f"<{type(volume).__name__}>", "mask_to_dicom_seg needs the Volume read_volume returned for the DICOM input")
    if isinstance(mask, tuple) and len(mask) == 2:
        labels, names = np.asarray(mask[0]), dict(mask[1])
        if labels.shape != volume.shape:
            raise InputError("mask", f"shape {labels.shape} differs from the CT's {volume.shape} ({volume.source})")
    else:
        names = read_label_names(mask) if label_names is None else {}
        mask_volume = Volume(array=np.asarray(mask.dataobj), affine=np.asarray(mask.affine, dtype=np.float64),
                             source=str(mask.get_filename() or "mask"))
        check_same_geometry(volume, mask_volume)
        labels = mask_volume.array
    if label_names is not None:
        names = {int(k): str(v) for k, v in label_names.items()}
    if out is not None:
        path = write_dicom_seg(out, volume, labels, names, software_version=__version__)
        return path.read_bytes()
    return dicom_seg_bytes(volume, labels, names, software_version=__version__)


# ---------------------------------------------------------------------- reports


def generate_report(model, x: Any, **generation: Any):
    """The report text of each input, organ system by organ system (``FINDINGS:`` lines
    per section, then ``IMPRESSION:``), from the checkpoint's report head. generation:
    overrides of the head's decoding settings (max_new_tokens, num_beams, ...)."""
    from volumevlm.models.report import generate_reports

    model.head("report")
    items, many = iter_items(x, model)
    results = []
    with inference_mode(model):
        for item in items:
            results.append(generate_reports(model, _batch(item, model), **generation)[0])
    return results if many else results[0]


__all__ = [
    "Item",
    "default_prompt_set",
    "embed",
    "generate_report",
    "iter_items",
    "mask_to_dicom_seg",
    "phenotypes",
    "prepare",
    "resolve_prompt_set",
    "save_map",
    "segment",
    "similarity_map",
    "split_inputs",
    "text_direction",
    "token_similarity",
    "upsample_tokens",
    "with_findings",
    "zero_shot",
    "zero_shot_from_embeddings",
]
