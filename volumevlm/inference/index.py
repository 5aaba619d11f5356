"""Retrieval index: exact cosine top-k over report (section) and image embeddings.

An index is a folder written by :func:`build_index` (``volumevlm index build``)::

    index.json                 format + version, embedding size E, entry count N, storage
                               dtype, the chunk files, entries per kind, the model the
                               embeddings came from (checkpoint path and fingerprint), and
                               under "info" the space: "global" (the embeddings) or
                               "anatomy" (global and organ-system embeddings side by side)
    chunks/chunk-00000.safetensors   "embeddings": unit vectors [rows <= chunk_size, E]
    chunks/chunk-00001.safetensors   ... (entry order = chunk order, then row order)
    entries.jsonl              one JSON object per entry, in entry order:
                               {"kind": "report" | "image", "id", "text" | "source", ...}
    entries.safetensors        "offsets": int64 [N + 1] byte offset of each entries.jsonl
                               line (the last = the file size); "kinds": uint8 [N]
                               (position in KINDS), for the kind filter

Memory stays bounded whatever N is: a build holds one chunk of embeddings plus one batch;
a query reads one chunk at a time and keeps a running top-k per query, and only the
metadata of the hits is read from entries.jsonl. What grows with N is 9 bytes per entry
(offsets and kinds), 9 MB for a million entries.

Scores are exact cosines in float32 and the order is total: higher score first, equal
scores by lower entry index, so a chunked query gives exactly the brute-force ranking.

The folder is written atomically (a temporary folder beside it, then renamed). Opening a
missing, corrupt or inconsistent folder, or querying with another model than the one the
index was built with (:func:`model_fingerprint`), raises a one-line
:class:`~volumevlm.errors.VolumeVLMError`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError, one_line

INDEX_FORMAT = "volumevlm-retrieval-index"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
ENTRIES_NAME = "entries.jsonl"
LOOKUP_NAME = "entries.safetensors"
CHUNKS_DIR = "chunks"
KINDS: tuple[str, ...] = ("report", "image")
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_CHUNK_SIZE = 65536
# Queries are scored this many at a time, so a score block is [QUERY_BLOCK, chunk rows].
QUERY_BLOCK = 1024
# Keys a hit adds to an entry's metadata.
HIT_KEYS: tuple[str, ...] = ("rank", "score", "index")
# The parts of a VolumeVLM that make embeddings (heads, phenotype logits and the
# temperature do not change them, so attaching a head keeps an index valid).
EMBEDDING_MODULES: tuple[str, ...] = ("encoder", "image_projection", "text", "text_projection")
BUILD_HINT = "volumevlm index build --checkpoint CKPT --reports REPORTS --out DIR"
# The spaces an index's vectors live in: the global embeddings, or (``--anatomy``) the global
# embedding and the organ-system section embeddings side by side
# (volumevlm.models.anatomy.anatomy_retrieval_vectors), which also need these heads.
GLOBAL_SPACE, ANATOMY_SPACE = "global", "anatomy"
ANATOMY_HEADS: tuple[str, ...] = ("segmentation", "anatomy")


# ---------------------------------------------------------------------- model fingerprint


def model_fingerprint(model, heads: Sequence[str] = ()) -> str:
    """"sha256:<hex>" of everything that decides a VolumeVLM's embeddings: the weights of
    its encoder, projections and text tower (names, dtypes, shapes, values), its
    preprocessing config and its tokenizer's vocabulary; with ``heads`` (an anatomy index:
    :data:`ANATOMY_HEADS`) also those heads' weights.

    Two checkpoints with the same architecture but other weights differ; attaching a
    downstream head does not change it (unless it is one of ``heads``). Cached on the
    model until a parameter changes.
    """
    if not all(hasattr(model, name) for name in (*EMBEDDING_MODULES, "preprocess", "tokenizer")):
        raise VolumeVLMError(f"model fingerprint: expected a VolumeVLM, got {type(model).__name__}")
    tensors = [
        (f"{part}.{name}", tensor)
        for part in EMBEDDING_MODULES
        for name, tensor in getattr(model, part).state_dict().items()
    ]
    tensors += [(f"heads.{head}.{name}", tensor) for head in heads for name, tensor in model.head(head).state_dict().items()]
    # Parameters bump their _version on every in-place change, so this key goes stale
    # exactly when the weights do.
    key = (tuple(heads), *((name, t.data_ptr(), t._version) for name, t in tensors))
    cached = getattr(model, "_volumevlm_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(model.preprocess.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(sorted(model.tokenizer.get_vocab().items())).encode())
    fingerprint = "sha256:" + digest.hexdigest()
    model._volumevlm_fingerprint = (key, fingerprint)
    return fingerprint


def _checkpoint_of(model) -> str | None:
    source = getattr(model, "source", None)
    return None if source is None else str(Path(source).expanduser().resolve())


def data_note(model) -> str | None:
    """The checkpoint's provenance note about its training data (e.g. that it is the
    synthetic cohort, NOT clinical data), to carry into what is made with it."""
    source = getattr(model, "source", None)
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")) if source else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return (config.get("provenance") or {}).get("data_note") if isinstance(config, dict) else None


# ---------------------------------------------------------------------- writing


class IndexWriter:
    """Streams (embeddings, entries) batches into a new index folder.

    Use as a context manager; :meth:`add` any number of batches, then :meth:`commit`,
    which moves the finished folder to ``out_dir`` (replacing an older index there) and
    opens it. Leaving the block without committing removes the temporary folder.
    """

    def __init__(self, out_dir: str | os.PathLike, *, fingerprint: str, checkpoint: str | None = None,
                 dtype: str = "float16", chunk_size: int = DEFAULT_CHUNK_SIZE, info: Mapping[str, Any] | None = None):
        if dtype not in DTYPES:
            raise VolumeVLMError(f"index build: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise VolumeVLMError(f"index build: chunk_size must be a positive integer, got {chunk_size!r}")
        self.target = Path(out_dir).expanduser().resolve()
        if self.target.exists() and not (self.target / INDEX_NAME).is_file() and (
            not self.target.is_dir() or any(self.target.iterdir())
        ):
            raise VolumeVLMError(f"{self.target}: exists and is not a retrieval index; refusing to replace it")
        self.header = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "model": {"fingerprint": fingerprint, "checkpoint": checkpoint},
            "dtype": dtype,
            "chunk_size": chunk_size,
            "info": dict(info or {}),
        }
        self.dim: int | None = None
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.chunks: list[dict[str, Any]] = []
        self.offsets = array("q", [0])
        self.kinds = array("B")
        self.tmp: Path | None = None

    def __enter__(self) -> "IndexWriter":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-"))
        (self.tmp / CHUNKS_DIR).mkdir()
        self.entries = open(self.tmp / ENTRIES_NAME, "wb")
        return self

    def __exit__(self, *exc) -> bool:
        self.entries.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def add(self, embeddings: torch.Tensor, entries: Sequence[Mapping[str, Any]]) -> None:
        """embeddings float [n, E] (normalised here), entries n dicts with "kind" and "id"."""
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2 or embeddings.shape[0] != len(entries):
            raise VolumeVLMError(f"index build: expected embeddings [{len(entries)}, E], got {tuple(getattr(embeddings, 'shape', ()))}")
        if self.dim is None:
            self.dim = int(embeddings.shape[1])
        elif embeddings.shape[1] != self.dim:
            raise VolumeVLMError(f"index build: embeddings of size {embeddings.shape[1]} after earlier ones of size {self.dim}")
        vectors = embeddings.detach().to(device="cpu", dtype=torch.float32)
        norms = vectors.norm(dim=1)
        bad = ~torch.isfinite(norms) | (norms <= 1e-12)
        if bool(bad.any()):
            entry = entries[int(bad.nonzero()[0, 0])]
            raise VolumeVLMError(f"index build: the embedding of {entry.get('id')!r} is zero or not finite")
        for entry in entries:
            if entry.get("kind") not in KINDS or not isinstance(entry.get("id"), str) or any(k in entry for k in HIT_KEYS):
                raise VolumeVLMError(f"index build: entry {dict(entry)!r} needs a kind in {KINDS}, a string id and none of {HIT_KEYS}")
            line = (json.dumps(dict(entry), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            self.entries.write(line)
            self.offsets.append(self.offsets[-1] + len(line))
            self.kinds.append(KINDS.index(entry["kind"]))
        # Stored at unit length, so a score is a cosine whatever the caller passed.
        vectors = (vectors / norms[:, None]).to(DTYPES[self.header["dtype"]])
        start = 0
        while start < vectors.shape[0]:
            take = min(self.header["chunk_size"] - self.pending_rows, vectors.shape[0] - start)
            self.pending.append(vectors[start : start + take])
            self.pending_rows += take
            start += take
            if self.pending_rows == self.header["chunk_size"]:
                self._write_chunk()

    def _write_chunk(self) -> None:
        from safetensors.torch import save_file

        if not self.pending_rows:
            return
        name = f"{CHUNKS_DIR}/chunk-{len(self.chunks):05d}.safetensors"
        save_file({"embeddings": torch.cat(self.pending).contiguous()}, str(self.tmp / name), metadata={"format": INDEX_FORMAT})
        self.chunks.append({"file": name, "rows": self.pending_rows})
        self.pending, self.pending_rows = [], 0

    def commit(self) -> "RetrievalIndex":
        from safetensors.torch import save_file

        from volumevlm.io.writers import _replace_folder

        self._write_chunk()
        self.entries.close()
        count = len(self.kinds)
        if count == 0:
            raise VolumeVLMError("index build: nothing to index (0 entries)")
        kinds = torch.frombuffer(bytearray(self.kinds), dtype=torch.uint8)
        save_file(
            {"offsets": torch.tensor(self.offsets, dtype=torch.int64), "kinds": kinds},
            str(self.tmp / LOOKUP_NAME), metadata={"format": INDEX_FORMAT},
        )
        header = {
            **self.header,
            "embed_dim": self.dim,
            "count": count,
            "kind_counts": {kind: int((kinds == i).sum()) for i, kind in enumerate(KINDS)},
            "chunks": self.chunks,
        }
        (self.tmp / INDEX_NAME).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        _replace_folder(self.tmp, self.target)
        self.tmp = None
        return RetrievalIndex.open(self.target)


# ---------------------------------------------------------------------- the index


class RetrievalIndex:
    """An opened index folder (see the module docstring): :meth:`open` it, :meth:`search`
    or :meth:`query` it with embeddings, or :meth:`query_text` / :meth:`query_image` with a model."""

    def __init__(self, folder: Path, header: dict[str, Any], offsets: torch.Tensor, kinds: torch.Tensor):
        self.folder = folder
        self.header = header
        self.offsets = offsets  # int64 [N + 1]
        self.kinds = kinds  # uint8 [N]

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "RetrievalIndex":
        """Open an index folder, checking every file against index.json (headers only,
        no embeddings are read). A missing, corrupt or inconsistent folder raises a
        one-line VolumeVLMError naming it."""
        from safetensors import safe_open

        folder = Path(directory).expanduser()
        if not folder.is_dir():
            raise VolumeVLMError(f"{folder}: retrieval index folder not found (build one with: {BUILD_HINT})")
        path = folder / INDEX_NAME
        if not path.is_file():
            raise VolumeVLMError(f"{folder}: not a retrieval index (no {INDEX_NAME})")
        try:
            header = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VolumeVLMError(f"{path}: corrupt retrieval index ({one_line(err)})") from None
        _check_header(header, path)
        count, dim = header["count"], header["embed_dim"]

        def corrupt(file: Path, problem: str) -> VolumeVLMError:
            return VolumeVLMError(f"{file}: corrupt retrieval index ({problem}); rebuild it with: {BUILD_HINT}")

        lookup = folder / LOOKUP_NAME
        try:
            with safe_open(str(lookup), framework="pt") as f:
                offsets, kinds = f.get_tensor("offsets"), f.get_tensor("kinds")
        except Exception as err:  # missing file, bad header, missing tensor: safetensors has its own types
            raise corrupt(lookup, one_line(err)) from None
        if tuple(offsets.shape) != (count + 1,) or tuple(kinds.shape) != (count,) or kinds.dtype != torch.uint8:
            raise corrupt(lookup, f"offsets {tuple(offsets.shape)} / kinds {tuple(kinds.shape)} for {count} entries")
        counts = {kind: int((kinds == i).sum()) for i, kind in enumerate(KINDS)}
        if counts != {kind: header["kind_counts"].get(kind, 0) for kind in KINDS}:
            raise corrupt(lookup, f"kinds count {counts}, index.json says {header['kind_counts']}")
        entries = folder / ENTRIES_NAME
        size = entries.stat().st_size if entries.is_file() else None
        if size != int(offsets[-1]) or bool((offsets[1:] <= offsets[:-1]).any()):
            raise corrupt(entries, f"{'missing' if size is None else f'{size} bytes'}, the offsets say {int(offsets[-1])}")
        rows = 0
        for chunk in header["chunks"]:
            file = folder / chunk["file"]
            try:
                with safe_open(str(file), framework="pt") as f:
                    stored = f.get_slice("embeddings")
                    shape, dtype = list(stored.get_shape()), stored.get_dtype()
            except Exception as err:
                raise corrupt(file, one_line(err)) from None
            if shape != [chunk["rows"], dim] or dtype != {"float16": "F16", "float32": "F32"}[header["dtype"]]:
                raise corrupt(file, f"{dtype} {shape}, index.json says {header['dtype']} [{chunk['rows']}, {dim}]")
            rows += chunk["rows"]
        if rows != count:
            raise corrupt(path, f"the chunks hold {rows} rows for {count} entries")
        return cls(folder, header, offsets, kinds)

    # -------------------------------------------------------------- facts

    def __len__(self) -> int:
        return int(self.header["count"])

    def __repr__(self) -> str:
        return f"RetrievalIndex({str(self.folder)!r}, count={len(self)}, kinds={self.kind_counts})"

    @property
    def embed_dim(self) -> int:
        return int(self.header["embed_dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.header["model"]["fingerprint"])

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint directory the index was built with (None for an in-memory model)."""
        return self.header["model"].get("checkpoint")

    @property
    def kind_counts(self) -> dict[str, int]:
        return {kind: int(self.header["kind_counts"].get(kind, 0)) for kind in KINDS}

    def entry(self, i: int) -> dict[str, Any]:
        """The metadata of entry ``i`` (read from entries.jsonl)."""
        if not 0 <= i < len(self):
            raise IndexError(f"entry {i} out of range for an index of {len(self)} entries")
        path = self.folder / ENTRIES_NAME
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        try:
            with open(path, "rb") as f:
                f.seek(start)
                entry = json.loads(f.read(end - start).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VolumeVLMError(f"{path}: corrupt retrieval index (entry {i}: {one_line(err)})") from None
        if not isinstance(entry, dict) or entry.get("kind") != KINDS[int(self.kinds[i])]:
            raise VolumeVLMError(f"{path}: corrupt retrieval index (entry {i} does not match its kind)")
        return entry

    @property
    def space(self) -> str:
        """:data:`GLOBAL_SPACE` or :data:`ANATOMY_SPACE` (indexes built before spaces: global)."""
        return str(self.header.get("info", {}).get("space", GLOBAL_SPACE))

    def check_model(self, model) -> None:
        """One-line VolumeVLMError unless ``model`` is the model this index was built with."""
        heads = ANATOMY_HEADS if self.space == ANATOMY_SPACE else ()
        if model_fingerprint(model, heads) != self.fingerprint:
            built = self.checkpoint or "an in-memory model"
            used = _checkpoint_of(model) or "an in-memory model"
            raise VolumeVLMError(
                f"{self.folder}: index was built with {built} but is queried with {used}, a different model "
                "(other weights, preprocessing or tokenizer); query with the same model or rebuild the index"
            )

    # -------------------------------------------------------------- search

    def _chunks(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """(first entry index, float32 unit vectors [rows, E] on ``device``) per chunk."""
        from safetensors import safe_open

        start = 0
        for chunk in self.header["chunks"]:
            file = self.folder / chunk["file"]
            try:
                with safe_open(str(file), framework="pt") as f:
                    stored = f.get_tensor("embeddings")
            except Exception as err:
                raise VolumeVLMError(f"{file}: corrupt retrieval index ({one_line(err)})") from None
            # Renormalised after upcasting, so float16 storage still gives true cosines; in
            # place, with the stored copy dropped first, so a chunk is held once, not thrice.
            vectors = stored.to(device=device, dtype=torch.float32)
            del stored
            vectors.div_(vectors.norm(dim=1, keepdim=True).clamp_min(1e-12))
            yield start, vectors
            start += chunk["rows"]

    def search(self, queries: torch.Tensor, k: int = 5, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by cosine: (scores float32 [Q, k'], entry indices int64 [Q, k']), on
        the queries' device.

        queries: [Q, E] or [E] float (normalised here). kind: None (every entry),
        "report" or "image". k' = min(k, entries of that kind). Rows are best first,
        equal scores by lower entry index.
        """
        q = torch.as_tensor(queries).detach()
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.embed_dim or not q.is_floating_point():
            raise VolumeVLMError(f"{self.folder}: queries must be float [Q, {self.embed_dim}], got {q.dtype} {tuple(q.shape)}")
        if not bool(torch.isfinite(q).all()) or bool((q.norm(dim=1) <= 1e-12).any()):
            raise VolumeVLMError(f"{self.folder}: a query embedding is zero or not finite")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VolumeVLMError(f"retrieval: k must be a positive integer, got {k!r}")
        if kind is not None and kind not in KINDS:
            raise VolumeVLMError(f"retrieval: kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
        q = F.normalize(q.float(), dim=1)
        k = min(k, len(self) if kind is None else self.kind_counts[kind])
        best = [(torch.empty(hi - lo, 0, device=q.device), torch.empty(hi - lo, 0, dtype=torch.long, device=q.device))
                for lo, hi in _blocks(q.shape[0], QUERY_BLOCK)]
        if k == 0:
            return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])
        for start, vectors in self._chunks(q.device):
            index = torch.arange(start, start + vectors.shape[0], device=q.device)
            if kind is not None:
                keep = (self.kinds[start : start + vectors.shape[0]] == KINDS.index(kind)).to(q.device)
                vectors, index = vectors[keep], index[keep]
            if vectors.shape[0] == 0:
                continue
            for b, (lo, hi) in enumerate(_blocks(q.shape[0], QUERY_BLOCK)):
                scores, columns = top_k(q[lo:hi] @ vectors.T, min(k, vectors.shape[0]))
                # Earlier chunks hold lower entry indices and come first, so a stable sort
                # of (running best, this chunk's best) keeps equal scores in index order.
                merged_scores = torch.cat([best[b][0], scores], dim=1)
                merged_index = torch.cat([best[b][1], index[columns]], dim=1)
                merged_scores, order = torch.sort(merged_scores, dim=1, descending=True, stable=True)
                best[b] = (merged_scores[:, :k], merged_index.gather(1, order)[:, :k])
        return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])

    def query(self, queries: torch.Tensor, k: int = 5, kind: str | None = None) -> list[list[dict[str, Any]]]:
        """Hits per query: [{"rank": 1.., "score": cosine, "index": entry index, **entry}, ...]
        best first (see :meth:`search`)."""
        scores, indices = self.search(queries, k, kind)
        return [
            [{"rank": rank, "score": float(s), "index": int(i), **self.entry(int(i))}
             for rank, (s, i) in enumerate(zip(row_scores, row_indices), start=1)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        ]

    def query_text(self, model, texts: str | Sequence[str], k: int = 5, kind: str | None = None):
        """Hits for query text(s) embedded with ``model.encode_text``: a list of hits for one
        string, a list of such lists for a list of strings."""
        self.check_model(model)
        many = not isinstance(texts, str)
        texts = list(texts) if many else [texts]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise VolumeVLMError("retrieval: query texts must be non-empty strings")
        with _inference(model):
            emb = query_text_vectors(model, texts, self.space)
        hits = self.query(emb, k, kind)
        return hits if many else hits[0]

    def query_image(self, model, x, k: int = 5, kind: str | None = None):
        """Hits for CT input(s) ``x`` (anything the inference verbs take: a path, nibabel
        image, (array, affine), a preprocessed tensor, or a list of these), embedded with
        ``model.encode_image`` after the checkpoint's preprocessing (in an anatomy index,
        with the organ-system embeddings of the anatomy head beside it)."""
        from volumevlm.inference.pipeline import embed, embed_anatomy

        self.check_model(model)
        emb = embed_anatomy(model, x) if self.space == ANATOMY_SPACE else embed(model, x)  # [E'] one input, [N, E'] a list
        hits = self.query(emb.to(model.device), k, kind)
        return hits if emb.ndim == 2 else hits[0]


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row of ``scores`` [Q, n] as (values, columns) [Q, k]:
    higher value first, equal values by lower column (torch.topk alone picks among
    ties arbitrarily)."""
    kth = torch.topk(scores, k, dim=1).values[:, -1:]  # the k-th best value of each row
    above = scores > kth
    tied = scores == kth
    # Every column above the k-th value, then the lowest-numbered columns tied with it.
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= room))
    columns = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # ascending per row
    values = scores.gather(1, columns)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values, columns.gather(1, order)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)] or [(0, 0)]


