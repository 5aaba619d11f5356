"""Batch inference over a manifest: Lightning ``Trainer.predict`` with a prediction writer.

::

    volumevlm predict --checkpoint CKPT --manifest FILE --out DIR \\
        [--outputs embeddings,zero_shot,masks] [--accelerator gpu --devices 4 --strategy ddp]

Every case is read by THE reader with its manifest row's overrides
(:func:`volumevlm.data.datasets.load_case_volume`) and preprocessed with the checkpoint's
own config; each process (one per GPU under DDP) gets its share of the cases and writes
its own shards into ``DIR``::

    predict.json                       the run: checkpoint and model fingerprint, outputs,
                                       zero-shot prompt set and findings (score columns)
    shard-r<rank>-<seq>.safetensors    "embeddings" float32 [n, E] (unit length),
                                       "zero_shot" float32 [n, F] P(finding present),
                                       rows in the order of the shard's "cases"
    shard-r<rank>-<seq>.json           {"cases": [{"id", "source", "mask"?}],
                                        "failed": [{"id", "source", "error"}], ...}
    masks/<id>.nii.gz                  label map in the input's own geometry (outputs masks;
                                       needs a checkpoint with a segmentation head)

Every file is written atomically and a shard's JSON last: a shard exists once its JSON
does. Rerunning the same command (after a crash, a pre-emption or ``--limit``) skips
every case a finished shard holds, succeeded or failed, so an archive is processed
once however often the run is restarted. :func:`read_predictions` gathers the shards.
Cases that cannot be read are recorded under "failed" with their one-line error
instead of stopping the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from volumevlm.errors import VolumeVLMError, one_line

PREDICT_FORMAT = "volumevlm-predictions"
PREDICT_VERSION = 1
RUN_NAME = "predict.json"
MASKS_DIR = "masks"
OUTPUTS: tuple[str, ...] = ("embeddings", "zero_shot", "masks")
DEFAULT_OUTPUTS: tuple[str, ...] = ("embeddings", "zero_shot")
_SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.(json|safetensors)$")


# ---------------------------------------------------------------------- reading cases


class CaseDataset(torch.utils.data.Dataset):
    """Manifest rows -> preprocessed volumes.

    rows: dicts with "id" and "image" (absolute path) and optional overrides, as
    :func:`volumevlm.data.manifest.read_manifest` returns them.
    preprocess: the checkpoint's PreprocessConfig (``model.preprocess``).
    keep_volume: also return the volume as read (the geometry masks go back to).
    An item: {"id", "source", "image": float32 [1, X, Y, Z] | None, "volume", "error":
    one-line message | None}; a case that cannot be read or preprocessed carries its
    error instead of raising, so one bad file does not stop an archive.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], preprocess, keep_volume: bool = False):
        self.rows = [dict(row) for row in rows]
        self.preprocess = preprocess
        self.keep_volume = keep_volume

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from volumevlm.data.datasets import load_case_volume
        from volumevlm.data.transforms import preprocess

        row = self.rows[i]
        item = {"id": row["id"], "source": row["image"], "image": None, "volume": None, "error": None}
        try:
            volume = load_case_volume(row)
            item["image"] = preprocess(volume, self.preprocess).as_tensor()
        except VolumeVLMError as err:
            item["error"] = str(err)
        except Exception as err:  # MONAI / numpy failures on odd data: recorded, one line
            item["error"] = f"{row['image']}: preprocessing failed ({type(err).__name__}: {one_line(err)})"
        else:
            if self.keep_volume:
                item["volume"] = volume
        return item


