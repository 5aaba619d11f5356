"""Scale benchmark of the retrieval index (``volumevlm.inference.index``): build, query, verify.

The index claims to be exact and chunked so that it scales to a million entries in bounded
memory. For each size in ``--sizes`` (default: 0.1, 0.3 and 1 x ``--entries``, i.e. 100k,
300k and 1M) this script

1. builds an index of random unit embeddings (``--dim``, ``--dtype``) with synthetic entry
   metadata (id, kind report / image, a short text or source; NOT clinical data) through
   the package's own :class:`IndexWriter`, in batches of ``--batch-size``, in a child
   process of its own, timing it and measuring that process's peak resident memory;
2. opens the index and runs ``--queries`` queries of top ``--k`` in ONE batched
   :meth:`RetrievalIndex.query` call, again in a fresh child process, timing it and
   measuring its peak resident memory;
3. verifies exactness here, in the parent: every query's top-k against a brute-force
   ranking in float32 over the stored chunk files read directly (all N scores, one full
   stable sort per query). Any id that differs from the brute-force one where the two
   scores are not equal (a tie) makes the run fail with a non-zero exit. It also checks
   that the stored rows equal the generated embeddings (first and last batch), that half
   of the queries, planted as noisy copies of known entries, find them at rank 1, and
   that each hit's metadata is the synthetic entry at that index.

Time: wall seconds and CPU seconds (user + system, all threads) of each phase; on a shared
machine the CPU seconds are the steadier figure. Peak memory: each child resets its
resident-memory high-water mark after its imports (writing 5 to /proc/self/clear_refs)
and reads VmHWM at the end of its phase; "peak" is that high-water mark, "growth" the peak
above the resident memory at the start of the phase. Each phase has a process of its own,
so no phase inherits another's peak. A query's working set is set by the chunk size and is
reached from the second full chunk on, so an index of under two full chunks (100k entries
at the default 65,536) peaks lower; the sizes above it show whether memory grows. glibc's
adaptive mmap threshold lets freed chunk-sized buffers stay on its heap, where
fragmentation adds a few tens of MB over many chunks; ``--mmap-threshold 65536`` fixes the
threshold in the measured processes to see the working set alone.

Results: a Rich table on stdout and ``benchmarks/results/index-cpu-<YYYY-MM-DD>.json``
(``-mmap<BYTES>`` added with --mmap-threshold, ``-failed`` when a check failed) naming the
device, versions, date and command. The index lives in a temporary folder (inside
``--workdir`` if given), removed at the end.

    python benchmarks/index.py                                    # 100k, 300k, 1M; dim 256, float16
    python benchmarks/index.py --sizes 10000,100000,1000000 --queries 64
    python benchmarks/index.py --entries 2000000 --dtype float32 --workdir /scratch
    python benchmarks/index.py --mmap-threshold 65536               # memory without heap fragmentation
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volumevlm.inference.index import DEFAULT_CHUNK_SIZE, DTYPES, INDEX_NAME, IndexWriter, RetrievalIndex
from volumevlm.provenance import cpu_name, package_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRIPT = Path(__file__).resolve()
CHILD_FLAG = "--child-phase"
MB = float(1 << 20)
# Entry i is an image when i % IMAGE_EVERY == IMAGE_EVERY - 1, a report otherwise.
IMAGE_EVERY = 4
REPORT_TEXTS = (
    "No acute abnormality.",
    "Mild hepatic steatosis.",
    "Small right pleural effusion.",
    "Nonobstructing left renal calculus.",
    "Degenerative changes of the lumbar spine.",
    "Subcentimetre pulmonary nodule, likely benign.",
    "Colonic diverticulosis without diverticulitis.",
)
# Norm of the noise added to an entry's embedding to make a planted query: its cosine
# with the entry is about 1 / sqrt(1 + 0.2^2) = 0.98, far above any random entry's.
PLANTED_NOISE = 0.2
# Score tolerance of the exactness check: a reported score must equal the brute-force
# cosine to this, and a differing id is accepted only as a tie within it.
DEFAULT_TOLERANCE = 1e-6
# Stored rows against the generated unit vectors: float16 rounding of values in [-1, 1]
# is at most 2^-12; float32 only sees the writer's renormalisation.
STORED_TOLERANCE = {"float16": 5e-4, "float32": 1e-6}


class NotExactError(RuntimeError):
    """The index's answer differs from the brute-force ranking."""