def _check_header(header: Any, path: Path) -> None:
    def corrupt(problem: str) -> VolumeVLMError:
        return VolumeVLMError(f"{path}: corrupt retrieval index ({problem}); rebuild it with: {BUILD_HINT}")

    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise VolumeVLMError(f"{path}: not a retrieval index (format is not {INDEX_FORMAT!r})")
    if header.get("format_version") != INDEX_VERSION:
        raise VolumeVLMError(f"{path}: index format {header.get('format_version')!r}, this volumevlm reads {INDEX_VERSION}")
    for key, kind in (("embed_dim", int), ("count", int), ("chunk_size", int), ("dtype", str), ("chunks", list),
                      ("kind_counts", dict), ("model", dict)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise corrupt(f"{key!r} missing or not {kind.__name__}")
    if header["dtype"] not in DTYPES or min(header["embed_dim"], header["count"], header["chunk_size"]) < 1:
        raise corrupt("bad dtype, embed_dim, count or chunk_size")
    if not isinstance(header["model"].get("fingerprint"), str):
        raise corrupt("no model fingerprint")
    info = header.get("info", {})
    if not isinstance(info, dict) or info.get("space", GLOBAL_SPACE) not in (GLOBAL_SPACE, ANATOMY_SPACE):
        raise corrupt(f"unknown space {info.get('space') if isinstance(info, dict) else info!r}")
    for i, chunk in enumerate(header["chunks"]):
        if (not isinstance(chunk, dict) or not isinstance(chunk.get("file"), str) or not chunk["file"].startswith(f"{CHUNKS_DIR}/")
                or ".." in chunk["file"] or not isinstance(chunk.get("rows"), int) or not 1 <= chunk["rows"] <= header["chunk_size"]):
            raise corrupt(f"chunk {i} is malformed")


# ---------------------------------------------------------------------- corpora


def read_reports(paths: str | os.PathLike | Sequence[str | os.PathLike], sections: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(text to embed, entry metadata) for every report (or organ-system section) in files.

    .jsonl: one JSON object per line with a ``report`` string and optionally ``id`` (else
    the ``image`` file's stem, else "<file stem>:<line>"); a volumevlm manifest works as is.
    .csv: a header row with a ``report`` column and optionally ``id``. .txt: the whole file
    is ONE report, id = the file stem. Rows without a report are skipped.
    sections: split each report into its organ-system sections
    (:func:`volumevlm.text.sections.split_report`), one entry each, embedded as
    "HEADER: text" as the text tower trains on them; a report without known headers stays whole.
    Entry metadata: {"kind": "report", "id", "text"} (+ "report_id", "section" with sections).
    """
    from volumevlm.data.manifest import _default_id
    from volumevlm.text.sections import split_report

    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    reports: list[tuple[str, str]] = []  # (id, report)
    for file in (Path(p).expanduser() for p in files):
        suffix = file.suffix.lower()
        if suffix not in (".jsonl", ".csv", ".txt"):
            raise InputError(file, "unsupported report file (expected .jsonl, .csv or .txt)")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(file, f"cannot read reports ({one_line(err)})") from None
        if suffix == ".txt":
            if text.strip():
                reports.append((file.stem, text.strip()))
        elif suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(file, f"line {number}: malformed JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("report", ""), (str, type(None))):
                    raise InputError(file, f"line {number}: expected an object with a string 'report'")
                if row.get("report") and row["report"].strip():
                    default = _default_id(row["image"]) if isinstance(row.get("image"), str) else f"{file.stem}:{number}"
                    reports.append((str(row.get("id") or default), row["report"].strip()))
        else:
            try:
                rows = list(csv.DictReader(text.splitlines(keepends=True)))
            except csv.Error as err:
                raise InputError(file, f"malformed CSV ({one_line(err)})") from None
            if rows and "report" not in rows[0]:
                raise InputError(file, f"no 'report' column (columns: {', '.join(map(str, rows[0]))})")
            for number, row in enumerate(rows, start=2):
                if row.get("report") and row["report"].strip():
                    reports.append((str(row.get("id") or f"{file.stem}:{number}"), row["report"].strip()))
    seen: set[str] = set()
    out: list[tuple[str, dict[str, Any]]] = []
    for report_id, report in reports:
        if report_id in seen:
            raise InputError(report_id, "duplicate report id in the report files")
        seen.add(report_id)
        parts = split_report(report) if sections else {}
        parts = {header: body for header, body in parts.items() if body.strip()}
        if not parts:
            out.append((report, {"kind": "report", "id": report_id, "text": report}))
            continue
        for header, body in parts.items():
            text = f"{header}: {body}"
            out.append((text, {"kind": "report", "id": f"{report_id}#{header}", "report_id": report_id,
                               "section": header, "text": text}))
    return out


def image_rows(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Case rows {"id", "image", overrides...} from a .jsonl manifest (read by
    :func:`volumevlm.data.manifest.read_manifest`) or a list of image paths (id = file stem)."""
    from volumevlm.data.manifest import _default_id, read_manifest

    if isinstance(images, (str, os.PathLike)):
        return [dict(row) for row in read_manifest(images).rows]
    rows = [{"id": _default_id(os.fspath(p)), "image": str(Path(p).expanduser().resolve())} for p in images]
    ids = [row["id"] for row in rows]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate is not None:
        raise InputError(duplicate, "two images have this file stem; index them from a manifest with distinct ids")
    return rows


# ---------------------------------------------------------------------- building


@contextmanager
def _inference(model):
    """Eval mode and no autograd; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def query_text_vectors(model, texts: Sequence[str], space: str = GLOBAL_SPACE) -> torch.Tensor:
    """[Q, E'] what query texts are compared with an index's entries as: their
    ``model.encode_text`` embeddings, or in an anatomy index each text read as a report
    (:func:`~volumevlm.models.anatomy.report_retrieval_vectors`: its organ-system sections
    where it has section headers, its global embedding alone where it has none)."""
    if space == ANATOMY_SPACE:
        from volumevlm.models.anatomy import report_retrieval_vectors

        return report_retrieval_vectors(model, model.head("anatomy"), list(texts))
    return model.encode_text(list(texts)).float()


def _report_batches(model, reports, batch_size: int, advance, space: str,
                    sections: bool) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    for lo in range(0, len(reports), batch_size):
        batch = reports[lo : lo + batch_size]
        texts = [text for text, _ in batch]
        with _inference(model):
            if space == ANATOMY_SPACE:
                emb = query_text_vectors(model, texts, space)
            elif sections:
                emb = model.encode_text(texts).float().cpu()
            else:  # a whole report as pretraining matched it to its image
                emb = model.encode_reports(texts).float().cpu()
        yield emb, [meta for _, meta in batch]
        advance(len(batch))


def _image_batches(model, rows, batch_size: int, num_workers: int, advance,
                   space: str) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    from volumevlm.inference.batch import CaseDataset, case_loader
    from volumevlm.inference.pipeline import organ_pass
    from volumevlm.models.anatomy import anatomy_retrieval_vectors

    loader = case_loader(CaseDataset(rows, model.preprocess), batch_size=batch_size, num_workers=num_workers)
    for batch in loader:
        if batch["errors"]:
            raise VolumeVLMError(batch["errors"][0]["error"])
        with _inference(model):
            if space == ANATOMY_SPACE:
                head, segmentation = model.head("anatomy"), model.head("segmentation")
                vectors = []
                for x in batch["images"]:
                    emb, organs = organ_pass(model, x.to(model.device), segmentation, head.organ_statistics)
                    vectors.append(anatomy_retrieval_vectors(emb.float().cpu(), head(organs).float().cpu()))
                emb = torch.cat(vectors)
            else:
                emb = torch.cat([model.encode_image(x.to(model.device)) for x in batch["images"]]).float().cpu()
        yield emb, [{"kind": "image", "id": i, "source": s} for i, s in zip(batch["ids"], batch["sources"])]
        advance(len(batch["ids"]))


def build_index(
    model,
    out_dir: str | os.PathLike,
    *,
    reports: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    sections: bool = False,
    anatomy: bool = False,
    batch_size: int = 32,
    image_batch_size: int = 2,
    num_workers: int = 0,
    dtype: str = "float16",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> RetrievalIndex:
    """Embed reports and/or CT images with a VolumeVLM into a new index folder (reports first).

    reports: report file(s) (:func:`read_reports`; sections splits them by organ system).
    images: a .jsonl manifest or image paths (:func:`image_rows`); each is read by THE
        reader with the row's overrides, preprocessed with the checkpoint's config and
        embedded with ``model.encode_image``; an unreadable image stops the build with its
        one-line error.
    anatomy: store each report and image as the global embedding and the organ-system
        section embeddings side by side (the model's anatomy and segmentation heads;
        :func:`~volumevlm.models.anatomy.anatomy_retrieval_vectors`): an image query then
        scores a report by the mean of the global cosine and the sections' mean cosine,
        which finds the right report more often than the global embedding alone
        (docs/learning.md). Whole reports only (not with ``sections``).
    batch_size / image_batch_size: texts / volumes per forward pass; num_workers: image
        reading processes. The model's checkpoint and :func:`model_fingerprint` are
        recorded; ``out_dir`` is replaced atomically.
    """
    if reports is None and images is None:
        raise VolumeVLMError("index build: give reports, images or both")
    if anatomy and sections:
        raise VolumeVLMError("index build: an anatomy index holds whole reports (their sections side by side); "
                             "drop --sections or --anatomy")
    space = ANATOMY_SPACE if anatomy else GLOBAL_SPACE
    heads = ANATOMY_HEADS if anatomy else ()
    for head in heads:
        model.head(head)  # a checkpoint without it fails now, with the recipe, before any work
    for name, value in (("batch_size", batch_size), ("image_batch_size", image_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VolumeVLMError(f"index build: {name} must be a positive integer, got {value!r}")
    texts = read_reports(reports, sections) if reports is not None else []
    rows = image_rows(images) if images is not None else []
    if not texts and not rows:
        raise VolumeVLMError("index build: the given report files and images hold nothing to index")
    info = {"sections": bool(sections), "space": space, "data_note": data_note(model)}
    if anatomy:
        info["anatomy_sections"] = list(model.head("anatomy").sections)
    writer = IndexWriter(out_dir, fingerprint=model_fingerprint(model, heads), checkpoint=_checkpoint_of(model),
                         dtype=dtype, chunk_size=chunk_size, info=info)
    with writer, _progress(progress) as bar:
        if texts:
            task = bar.add_task("reports" if not sections else "report sections", total=len(texts))
            for emb, metas in _report_batches(model, texts, batch_size, lambda n: bar.advance(task, n), space, sections):
                writer.add(emb, metas)
        if rows:
            task = bar.add_task("images", total=len(rows))
            for emb, metas in _image_batches(model, rows, image_batch_size, num_workers, lambda n: bar.advance(task, n),
                                             space):
                writer.add(emb, metas)
        return writer.commit()


# ---------------------------------------------------------------------- model.retrieve


def retrieve(model, x, k: int = 5, index: "str | os.PathLike | RetrievalIndex | None" = None, kind: str | None = "report"):
    """``model.retrieve``: the k index entries nearest to CT input ``x``.

    x: what the other inference verbs take (path, nibabel image, (array, affine), a
        preprocessed tensor [1, X, Y, Z]; a list or [B, 1, X, Y, Z] batch gives one list
        of hits per input).
    index: an index folder or an opened :class:`RetrievalIndex` built with this model.
    kind: "report" (default: report sections or whole reports), "image", or None (all).
    Returns [{"rank", "score" (cosine), "index", "kind", "id", "text" | "source", ...}],
    best first.
    """
    if index is None:
        raise VolumeVLMError(f"retrieve: no index given; build one with `{BUILD_HINT}` and pass index=DIR")
    if not isinstance(index, RetrievalIndex):
        index = RetrievalIndex.open(index)
    if kind is not None and kind in KINDS and index.kind_counts[kind] == 0:
        raise VolumeVLMError(f"{index.folder}: the index holds no {kind} entries ({index.kind_counts}); pass kind=None or another kind")
    return index.query_image(model, x, k=k, kind=kind)


# ---------------------------------------------------------------------- CLI: volumevlm index build | query


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="embed reports and/or images into an index folder")
    build.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. OUT/model of volumevlm train)")
    build.add_argument("--reports", nargs="+",
                       help="report files: .jsonl (report field; a manifest works), .csv (report column), .txt (one report each)")
    images = build.add_mutually_exclusive_group()
    images.add_argument("--images", nargs="+", help="CT volumes to index (files or DICOM folders)")
    images.add_argument("--manifest", help="CT volumes to index from a manifest.jsonl")
    build.add_argument("--sections", action="store_true", help="one entry per organ-system section of each report")
    build.add_argument("--anatomy", action="store_true",
                       help="store the organ-system embeddings beside the global one (needs the anatomy and segmentation "
                            "heads; image queries find the right report more often; whole reports only)")
    build.add_argument("--out", required=True, help="index folder to write (an older index there is replaced)")
    build.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage precision (default float16)")
    build.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"rows per chunk file (default {DEFAULT_CHUNK_SIZE})")
    build.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    build.add_argument("--image-batch-size", type=int, default=2, help="volumes per forward pass (default 2)")
    build.add_argument("--num-workers", type=int, default=0, help="image reading processes (default 0)")
    build.add_argument("--device", default="cpu", help="torch device (default cpu)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    query = sub.add_parser("query", help="the nearest entries to a text or a CT volume")
    query.add_argument("--index", required=True, help="index folder")
    query.add_argument("--checkpoint", help="checkpoint directory (default: the one the index was built with)")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="query text")
    what.add_argument("--image", help="query CT volume (file or DICOM folder)")
    query.add_argument("-k", type=int, default=5, help="hits (default 5)")
    query.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="only entries of this kind (default all)")
    query.add_argument("--device", default="cpu", help="torch device (default cpu)")
    query.add_argument("--json", action="store_true", help="print the hits as JSON")


def run(args: argparse.Namespace) -> int:
    from volumevlm.inference.checkpoint import load

    if args.action == "build":
        if not args.reports and not args.images and not args.manifest:
            raise VolumeVLMError("index build: give --reports, --images or --manifest")
        model = load(args.checkpoint, device=args.device)
        index = build_index(
            model, args.out, reports=args.reports, images=args.manifest or args.images, sections=args.sections,
            anatomy=args.anatomy,
            batch_size=args.batch_size, image_batch_size=args.image_batch_size, num_workers=args.num_workers,
            dtype=args.dtype, chunk_size=args.chunk_size, progress=not args.no_progress,
        )
        print(json.dumps({"index": str(index.folder), "count": len(index), "kinds": index.kind_counts, "space": index.space,
                          "chunks": len(index.header["chunks"]), "checkpoint": index.checkpoint}, indent=2))
        return 0
    index = RetrievalIndex.open(args.index)
    checkpoint = args.checkpoint or index.checkpoint
    if checkpoint is None:
        raise VolumeVLMError(f"{index.folder}: the index does not name its checkpoint; pass --checkpoint")
    model = load(checkpoint, device=args.device)
    kind = None if args.kind == "all" else args.kind
    hits = index.query_text(model, args.text, args.k, kind) if args.text is not None else index.query_image(model, args.image, args.k, kind)
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
        return 0
    for hit in hits:
        what = hit.get("text") or hit.get("source") or ""
        what = " ".join(what.split())
        print(f"{hit['rank']:>3}  {hit['score']:+.4f}  {hit['kind']:<6}  {hit['id']}  {what[:100]}")
    return 0