def collate_predict(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Items -> {"ids", "sources", "volumes" (readable cases, in order), "images": list of
    [b, 1, X, Y, Z] tensors covering those cases in order (one tensor when they share a
    shape), "errors": [{"id", "source", "error"}]}."""
    ok = [item for item in items if item["error"] is None]
    images = [item["image"] for item in ok]
    if images and all(x.shape == images[0].shape for x in images):
        groups = [torch.stack(images)]
    else:  # preprocessing without a fixed spatial_size: volumes differ in shape
        groups = [x[None] for x in images]
    return {
        "ids": [item["id"] for item in ok],
        "sources": [item["source"] for item in ok],
        "volumes": [item["volume"] for item in ok],
        "images": groups,
        "errors": [{"id": item["id"], "source": item["source"], "error": item["error"]} for item in items if item["error"]],
    }


def case_loader(dataset: CaseDataset, batch_size: int = 2, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` in order (Lightning shards it across processes)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_predict)


# ---------------------------------------------------------------------- model and writer


class PredictModule(L.LightningModule):
    """Wraps a VolumeVLM for ``Trainer.predict``: one batch of cases -> their outputs.

    outputs: a subset of :data:`OUTPUTS`. prompt_set: the zero-shot PromptSet (needed for
    "zero_shot"). predict_step returns {"cases": [{"id", "source", "tensors": {name:
    float32 row}, "mask": nibabel image?}], "failed": [...]}.
    """

    def __init__(self, model, outputs: Sequence[str], prompt_set=None):
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        self.prompt_set = prompt_set
        self._prompt_embeddings: dict[tuple[str, ...], torch.Tensor] = {}

    def _encode_prompts(self, texts: list[str]) -> torch.Tensor:
        # The prompts are the same for every batch: embedded once per process.
        key = tuple(texts)
        if key not in self._prompt_embeddings:
            self._prompt_embeddings[key] = self.model.encode_text(texts).float()
        return self._prompt_embeddings[key]

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        # Only the images go to the device; the volumes as read (frozen dataclasses that
        # Lightning's generic mover cannot rebuild) stay on the CPU for the masks' geometry.
        return {**batch, "images": [x.to(device) for x in batch["images"]]}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        from volumevlm.text.prompts import zero_shot_probabilities

        cases = [{"id": i, "source": s, "tensors": {}} for i, s in zip(batch["ids"], batch["sources"])]
        if cases and {"embeddings", "zero_shot"} & set(self.outputs):
            emb = torch.cat([self.model.encode_image(x) for x in batch["images"]]).float()
            columns = {"embeddings": emb} if "embeddings" in self.outputs else {}
            if "zero_shot" in self.outputs:
                columns["zero_shot"] = zero_shot_probabilities(
                    emb, self._encode_prompts, self.prompt_set, logit_scale=self.model.scale().float()
                )
            for name, values in columns.items():
                for case, row in zip(cases, values.cpu()):
                    case["tensors"][name] = row.clone()
        if "masks" in self.outputs:
            from volumevlm.models.segmentation import segment_to_input

            net = self.model.head("segmentation")
            for case, volume in zip(cases, batch["volumes"]):
                case["mask"] = segment_to_input(net, volume, self.model.preprocess)[0]
        return {"cases": cases, "failed": list(batch["errors"])}


def mask_name(case_id: str) -> str:
    """File name of a case's mask: the id when it is a safe file name, else a safe
    version of it plus a hash of the id (so two ids never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    if safe != case_id or safe.startswith(".") or not safe:
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"
    return f"{MASKS_DIR}/{safe}.nii.gz"


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from volumevlm.io.writers import write_atomic

    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": PREDICT_FORMAT}))


class ShardWriter(BasePredictionWriter):
    """Writes each process's predictions to shards (see the module docstring): masks as
    their batch ends, a shard as soon as it holds ``shard_size`` or more cases, and the
    rest at the end of the run."""

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 256):
        super().__init__(write_interval="batch")
        self.out = Path(out_dir)
        self.shard_size = int(shard_size)
        self.cases: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.rank = trainer.global_rank
        # After every shard already there (of any rank of any earlier run): no overwrites.
        self.sequence = 1 + max((int(m.group(2)) for m in map(_SHARD.match, os.listdir(self.out)) if m), default=0)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        from volumevlm.models.segmentation import save_segmentation

        for case in prediction["cases"]:
            mask = case.pop("mask", None)
            if mask is not None:
                case["mask"] = mask_name(case["id"])
                save_segmentation(mask, self.out / case["mask"])
            self.cases.append(case)
        self.failed.extend(prediction["failed"])
        if len(self.cases) + len(self.failed) >= self.shard_size:
            self.flush()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.flush()
        # Every process's last shard is on disk before any process counts the shards.
        trainer.strategy.barrier("volumevlm-predict-shards")

    def flush(self) -> None:
        """Write the buffered cases as one shard (tensors first, then its JSON)."""
        from volumevlm.io.writers import write_text_atomic

        if not self.cases and not self.failed:
            return
        name = f"shard-r{self.rank:03d}-{self.sequence:06d}"
        names = sorted(self.cases[0]["tensors"]) if self.cases else []
        if names:
            tensors = {key: torch.stack([case["tensors"][key] for case in self.cases]).contiguous() for key in names}
            _save_tensors_atomic(tensors, self.out / f"{name}.safetensors")
        record = {
            "format": PREDICT_FORMAT,
            "format_version": PREDICT_VERSION,
            "rank": self.rank,
            "tensors": names,
            "cases": [{key: value for key, value in case.items() if key != "tensors"} for case in self.cases],
            "failed": self.failed,
        }
        write_text_atomic(self.out / f"{name}.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        self.sequence += 1
        self.cases, self.failed = [], []


# ---------------------------------------------------------------------- reading results


def _shard_records(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(json path, record) of every finished shard in ``out``, in name order."""
    records = []
    for name in sorted(os.listdir(out)) if out.is_dir() else []:
        match = _SHARD.match(name)
        if not match or match.group(3) != "json":
            continue
        path = out / name
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VolumeVLMError(f"{path}: corrupt prediction shard ({one_line(err)}); delete it to recompute its cases") from None
        if not isinstance(record, dict) or record.get("format") != PREDICT_FORMAT or not isinstance(record.get("cases"), list) \
                or not isinstance(record.get("failed"), list):
            raise VolumeVLMError(f"{path}: not a volumevlm prediction shard; delete it to recompute its cases")
        records.append((path, record))
    return records


def completed_cases(out_dir: str | os.PathLike) -> set[str]:
    """Ids of the cases (succeeded or failed) that finished shards in ``out_dir`` hold."""
    return {case["id"] for _, record in _shard_records(Path(out_dir)) for case in record["cases"] + record["failed"]}


def read_predictions(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything a predict run wrote, gathered over its shards (in shard name order).

    Returns {"ids": [n case ids], "embeddings": float32 [n, E] | None, "zero_shot":
    float32 [n, F] | None, "findings": [F keys], "masks": {id: absolute path},
    "failed": [{"id", "source", "error"}], "run": predict.json}. A case in two shards,
    or a shard whose tensors are missing, raises a one-line VolumeVLMError.
    """
    from safetensors.torch import load_file

    out = Path(out_dir).expanduser()
    run = _read_run(out)
    if run is None:
        raise VolumeVLMError(f"{out}: no {RUN_NAME}; not the output of volumevlm predict")
    ids: list[str] = []
    columns: dict[str, list[torch.Tensor]] = {}
    masks: dict[str, str] = {}
    failed: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path, record in _shard_records(out):
        for case in record["cases"] + record["failed"]:
            if case["id"] in seen:
                raise VolumeVLMError(f"{path}: case {case['id']!r} is also in {seen[case['id']]}")
            seen[case["id"]] = path.name
        failed.extend(record["failed"])
        if not record["cases"]:
            continue
        ids.extend(case["id"] for case in record["cases"])
        masks.update({case["id"]: str((out / case["mask"]).resolve()) for case in record["cases"] if case.get("mask")})
        if record.get("tensors"):
            tensor_path = path.with_suffix(".safetensors")
            try:
                tensors = load_file(str(tensor_path))
            except Exception as err:  # missing or corrupt: safetensors raises its own types
                raise VolumeVLMError(
                    f"{tensor_path}: unreadable prediction shard ({one_line(err)}); delete {path.name} to recompute"
                ) from None
            for key in record["tensors"]:
                if key not in tensors or tensors[key].shape[0] != len(record["cases"]):
                    raise VolumeVLMError(f"{tensor_path}: {key!r} does not hold one row per case of {path.name}")
                columns.setdefault(key, []).append(tensors[key])
    return {
        "ids": ids,
        "embeddings": torch.cat(columns["embeddings"]) if "embeddings" in columns else None,
        "zero_shot": torch.cat(columns["zero_shot"]) if "zero_shot" in columns else None,
        "findings": list(run.get("findings") or []),
        "masks": masks,
        "failed": failed,
        "run": run,
    }


def _read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN_NAME
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeVLMError(f"{path}: corrupt ({one_line(err)})") from None
    if not isinstance(run, dict) or run.get("format") != PREDICT_FORMAT:
        raise VolumeVLMError(f"{path}: not written by volumevlm predict")
    return run


# ---------------------------------------------------------------------- the run


def parse_outputs(outputs: str | Sequence[str]) -> tuple[str, ...]:
    names = [o.strip() for o in (outputs.split(",") if isinstance(outputs, str) else outputs) if o.strip()]
    unknown = [o for o in names if o not in OUTPUTS]
    if unknown or not names:
        raise VolumeVLMError(f"predict: outputs must be a comma-separated subset of {', '.join(OUTPUTS)}, got {outputs!r}")
    return tuple(o for o in OUTPUTS if o in names)


def predict(
    checkpoint: str | os.PathLike,
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    outputs: str | Sequence[str] = DEFAULT_OUTPUTS,
    prompts: Any = None,
    batch_size: int = 2,
    num_workers: int = 2,
    shard_size: int = 256,
    limit: int | None = None,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    strategy: str = "auto",
    precision: str = "32-true",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the checkpoint over every case of ``manifest`` not yet in ``out_dir``'s shards.

    outputs: subset of "embeddings", "zero_shot", "masks" (masks need a segmentation head:
        checked before any work). prompts: the zero-shot prompt set, as ``model.zero_shot``
        takes it (:func:`volumevlm.inference.pipeline.resolve_prompt_set`: a bundled name or
        a YAML path; None: the checkpoint's own set, else "synthetic"). limit: process at most
        this many of the remaining cases (in manifest order), e.g. to work in slices.
    accelerator / devices / strategy / precision: Lightning Trainer settings (e.g. "gpu",
        4, "ddp", "bf16-mixed"). Returns a summary {"out", "manifest_cases", "already_done",
        "processed", "done", "failed"} ("done" and "failed" counted from all the shards after
        the run), plus "rank" (this process's global rank) when there was work to do.
    """
    from volumevlm.data.manifest import read_manifest
    from volumevlm.inference.checkpoint import load
    from volumevlm.inference.index import data_note, model_fingerprint
    from volumevlm.io.writers import write_text_atomic

    outputs = parse_outputs(outputs)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VolumeVLMError(f"predict: {name} must be a positive integer, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise VolumeVLMError(f"predict: limit must be a non-negative integer, got {limit!r}")
    model = load(checkpoint)
    if "masks" in outputs:
        model.head("segmentation")  # a checkpoint without the head: its one-line error, before any work
    prompt_set = None
    if "zero_shot" in outputs:
        from volumevlm.inference.pipeline import resolve_prompt_set

        prompt_set = resolve_prompt_set(prompts, model)
    rows = read_manifest(manifest).rows
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = {
        "format": PREDICT_FORMAT,
        "format_version": PREDICT_VERSION,
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "fingerprint": model_fingerprint(model),
        "outputs": list(outputs),
        "prompt_set": None if prompt_set is None else prompt_set.name,
        "findings": None if prompt_set is None else prompt_set.keys,
        "embed_dim": model.embed_dim,
        "data_note": data_note(model),
    }
    earlier = _read_run(out)
    if earlier is not None:
        same = ("fingerprint", "outputs", "findings")
        changed = [key for key in same if earlier.get(key) != run[key]]
        if changed:
            raise VolumeVLMError(
                f"{out}: holds predictions of another run ({', '.join(changed)} differ); resume with the same "
                "checkpoint and outputs, or write to a new --out"
            )
    else:
        write_text_atomic(out / RUN_NAME, json.dumps(run, indent=2) + "\n")
    # Listed before Trainer.predict, i.e. before the processes meet in the process
    # group: every process sees the same finished shards and so the same remaining cases.
    done = completed_cases(out)
    remaining = [row for row in rows if row["id"] not in done]
    todo = remaining if limit is None else remaining[:limit]
    summary = {"out": str(out), "manifest_cases": len(rows), "already_done": len(rows) - len(remaining), "processed": len(todo)}
    if todo:
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
            callbacks=[ShardWriter(out, shard_size)],
        )
        loader = case_loader(CaseDataset(todo, model.preprocess, keep_volume="masks" in outputs), batch_size, num_workers)
        trainer.predict(PredictModule(model, outputs, prompt_set), dataloaders=loader, return_predictions=False)
        summary["rank"] = trainer.global_rank
    finished = _shard_records(out)
    summary["done"] = sum(len(r["cases"]) + len(r["failed"]) for _, r in finished)
    summary["failed"] = sum(len(r["failed"]) for _, r in finished)
    return summary


def _devices(text: str) -> int | str | list[int]:
    if text == "auto":
        return text
    if "," in text:
        return [int(v) for v in text.split(",") if v.strip()]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices: 'auto', a count or a comma-separated list of ids, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--manifest", required=True, help="manifest.jsonl of the cases")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                        help=f"comma-separated subset of {','.join(OUTPUTS)} (default {','.join(DEFAULT_OUTPUTS)})")
    parser.add_argument("--prompts", help="zero-shot prompt set: bundled name or YAML (default: the checkpoint's own, else synthetic)")
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per forward pass per process (default 2)")
    parser.add_argument("--num-workers", type=int, default=2, help="reading processes per device (default 2)")
    parser.add_argument("--shard-size", type=int, default=256, help="cases per shard (default 256)")
    parser.add_argument("--limit", type=int, help="process at most this many of the remaining cases")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default auto)")
    parser.add_argument("--devices", type=_devices, default="auto", help="device count or ids, e.g. 4 or 0,1 (default auto)")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default auto)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (default 32-true)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = predict(
        args.checkpoint, args.manifest, args.out, outputs=args.outputs, prompts=args.prompts,
        batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size, limit=args.limit,
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, precision=args.precision,
        progress=not args.no_progress,
    )
    if summary.pop("rank", 0) == 0:  # under DDP every process runs this; one summary
        print(json.dumps(summary, indent=2))
    return 0