# ---------------------------------------------------------------------- synthetic data


def batch_bounds(entries: int, batch_size: int, number: int) -> tuple[int, int]:
    """[first, end) entry indices of build batch ``number``."""
    return number * batch_size, min((number + 1) * batch_size, entries)


def batch_embeddings(seed: int, entries: int, batch_size: int, number: int, dim: int) -> torch.Tensor:
    """The unit embeddings float32 [rows, dim] of build batch ``number``: a stream of its
    own per (seed, batch), so any batch can be made again without the others."""
    first, end = batch_bounds(entries, batch_size, number)
    rng = np.random.default_rng([seed, 1, number])
    vectors = torch.from_numpy(rng.standard_normal((end - first, dim), dtype=np.float32))
    return F.normalize(vectors, dim=1)


def entry_kind(i: int) -> str:
    return "image" if i % IMAGE_EVERY == IMAGE_EVERY - 1 else "report"


def entry_id(i: int) -> str:
    return f"{entry_kind(i)}-{i:07d}"


def entry_metadata(i: int) -> dict[str, Any]:
    """Synthetic metadata of entry ``i`` (NOT clinical data), as read_reports / image
    indexing shape it: reports carry a text, images a source path."""
    if entry_kind(i) == "image":
        return {"kind": "image", "id": entry_id(i), "source": f"synthetic/ct-{i:07d}.nii.gz"}
    return {"kind": "report", "id": entry_id(i), "text": REPORT_TEXTS[i % len(REPORT_TEXTS)]}


def make_queries(seed: int, entries: int, batch_size: int, count: int, dim: int) -> tuple[torch.Tensor, dict[int, int]]:
    """(queries float32 [count, dim], {query row: planted entry index}).

    Even rows are noisy copies of entries spread evenly over the index (first and last
    entry included), so their rank-1 hit is known in advance; odd rows are random
    directions, whose top-k are near-ties among random entries (the hard case for exactness).
    """
    rng = np.random.default_rng([seed, 2])
    queries = F.normalize(torch.from_numpy(rng.standard_normal((count, dim), dtype=np.float32)), dim=1)
    rows = list(range(0, count, 2))
    sources = np.linspace(0, entries - 1, num=len(rows)).round().astype(np.int64).tolist() if rows else []
    planted = dict(zip(rows, (int(s) for s in sources)))
    for row, source in planted.items():
        number = source // batch_size
        first, _ = batch_bounds(entries, batch_size, number)
        target = batch_embeddings(seed, entries, batch_size, number, dim)[source - first]
        queries[row] = F.normalize(target + PLANTED_NOISE * queries[row], dim=0)
    return queries, planted


# ---------------------------------------------------------------------- memory


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all its threads together: much
    less moved than wall time by other processes competing for the cores (threads
    waiting on each other still add some)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """This process's resident-memory peak from construction on (Linux /proc).

    Resets VmHWM (writing 5 to /proc/self/clear_refs) so the imports before the phase do
    not count; ``reset`` says whether that worked (if not, the peak may be an earlier one).
    """

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_kib = _status_kib("VmRSS")

    def result(self) -> dict[str, Any]:
        peak, start, end = _status_kib("VmHWM"), self.start_kib, _status_kib("VmRSS")
        return {
            "start_rss_mb": None if start is None else round(start / 1024, 1),
            "peak_rss_mb": None if peak is None else round(peak / 1024, 1),
            "growth_mb": None if peak is None or start is None else round(max(0, peak - start) / 1024, 1),
            "end_rss_mb": None if end is None else round(end / 1024, 1),
            # Not getrusage's ru_maxrss: it cannot be reset, and a child started by fork +
            # exec may carry the parent's resident size at the fork in it.
            "hwm_reset": self.reset,
        }


# ---------------------------------------------------------------------- child phases


