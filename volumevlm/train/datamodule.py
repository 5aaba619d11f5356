"""The pretraining LightningDataModule: manifest splits -> cached, preprocessed batches.

Cases come from ``root/manifest.jsonl`` (see :mod:`volumevlm.data.manifest`); the
``split`` field chooses train and validation cases. Volumes go through THE
preprocessing (:class:`~volumevlm.data.transforms.PreprocessConfig`) inside
:class:`~volumevlm.data.datasets.PretrainDataset`, cached on disk under ``cache_dir``
(never inside ``root``: inputs are not modified).

The text vocabularies come from the TRAIN split only, so nothing about validation
cases leaks into the model: the WordPiece tokenizer (trained on the training reports,
or loaded from a local Hugging Face directory) and the phecode vocabulary (codes seen
in at least ``phecode_min_count`` training cases). Tokenizer training is not
reproducible from one process to the next (ties in the trainer break differently), so
the vocabularies are built once and kept in ``vocab_dir`` (``OUT/vocab``): every DDP
rank and every resumed run reads the same files the first run wrote.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from volumevlm.data.datasets import PretrainDataset, case_report, collate_cases
from volumevlm.data.manifest import read_manifest
from volumevlm.data.transforms import PreprocessConfig
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.io.writers import _replace_folder

MANIFEST_NAME = "manifest.jsonl"
TOKENIZER_DIR = "tokenizer"
PHECODES_NAME = "phecodes.json"
# How long a non-zero rank waits for rank 0 to write the vocabularies.
VOCAB_WAIT_S = 600.0


def as_preprocess_config(value: PreprocessConfig | Mapping[str, Any] | None) -> PreprocessConfig:
    """A PreprocessConfig from itself, a (Hydra/JSON) mapping, or None (the defaults)."""
    if value is None:
        return PreprocessConfig()
    if isinstance(value, PreprocessConfig):
        return value
    return PreprocessConfig.from_dict({key: value[key] for key in value})


def load_local_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local Hugging Face directory (no network)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(folder, "text model directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(folder, f"no usable tokenizer ({str(err).splitlines()[0]})") from None


class PretrainDataModule(L.LightningDataModule):
    """Train/val dataloaders of pretraining cases plus the vocabularies built from train.

    root: folder holding ``manifest.jsonl`` (e.g. a synthetic cohort; synthetic data is
        NOT clinical data).
    preprocess: PreprocessConfig or mapping of its fields (target_spacing mm,
        hu_window HU, spatial_size voxels, axcodes).
    batch_size / val_batch_size: cases per batch (per device under DDP).
    cache / cache_dir: keep preprocessed volumes on disk in ``cache_dir``.
    tokenizer_vocab_size: WordPiece vocabulary size when training a tokenizer.
    text_pretrained: a local Hugging Face directory whose tokenizer is used instead.
    phecode_min_count: a phecode enters the vocabulary when at least this many
        training cases carry it.
    train_limit: keep only the first N training cases (None: all).
    vocab_dir: where the tokenizer and phecode vocabulary are kept (read if present,
        else built and written); None: built in memory every time.

    precompute: read every case's report and codes once (:func:`volumevlm.train.targets.read_case`:
        the labeler's findings, finding sentences, sections, their token ids truncated at
        ``text_max_length``, phecode targets) instead of in every training step; batches
        carry them as "reading".
    in_memory: keep each preprocessed volume in memory as float16 after its first read
        (about 1 HU of rounding over a 2000 HU window; 0.9 MB per 96x96x48 case), so that
        later epochs read no cache file. Needs ``num_workers=0`` (each worker would hold
        its own copy).

    Batches are :func:`collate_cases` dicts: "image" float32 [B, 1, X, Y, Z] in [0, 1],
    "report" list[str | None], "phecodes" list[list[str]], "findings" list[dict | None],
    "has_report"/"has_codes" bool [B], "id" list[str], and with ``precompute``
    "reading" list[CaseReading].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        preprocess: PreprocessConfig | Mapping[str, Any] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        tokenizer_vocab_size: int = 4096,
        text_pretrained: str | os.PathLike | None = None,
        phecode_min_count: int = 1,
        train_limit: int | None = None,
        vocab_dir: str | os.PathLike | None = None,
        precompute: bool = True,
        in_memory: bool = False,
        text_max_length: int | None = None,
    ):
        super().__init__()
        if in_memory and int(num_workers) > 0:
            raise InputError("data.in_memory", f"needs data.num_workers=0 (each of the {num_workers} workers "
                                               "would hold its own copy of the volumes)")
        self.root = Path(root).expanduser()
        self.preprocess = as_preprocess_config(preprocess)
        if int(batch_size) < 1:
            raise InputError("data.batch_size", f"must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.cache_dir = Path(cache_dir) if (cache and cache_dir) else None
        self.tokenizer_vocab_size = int(tokenizer_vocab_size)
        self.text_pretrained = text_pretrained
        self.phecode_min_count = int(phecode_min_count)
        self.train_limit = train_limit
        self.vocab_dir = Path(vocab_dir).expanduser() if vocab_dir else None
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] = []
        self.tokenizer = None
        self.phecode_vocab = None
        self.findings: list[str] = []
        self.precompute = bool(precompute)
        self.in_memory = bool(in_memory)
        self.text_max_length = None if text_max_length is None else int(text_max_length)
        self._datasets: dict[str, CaseDataset] = {}

    # ------------------------------------------------------------------ setup

    def _read_splits(self) -> None:
        if self.train_rows is not None:
            return
        manifest = read_manifest(self.root / MANIFEST_NAME)
        train_rows = manifest.split("train")
        if self.train_limit is not None:
            train_rows = train_rows[: int(self.train_limit)]
        if not train_rows:
            raise InputError(manifest.path, "no cases with split 'train'")
        self.train_rows = train_rows
        self.val_rows = [row for row in manifest.rows if row.get("split") == "val"]
        self.findings = findings_of(train_rows)

    def prepare_data(self) -> None:
        """Build the vocabularies into ``vocab_dir`` unless they are there (rank 0 only)."""
        if self.vocab_dir is None or (self.vocab_dir / PHECODES_NAME).is_file():
            return
        self._read_splits()
        tokenizer, vocab = self._build_tokenizer(self.train_rows), self._build_phecode_vocab(self.train_rows)
        self.vocab_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.vocab_dir.parent, prefix=f".{self.vocab_dir.name}.tmp-"))
        try:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            (tmp / PHECODES_NAME).write_text(vocab.to_json())
            _replace_folder(tmp, self.vocab_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and choose splits; get the tokenizer and phecode vocabulary
        (from ``vocab_dir`` when set: written by :meth:`prepare_data` on rank 0)."""
        self._read_splits()
        if self.tokenizer is not None:
            return
        if self.vocab_dir is None:
            self.tokenizer = self._build_tokenizer(self.train_rows)
            self.phecode_vocab = self._build_phecode_vocab(self.train_rows)
            return
        if _process_rank() == 0:
            self.prepare_data()
        self._wait_for_vocab()
        from volumevlm.text.vocab import PhecodeVocabulary

        self.tokenizer = load_local_tokenizer(self.vocab_dir / TOKENIZER_DIR)
        self.phecode_vocab = PhecodeVocabulary.from_json((self.vocab_dir / PHECODES_NAME).read_text())

    def _wait_for_vocab(self) -> None:
        deadline = time.monotonic() + VOCAB_WAIT_S
        while not (self.vocab_dir / PHECODES_NAME).is_file():
            if time.monotonic() > deadline:
                raise VolumeVLMError(f"{self.vocab_dir}: rank 0 did not write the vocabularies within {VOCAB_WAIT_S:.0f} s")
            time.sleep(0.5)

    def _build_tokenizer(self, rows: list[dict]):
        if self.text_pretrained:
            return load_local_tokenizer(self.text_pretrained)
        from volumevlm.text.tokenizer import build_wordpiece_tokenizer

        reports = [report for report in map(case_report, rows) if report is not None]
        if not reports:
            raise InputError(self.root / MANIFEST_NAME, "no training case has a report to train the tokenizer on")
        return build_wordpiece_tokenizer(reports, vocab_size=self.tokenizer_vocab_size)

    def _build_phecode_vocab(self, rows: list[dict]):
        from volumevlm.text.vocab import PhecodeVocabulary

        return PhecodeVocabulary.build([row.get("phecodes") or [] for row in rows], min_count=self.phecode_min_count)

    # ------------------------------------------------------------------ loaders

    def finding_keys(self) -> tuple[str, ...]:
        """The labeler's keys of the training findings (empty when it cannot read them)."""
        from volumevlm.text.labeler import resolve_findings

        try:
            return tuple(resolve_findings(self.findings)) if self.findings else ()
        except VolumeVLMError:
            return ()

    def readings(self, rows: list[dict]) -> list:
        """:func:`~volumevlm.train.targets.read_case` of every row (tokenizer and phecode
        vocabulary from :meth:`setup`)."""
        from volumevlm.train.targets import read_case

        keys = self.finding_keys()
        tokenizer, length = self.tokenizer, self.text_max_length
        tokenize = None
        if tokenizer is not None and length:
            def tokenize(text: str) -> list[int]:
                return tokenizer(text, truncation=True, max_length=length, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
        return [read_case(case_report(row), row.get("phecodes") or [], keys, tokenize=tokenize,
                          token_length=length or 0, phecode_vocab=self.phecode_vocab) for row in rows]

    def _dataset(self, rows: list[dict], name: str | None = None) -> "CaseDataset":
        """The dataset of ``rows``; kept under ``name`` (its readings and held volumes are
        made once per run), built afresh when None."""
        if name is None or name not in self._datasets:
            base = PretrainDataset(rows, self.preprocess, cache_dir=self.cache_dir)
            readings = self.readings(rows) if self.precompute else None
            dataset = CaseDataset(base, readings, in_memory=self.in_memory)
            if name is None:
                return dataset
            self._datasets[name] = dataset
        return self._datasets[name]

    def _loader(self, rows: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(rows, "train" if shuffle else "val"),
            batch_size=batch_size,
            shuffle=shuffle,
            # Contrastive batches of one case carry no negatives: drop a ragged last batch
            # in training when there is more than one batch.
            drop_last=shuffle and len(rows) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_cases,
        )

    def train_dataloader(self) -> DataLoader:
        self._read_splits()
        return self._loader(self.train_rows, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._read_splits()
        return self._loader(self.val_rows, self.val_batch_size, shuffle=False)

    def train_reports(self) -> list[str | None]:
        """Each training case's report as the batches carry it (None where it is missing or blank)."""
        self._read_splits()
        return [case_report(row) for row in self.train_rows]

    def describe(self) -> dict[str, Any]:
        """Counts for logs and metrics.json."""
        return {
            "root": str(self.root),
            "train_cases": len(self.train_rows or []),
            "val_cases": len(self.val_rows),
            "phecodes": len(self.phecode_vocab.codes) if self.phecode_vocab is not None else None,
            "preprocess": self.preprocess.to_dict(),
        }


class CaseDataset(torch.utils.data.Dataset):
    """A :class:`PretrainDataset` whose items also carry their precomputed "reading", and
    whose volumes are held in memory as float16 once read (``in_memory``)."""

    def __init__(self, base: PretrainDataset, readings: list | None = None, in_memory: bool = False):
        if readings is not None and len(readings) != len(base):
            raise VolumeVLMError(f"case dataset: {len(readings)} readings for {len(base)} cases")
        self.base = base
        self.rows = base.rows
        self.readings = readings
        self.held: list[torch.Tensor | None] | None = [None] * len(base) if in_memory else None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.held is None:
            image = self.base.image(index)
        elif self.held[index] is None:
            image = self.base.image(index)
            self.held[index] = image.to(torch.float16)
            # What training sees is what a later epoch reads back: the rounded volume.
            image = self.held[index].float()
        else:
            image = self.held[index].float()
        item = {"image": image, **self.base.case_fields(index)}
        if self.readings is not None:
            item["reading"] = self.readings[index]
        return item


def _process_rank() -> int:
    """This process's global rank as the launchers set it in the environment (0 when alone)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def findings_of(rows: list[dict]) -> list[str]:
    """Finding names present in the rows' ``findings`` dicts, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        for name in row.get("findings") or {}:
            names.setdefault(str(name), None)
    return list(names)