def build_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Write an index of ``spec["entries"]`` synthetic entries through IndexWriter."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    entries, batch_size, dim, seed = spec["entries"], spec["batch_size"], spec["dim"], spec["seed"]
    batches = -(-entries // batch_size)
    info = {"benchmark": "benchmarks/index.py", "data": "random unit embeddings, synthetic metadata (NOT clinical data)",
            "seed": seed, "batch_size": batch_size}
    columns = (TextColumn("build {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    load = round(os.getloadavg()[0], 2)
    memory = PeakMemory()
    generate_s = add_s = 0.0
    began, cpu_began = time.perf_counter(), cpu_seconds()
    with Progress(*columns, disable=not spec["progress"]) as progress:
        task = progress.add_task(f"{entries:,} entries", total=entries)
        with IndexWriter(spec["folder"], fingerprint=f"synthetic:benchmarks/index.py:seed={seed}", dtype=spec["dtype"],
                         chunk_size=spec["chunk_size"], info=info) as writer:
            for number in range(batches):
                t0 = time.perf_counter()
                first, end = batch_bounds(entries, batch_size, number)
                embeddings = batch_embeddings(seed, entries, batch_size, number, dim)
                metadata = [entry_metadata(i) for i in range(first, end)]
                t1 = time.perf_counter()
                writer.add(embeddings, metadata)
                t2 = time.perf_counter()
                generate_s += t1 - t0
                add_s += t2 - t1
                progress.advance(task, end - first)
            t3 = time.perf_counter()
            index = writer.commit()  # also opens (and checks) the finished folder
            commit_s = time.perf_counter() - t3
    total_s, cpu_s = time.perf_counter() - began, cpu_seconds() - cpu_began
    return {
        "total_s": round(total_s, 3),
        "cpu_s": round(cpu_s, 3),
        "index_s": round(add_s + commit_s, 3),
        "generate_s": round(generate_s, 3),
        "add_s": round(add_s, 3),
        "commit_s": round(commit_s, 3),
        "count": len(index),
        "chunks": len(index.header["chunks"]),
        "kind_counts": index.kind_counts,
        "memory": memory.result(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def query_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the index and run all queries in one batched query call (``repeats`` times)."""
    queries, _ = make_queries(spec["seed"], spec["entries"], spec["batch_size"], spec["queries"], spec["dim"])
    load = round(os.getloadavg()[0], 2)
    memory = PeakMemory()
    t0 = time.perf_counter()
    index = RetrievalIndex.open(spec["folder"])
    open_s = time.perf_counter() - t0
    times, cpu_times, hits = [], [], None
    for _ in range(spec["repeats"]):
        t1, c1 = time.perf_counter(), cpu_seconds()
        answer = index.query(queries, k=spec["k"])
        times.append(time.perf_counter() - t1)
        cpu_times.append(cpu_seconds() - c1)
        hits = hits or answer
    return {
        "open_s": round(open_s, 4),
        "query_s": round(min(times), 4),
        "query_times_s": [round(t, 4) for t in times],
        "query_cpu_s": round(cpu_times[times.index(min(times))], 4),
        "query_cpu_times_s": [round(t, 4) for t in cpu_times],
        "memory": memory.result(),
        "indices": [[hit["index"] for hit in row] for row in hits],
        "scores": [[hit["score"] for hit in row] for row in hits],
        "ids": [[hit["id"] for hit in row] for row in hits],
        "kinds": [[hit["kind"] for hit in row] for row in hits],
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


PHASES = {"build": build_phase, "query": query_phase}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = PHASES[spec["phase"]](spec)
    Path(spec["result"]).write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


def run_child(phase: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one phase in a fresh Python process (so it has a peak of its own)."""
    name = f"{phase}-{spec['entries']}"
    spec = {**spec, "phase": phase, "result": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec) + "\n", encoding="utf-8")
    env = dict(os.environ)
    if spec.get("mmap_threshold"):
        # glibc: allocations from this size up get pages of their own, returned on free,
        # and the threshold stops adapting (see --mmap-threshold).
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    done = subprocess.run([sys.executable, str(SCRIPT), CHILD_FLAG, str(spec_path)], env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the {phase} phase for {spec['entries']:,} entries failed (exit {done.returncode})")
    return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------- exactness


def brute_force_scores(folder: str | os.PathLike, queries: torch.Tensor) -> torch.Tensor:
    """float32 cosines [Q, N] of every query with every stored entry, read straight from
    the chunk files named in index.json (not through RetrievalIndex)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    header = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    q = F.normalize(queries.float(), dim=1)
    scores = torch.empty(q.shape[0], header["count"], dtype=torch.float32)
    start = 0
    for chunk in header["chunks"]:
        # Cosine of the stored vector: upcast, then back to unit length (float16 rounding
        # moves the norm slightly off 1).
        stored = F.normalize(load_file(str(folder / chunk["file"]))["embeddings"].float(), dim=1)
        scores[:, start : start + stored.shape[0]] = q @ stored.T
        start += stored.shape[0]
    if start != header["count"]:
        raise NotExactError(f"{folder}: the chunks hold {start} rows, index.json says {header['count']}")
    return scores


def verify_exact(found_indices, found_scores, reference: torch.Tensor, k: int | None = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Check an index's top-k against the brute-force ranking of ``reference`` [Q, N].

    found_indices, found_scores: [Q, k'] as the index returned them (best first); k: the
    hits asked for (default: as many as were found).
    The expected ranking is a stable descending sort of each reference row (higher score
    first, equal scores by lower entry index: the index's own order). Raises
    NotExactError unless every row has k' = min(k, N) distinct in-range entries, every
    reported score is the reference cosine of its entry (within ``tolerance``), and every
    entry equals the expected one at its rank, or ties with it (reference scores equal
    within ``tolerance``). Returns counts for the record.
    """
    found = torch.as_tensor(found_indices, dtype=torch.long)
    reported = torch.as_tensor(found_scores, dtype=torch.float32)
    queries, entries = reference.shape
    if found.ndim != 2 or found.shape[0] != queries or reported.shape != found.shape:
        raise NotExactError(f"expected [{queries}, k] indices and scores, got {tuple(found.shape)} and {tuple(reported.shape)}")
    wanted = min(found.shape[1] if k is None else k, entries)
    if found.shape[1] != wanted or wanted == 0:
        raise NotExactError(f"{found.shape[1]} hits per query, expected {wanted} (k={k}, {entries} entries)")
    k = wanted
    if bool(((found < 0) | (found >= entries)).any()):
        raise NotExactError(f"entry indices outside [0, {entries}): {found[(found < 0) | (found >= entries)][:5].tolist()}")
    for row in range(queries):
        if len(set(found[row].tolist())) != k:
            raise NotExactError(f"query {row}: an entry appears twice in its hits {found[row].tolist()}")
    expected_scores, expected = torch.sort(reference, dim=1, descending=True, stable=True)
    expected_scores, expected = expected_scores[:, :k], expected[:, :k]
    true_scores = reference.gather(1, found)
    score_error = (reported - true_scores).abs()
    problems = [f"query {q} rank {r + 1}: entry {int(found[q, r])} reported score {float(reported[q, r]):.9f}, "
                f"its cosine is {float(true_scores[q, r]):.9f}" for q, r in (score_error > tolerance).nonzero().tolist()]
    differ = found != expected
    tie = (true_scores - expected_scores).abs() <= tolerance
    problems += [f"query {q} rank {r + 1}: entry {int(found[q, r])} (cosine {float(true_scores[q, r]):.9f}), brute force has "
                 f"entry {int(expected[q, r])} (cosine {float(expected_scores[q, r]):.9f})"
                 for q, r in (differ & ~tie).nonzero().tolist()]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise NotExactError(f"not exact: {len(problems)} mismatches against brute force: " + "; ".join(problems[:3]) + more)
    return {
        "queries_verified": queries,
        "k": k,
        "same_ids": int((~differ).sum()),
        "tie_swaps": int(differ.sum()),
        "max_score_error": float(score_error.max()),
        "tolerance": tolerance,
    }


def check_stored_rows(folder: str | os.PathLike, spec: dict[str, Any]) -> dict[str, Any]:
    """The stored embeddings of the first and the last build batch against the generated
    ones: the writer stored what it was given (up to the storage dtype's rounding)."""
    from safetensors import safe_open

    folder = Path(folder)
    header = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    entries, batch_size = spec["entries"], spec["batch_size"]
    numbers = sorted({0, (entries - 1) // batch_size})
    worst, checked = 0.0, 0
    for number in numbers:
        first, end = batch_bounds(entries, batch_size, number)
        generated = batch_embeddings(spec["seed"], entries, batch_size, number, spec["dim"])
        start = 0
        for chunk in header["chunks"]:
            lo, hi = max(first, start), min(end, start + chunk["rows"])
            if lo < hi:
                with safe_open(str(folder / chunk["file"]), framework="pt") as f:
                    stored = f.get_slice("embeddings")[lo - start : hi - start].float()
                worst = max(worst, float((stored - generated[lo - first : hi - first]).abs().max()))
                checked += hi - lo
            start += chunk["rows"]
    tolerance = STORED_TOLERANCE[spec["dtype"]]
    if worst > tolerance:
        raise NotExactError(f"{folder}: stored embeddings differ from the generated ones by {worst:.3g} (> {tolerance})")
    return {"rows_checked": checked, "max_abs_difference": worst, "tolerance": tolerance}


def verify_answer(spec: dict[str, Any], answer: dict[str, Any], tolerance: float, subset: int) -> dict[str, Any]:
    """All exactness checks of one size (raises NotExactError on the first failure)."""
    queries, planted = make_queries(spec["seed"], spec["entries"], spec["batch_size"], spec["queries"], spec["dim"])
    rows = subset or spec["queries"]
    began = time.perf_counter()
    reference = brute_force_scores(spec["folder"], queries[:rows])
    result = verify_exact(answer["indices"][:rows], answer["scores"][:rows], reference, spec["k"], tolerance)
    result["brute_force_s"] = round(time.perf_counter() - began, 3)
    for row, source in planted.items():
        if answer["indices"][row][0] != source:
            raise NotExactError(f"query {row} is a noisy copy of entry {source}, but rank 1 is entry {answer['indices'][row][0]}")
    for row, (indices, ids, kinds) in enumerate(zip(answer["indices"], answer["ids"], answer["kinds"])):
        for index, got_id, got_kind in zip(indices, ids, kinds):
            if got_id != entry_id(index) or got_kind != entry_kind(index):
                raise NotExactError(f"query {row}: entry {index} came back as {got_kind} {got_id!r}, it was written as "
                                    f"{entry_kind(index)} {entry_id(index)!r}")
    result["planted_found_at_rank_1"] = len(planted)
    result["metadata_checked"] = sum(len(row) for row in answer["indices"])
    result["stored_rows"] = check_stored_rows(spec["folder"], spec)
    return result


# ---------------------------------------------------------------------- report


def folder_bytes(folder: Path) -> dict[str, int]:
    parts = {"chunks": 0, "entries.jsonl": 0, "other": 0}
    for path in folder.rglob("*"):
        if path.is_file():
            key = "chunks" if path.parent.name == "chunks" else ("entries.jsonl" if path.name == "entries.jsonl" else "other")
            parts[key] += path.stat().st_size
    parts["total"] = sum(parts.values())
    return parts


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("entries", "chunks", "build s", "build CPU s", "build peak MB", "build growth MB", "on disk MB",
                   "query s", "query CPU s", "query peak MB", "query growth MB", "exact"):
        table.add_column(column, justify="left" if column == "exact" else "right")
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        build, query = r.get("build") or {}, r.get("query") or {}
        build_memory, query_memory = build.get("memory") or {}, query.get("memory") or {}
        disk = r["disk_bytes"]["total"] / MB if r.get("disk_bytes") else None
        table.add_row(f"{r['entries']:,}", str(build.get("chunks", "-")), fmt(build.get("total_s")), fmt(build.get("cpu_s")),
                      fmt(build_memory.get("peak_rss_mb"), "{:.0f}"), fmt(build_memory.get("growth_mb"), "{:.0f}"),
                      fmt(disk, "{:.0f}"), fmt(query.get("query_s"), "{:.2f}"), fmt(query.get("query_cpu_s"), "{:.2f}"),
                      fmt(query_memory.get("peak_rss_mb"), "{:.0f}"), fmt(query_memory.get("growth_mb"), "{:.0f}"),
                      "yes" if r.get("exact") else "NO")
    Console(width=max(Console().width, 160)).print(table)


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-size memory and time side by side, and the memory added per entry between the
    two largest sizes (the bounded-memory claim: the index's own lookup arrays are 9
    bytes per entry; the rest should not grow with N)."""
    done = [r for r in rows if r.get("query") and r.get("build")]
    out: dict[str, Any] = {
        "entries": [r["entries"] for r in done],
        "build_growth_mb": [r["build"]["memory"]["growth_mb"] for r in done],
        "query_growth_mb": [r["query"]["memory"]["growth_mb"] for r in done],
        "build_s": [r["build"]["total_s"] for r in done],
        "query_s": [r["query"]["query_s"] for r in done],
        "query_cpu_s": [r["query"]["query_cpu_s"] for r in done],
    }
    if len(done) >= 2:
        small, large = done[-2], done[-1]
        added = large["entries"] - small["entries"]
        out["per_added_entry_between"] = [small["entries"], large["entries"]]
        for phase in ("build", "query"):
            a, b = small[phase]["memory"]["growth_mb"], large[phase]["memory"]["growth_mb"]
            if a is not None and b is not None:
                out[f"{phase}_growth_bytes_per_added_entry"] = round((b - a) * MB / added, 1)
    return out


# ---------------------------------------------------------------------- main


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v.replace("_", "")) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: expected a comma list of entry counts, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--sizes: entry counts must be positive, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=_positive, default=1_000_000, help="largest index size (default 1,000,000)")
    parser.add_argument("--sizes", type=_sizes, help="comma list of index sizes to run (default: ENTRIES x 0.1, 0.3 and 1)")
    parser.add_argument("--dim", type=_positive, default=256, help="embedding size (default 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype (default float16)")
    parser.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE,
                        help=f"rows per chunk file (default the package's, {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--batch-size", type=_positive, default=4096, help="entries per IndexWriter.add call (default 4096)")
    parser.add_argument("--queries", type=_positive, default=16, help="queries in the one batched query (default 16)")
    parser.add_argument("-k", "--k", type=_positive, default=10, help="hits per query (default 10)")
    parser.add_argument("--repeats", type=_positive, default=1, help="query calls per size; the fastest is reported (default 1)")
    parser.add_argument("--verify-queries", type=int, default=0, help="queries checked against brute force (default 0: all)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"score tolerance of the exactness check (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--threads", type=_positive, help="torch threads in the build and query processes (default torch's)")
    parser.add_argument("--mmap-threshold", type=_positive, metavar="BYTES",
                        help="fix glibc's mmap threshold in the build and query processes (e.g. 65536), so freed "
                             "tensors leave resident memory at once; default: glibc's own, adaptive threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the temporary index folder goes (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the index folders (printed) instead of removing them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    sizes = args.sizes or sorted({max(1, args.entries // 10), max(1, args.entries * 3 // 10), args.entries})
    verify_rows = min(args.verify_queries, args.queries) if args.verify_queries > 0 else 0

    from volumevlm.io.writers import write_text_atomic

    started = dt.datetime.now(dt.timezone.utc)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="volumevlm-index-bench-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        for entries in sizes:
            folder = work / f"index-{entries}"
            spec = {"folder": str(folder), "entries": entries, "dim": args.dim, "dtype": args.dtype,
                    "chunk_size": args.chunk_size, "batch_size": args.batch_size, "queries": args.queries, "k": args.k,
                    "repeats": args.repeats, "seed": args.seed, "threads": args.threads, "mmap_threshold": args.mmap_threshold,
                    "progress": not args.no_progress}
            row: dict[str, Any] = {"entries": entries, "exact": False}
            rows.append(row)
            print(f"{entries:,} entries: building ...", flush=True)
            row["build"] = run_child("build", spec, work)
            row["disk_bytes"] = folder_bytes(folder)
            print(f"  built in {row['build']['total_s']:.1f} s, peak {row['build']['memory']['peak_rss_mb']:.0f} MB; "
                  f"querying ...", flush=True)
            answer = run_child("query", spec, work)
            row["query"] = {key: answer[key] for key in ("open_s", "query_s", "query_times_s", "query_cpu_s", "query_cpu_times_s",
                                                         "memory", "torch_threads", "load_average_at_start")}
            print(f"  {args.queries} queries in {answer['query_s']:.2f} s, peak {answer['memory']['peak_rss_mb']:.0f} MB; "
                  f"verifying against brute force ...", flush=True)
            try:
                row["verification"] = verify_answer(spec, answer, args.tolerance, verify_rows)
                row["exact"] = True
            except NotExactError as err:
                failure = f"{entries:,} entries: {err}"
                row["verification"] = {"error": str(err)}
                print(f"error: {failure}", file=sys.stderr, flush=True)
                break
            finally:
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    threads = next((r["build"]["torch_threads"] for r in rows if r.get("build")), None)
    device = f"cpu ({cpu_name()}, {os.cpu_count()} logical cores, {_usable_cores()} usable, torch threads {threads})"
    print_table(rows, f"Retrieval index, dim {args.dim}, {args.dtype}, chunk {args.chunk_size:,}, "
                      f"{args.queries} queries x top {args.k} ({device})")
    payload = {
        "benchmark": "retrieval index build / query / exactness at scale (benchmarks/index.py)",
        "device": device,
        "versions": package_versions("volumevlm", "torch", "safetensors", "numpy", "rich"),
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/index.py", *argv]),
        "settings": {"sizes": sizes, "dim": args.dim, "dtype": args.dtype, "chunk_size": args.chunk_size,
                     "batch_size": args.batch_size, "queries": args.queries, "k": args.k, "repeats": args.repeats,
                     "verify_queries": verify_rows or args.queries, "tolerance": args.tolerance, "seed": args.seed,
                     "threads": threads, "mmap_threshold": args.mmap_threshold},
        "exact": failure is None and all(r["exact"] for r in rows),
        "rows": rows,
        "summary": summarise(rows),
        "conditions": {"nice": os.nice(0), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "notes": [
            "data: random unit embeddings and synthetic entry metadata (NOT clinical data)",
            "build s = whole build phase (making the random batches + IndexWriter.add + commit, which reopens the index); "
            "index_s = IndexWriter time alone, generate_s = making the synthetic batches",
            "CPU s = user + system CPU seconds of the phase's process (all threads): steadier than wall time when "
            "other processes compete for the cores",
            "query s = one RetrievalIndex.query call with all queries (search + metadata of the hits), after open; the "
            "index files were just written, so they are read from the page cache",
            "peak MB = the child process's VmHWM after a reset at the start of the phase (imports excluded); growth MB = "
            "that peak above the process's resident memory at the start of the phase; MB = 2^20 bytes",
            "exact = every top-k id equals the brute-force float32 ranking over the stored chunk files (or ties with it), "
            "every reported score equals the brute-force cosine, planted queries find their entry at rank 1, hit "
            "metadata matches what was written, stored rows equal the generated embeddings",
        ],
        "failure": failure,
        "wall_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
    }
    suffix = (f"-mmap{args.mmap_threshold}" if args.mmap_threshold else "") + ("" if failure is None else "-failed")
    out = args.out / f"index-cpu-{started.date().isoformat()}{suffix}.json"
    write_text_atomic(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    if failure is not None:
        print(f"error: the index is NOT exact: {failure}", file=sys.stderr)
        return 1
    s = payload["summary"]
    if s.get("query_growth_bytes_per_added_entry") is not None:
        small, large = s["per_added_entry_between"]
        print(f"memory added per entry from {small:,} to {large:,} entries: query "
              f"{s['query_growth_bytes_per_added_entry']:g} bytes, build {s.get('build_growth_bytes_per_added_entry')} bytes")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
